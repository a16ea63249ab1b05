"""lemft as a sandbox: `POST /{api_version}/openApi/card/order/getOrder` with the key in the
body, and unsigned card-status callbacks."""

from __future__ import annotations

import hmac
import random
import urllib.parse
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from starlette.responses import PlainTextResponse, Response

from bridge.sandbox import wire
from bridge.sandbox.base import Encoding, Query, Shown, random_digits, random_token, text_field
from bridge.sandbox.book import SandboxOrder

if TYPE_CHECKING:
    from bridge.accounts import Account

# order_info fields that an order's own fields may override.
_INFO_FIELDS = (
    "bin_id",
    "holder_id",
    "card_type",
    "order_type",
    "fee",
    "card_id",
    "track_code",
    "track_supplier",
    "track_at",
    "complete_at",
    "create_at",
)
_CALLBACK_FIELDS = ("card_no", "balance", "limit", "expiry", "cvv", "pin")
_CALLBACK_TEXT = ("use_at", "close_at", "end_at", "mark")
_FINISHED = frozenset({1, 2, 3})  # completed, refunded, abnormal: complete_at is set


def _envelope(code: int, message: str, data: Any = None, status_code: int = 200) -> Response:
    return wire.json_response({"code": code, "message": message, "data": data}, status_code)


def _unauthorized() -> Response:
    return _envelope(10001, "invalid authorization key")


def _id_number(fields: Mapping[str, Any], name: str) -> int | None:
    text = text_field(fields, name)
    return int(text) if text is not None and text.isascii() and text.isdigit() else None


class Lemft:
    name = "lemft"
    path = "/{api_version}/openApi/card/order/getOrder"
    initial_status = 0

    def new_order_id(self, rng: random.Random) -> str:
        return "ord_" + random_token(rng, 8)

    def order_defaults(self, rng: random.Random, amount: Decimal) -> dict[str, Any]:
        return {
            "bin_id": "cpi_" + "".join(rng.choice("0123456789abcdef") for _ in range(13)),
            "holder_id": "",
            "card_type": 2,
            "order_type": 1,
            "fee": (amount * Decimal("0.02")).quantize(Decimal("0.01")),
            "card_id": "cid_" + random_token(rng, 16),
            "card_no": "4" + random_digits(rng, 15),
            "expiry": f"{rng.randint(1, 12):02d}/{rng.randint(27, 31)}",
            "cvv": random_digits(rng, 3),
            "pin": random_digits(rng, 6),
        }

    def read_query(
        self,
        accounts: Sequence[Account],
        body: bytes,
        headers: Mapping[str, str],
        path_params: Mapping[str, Any],
    ) -> Query:
        fields = wire.parse_object(body)
        if fields is None:
            # The error code for a bad request is not published; 10002 is the sandbox's.
            return Query(None, (), _envelope(10002, "invalid request parameters"), "malformed")
        order_id = text_field(fields, "order_id")
        ids = (order_id,) if order_id else ()
        customer_id, app_id = _id_number(fields, "customer_id"), _id_number(fields, "app_id")
        account = next(
            (
                a
                for a in accounts
                if (int(a.settings.customer_id), int(a.settings.app_id)) == (customer_id, app_id)
            ),
            None,
        )
        if account is None:
            return Query(None, ids, _unauthorized(), "unknown_account")
        key = text_field(fields, "key") or ""
        if not hmac.compare_digest(key.encode(), account.settings.key.reveal().encode()):
            return Query(account, ids, _unauthorized(), "bad_sign")
        if path_params.get("api_version") != account.settings.api_version:
            return Query(account, ids, PlainTextResponse("Not Found", 404), "bad_path")
        if not ids:
            return Query(account, ids, _envelope(10002, "order_id is required"), "malformed")
        return Query(account, ids)

    def answer(self, query: Query, found: Sequence[Shown]) -> tuple[Response, str]:
        if not found:
            # Not published: what lemft answers for an order it does not know. The sandbox
            # assumes a success envelope with empty data, the laxest plausible answer.
            return _envelope(0, "success", {}), "not_found"
        order, status = found[0]
        fields = order.fields
        info: dict[str, Any] = {
            "order_id": order.order_id,
            "bin_id": "",
            "holder_id": "",
            "out_order_id": order.external_order_id,
            "card_type": 2,
            "order_type": 1,
            "amount": order.amount,
            "fee": Decimal(0),
            "currency": order.currency,
            "card_id": "",
            "status": status,
            "track_code": "",
            "track_supplier": "",
            "track_at": "",
            "complete_at": wire.clock(order.updated_at if status in _FINISHED else None),
            "create_at": wire.clock(order.created_at),
        }
        info.update({k: fields[k] for k in _INFO_FIELDS if k in fields})
        bills = fields.get("order_bill_list")
        if bills is None:
            bills = _bills(order, info, status)
        return _envelope(0, "success", {"order_info": info, "order_bill_list": bills}), "ok"

    def server_error(self) -> Response:
        return _envelope(500, "internal server error", status_code=500)

    def refusal(self) -> Response:
        return _envelope(10002, "invalid request parameters")

    def callback(
        self, account: Account, order: SandboxOrder, status: int, encoding: Encoding, bad_sign: bool
    ) -> tuple[bytes, str]:
        if bad_sign:
            raise ValueError("lemft callbacks carry no signature")
        fields = order.fields
        payload: dict[str, Any] = {
            "event": "order.status.changed",
            "card_id": fields.get("card_id", ""),
            "order_id": order.order_id,
            "out_order_id": order.external_order_id,
            "app_id": account.settings.app_id,
            "bin_id": fields.get("bin_id", ""),
            "holder_id": fields.get("holder_id", ""),
            "card_no": "",
            "balance": order.amount if status == 1 else Decimal(0),
            "limit": order.amount,
            "expiry": "",
            "cvv": "",
            "pin": "",
            "status": status,
        }
        payload.update({k: fields[k] for k in _CALLBACK_FIELDS if k in fields})
        payload.update({k: str(fields.get(k, "")) for k in _CALLBACK_TEXT})
        if encoding == "json":
            return wire.dumps(payload), wire.JSON_TYPE
        flat = {k: str(v) for k, v in payload.items()}
        return urllib.parse.urlencode(flat).encode(), wire.FORM_TYPE


def _bills(order: SandboxOrder, info: Mapping[str, Any], status: int) -> list[dict[str, Any]]:
    """The order's bills: what it cost when placed, and a refund bill once refunded."""
    amount, fee = info["amount"], info["fee"]
    placed = wire.clock(order.created_at)
    if info["order_type"] == 2:  # recharge: recharge fee + handling fee
        bill_type, lines = 2, [(3, amount), (4, fee)]
    else:  # open card: open-card fee + pre-charge
        bill_type, lines = 1, [(1, fee), (2, amount)]
    bills = [_bill(bill_type, 2, placed, lines)]
    if status == 2:
        refunded = wire.clock(order.updated_at)
        bills.append(_bill(3, 1, refunded, [(2 if bill_type == 1 else 3, amount)]))
    return bills


def _bill(
    bill_type: int, in_out_type: int, at: str, lines: list[tuple[int, Any]]
) -> dict[str, Any]:
    return {
        "bill_type": bill_type,
        "in_out_type": in_out_type,
        "transaction_time": at,
        "bill_list": [{"bill_category": c, "amount": a} for c, a in lines],
    }


PROVIDER = Lemft()
