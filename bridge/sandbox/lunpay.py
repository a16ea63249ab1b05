"""lunpay as a sandbox: `POST /api/order/query` signed over merchant_id + account_id +
order_no + secret, and unsigned callbacks."""

from __future__ import annotations

import hashlib
import hmac
import random
import urllib.parse
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from bridge.sandbox import wire
from bridge.sandbox.base import Encoding, Query, Shown, random_digits, text_field
from bridge.sandbox.book import SandboxOrder

if TYPE_CHECKING:
    from bridge.accounts import Account

_REQUEST_FIELDS = ("account_id", "merchant_id", "order_no", "sign")


def expected_sign(account: Account, order_no: str) -> str:
    """The sign lunpay expects, hashed by the account's `sign_digest` (md5 when unset)."""
    s = account.settings
    text = f"{s.merchant_id}{s.account_id}{order_no}{s.secret.reveal()}"
    digest = getattr(s, "sign_digest", "md5")
    if digest == "none":
        return text
    return hashlib.new(digest, text.encode(), usedforsecurity=False).hexdigest()


def _failure(msg: str) -> Response:
    return wire.json_response({"code": 403, "msg": msg})


class Lunpay:
    name = "lunpay"
    path = "/api/order/query"
    initial_status = 1

    def new_order_id(self, rng: random.Random) -> str:
        return datetime.now(UTC).strftime("%Y%m%d") + random_digits(rng, 8)

    def order_defaults(self, rng: random.Random, amount: Decimal) -> dict[str, Any]:
        return {"third_a_id": str(rng.randint(10000, 99999)), "third_b_id": "0"}

    def read_query(
        self,
        accounts: Sequence[Account],
        body: bytes,
        headers: Mapping[str, str],
        path_params: Mapping[str, Any],
    ) -> Query:
        fields = wire.parse_object(body) or {}
        account_id, merchant_id, order_no, sign = (text_field(fields, f) for f in _REQUEST_FIELDS)
        ids = (order_no,) if order_no else ()
        if account_id is None or merchant_id is None or order_no is None or sign is None:
            return Query(None, ids, _failure("invalid params"), "malformed")
        account = next(
            (
                a
                for a in accounts
                if (str(a.settings.merchant_id), str(a.settings.account_id))
                == (merchant_id, account_id)
            ),
            None,
        )
        if account is None:
            return Query(None, ids, _failure("merchant not found"), "unknown_account")
        if not hmac.compare_digest(sign.encode(), expected_sign(account, order_no).encode()):
            return Query(account, ids, _failure("sign error"), "bad_sign")
        return Query(account, ids)

    def answer(self, query: Query, found: Sequence[Shown]) -> tuple[Response, str]:
        if not found:
            return _failure("order not found"), "not_found"
        order, status = found[0]
        data = {
            "status": status,
            "currency": order.currency,
            "total": str(order.amount),
            "third_a_id": str(order.fields.get("third_a_id", "")),
            "third_b_id": str(order.fields.get("third_b_id", "0")),
        }
        return wire.json_response(
            {"code": 200, "msg": "success", "data": data, "url": "", "wait": 3}
        ), "ok"

    def server_error(self) -> Response:
        return wire.json_response({"code": 500, "msg": "server error"}, 500)

    def refusal(self) -> Response:
        return _failure("invalid order_no")

    def callback(
        self, account: Account, order: SandboxOrder, status: int, encoding: Encoding, bad_sign: bool
    ) -> tuple[bytes, str]:
        if bad_sign:
            raise ValueError("lunpay callbacks carry no signature")
        fields = {
            "order_no": order.order_id,
            "status": str(status),
            "total": str(order.amount),
            "currency": order.currency,
        }
        if encoding == "json":
            return wire.dumps(fields), wire.JSON_TYPE
        return urllib.parse.urlencode(fields).encode(), wire.FORM_TYPE


PROVIDER = Lunpay()
