"""kasushou: digital goods and card-code orders.

Requests are signed in headers: `Sign = sha1(Timestamp + body + api_key)` over the
exact body bytes sent. Callbacks carry their own `sign`, built by a different rule
(`/` escaped as `\\/`); see `verify_callback`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge.accounts import Secret
from bridge.errors import BadSignature, MismatchedAnswer, ProviderRejected, ProviderUnavailable
from bridge.orders import CallbackHint, OrderSnapshot, Status
from bridge.providers.base import (
    AnswerReader,
    ProviderRequest,
    ProviderResponse,
    StatusTable,
    decode_callback,
    hint,
    jsonable,
    map_status,
    require_text,
)
from bridge.redact import mask_secrets, shown
from bridge.sealing import hider

if TYPE_CHECKING:
    from bridge.accounts import Account

log = logging.getLogger(__name__)

STATUSES: StatusTable = {
    -1: (Status.PENDING, "unpaid"),
    1: (Status.PENDING, "waiting"),
    2: (Status.PROCESSING, "processing"),
    3: (Status.SUCCEEDED, "succeeded"),
    4: (Status.CANCELLED, "cancelled"),
    5: (Status.REFUNDED, "refunded"),
}

# Fields left out of the callback signature.
_UNSIGNED_CALLBACK_FIELDS = frozenset({"sign", "card_list", "express_list"})


@dataclass(frozen=True)
class KasushouSettings:
    user_id: int | str
    api_key: Secret
    # kasushou's answers carry no currency: the account's prices are in this one.
    currency: str = "CNY"


def php_json(value: Any, *, escape_slashes: bool) -> str:
    """JSON as PHP's json_encode writes it with JSON_UNESCAPED_UNICODE (and, unless
    `escape_slashes`, JSON_UNESCAPED_SLASHES): compact, non-ASCII left as is."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    # PHP escapes the two JavaScript line terminators even with JSON_UNESCAPED_UNICODE.
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return text.replace("/", "\\/") if escape_slashes else text


def sorted_top_level(fields: Mapping[str, Any]) -> dict[str, Any]:
    return dict(sorted(fields.items(), key=lambda item: item[0].encode()))


def sign(timestamp: str, body: str, api_key: Secret) -> str:
    payload = timestamp + body + api_key.reveal()
    return hashlib.sha1(payload.encode(), usedforsecurity=False).hexdigest()


def request_body(fields: Mapping[str, Any]) -> bytes:
    """The exact bytes sent and signed: top-level keys by byte value, `/` unescaped."""
    return php_json(sorted_top_level(fields), escape_slashes=False).encode() if fields else b"{}"


def verify_callback(fields: Mapping[str, Any], api_key: Secret) -> str | None:
    """Which signing rule a callback's `sign` matches: "callback", "request", or None.

    The callback page escapes `/` as `\\/`; the request page does not. Both forms
    need the api key, so accepting either weakens nothing.
    """
    given = str(fields.get("sign", "")).lower()
    timestamp = str(fields.get("time", ""))
    signed = sorted_top_level(
        {k: v for k, v in fields.items() if k not in _UNSIGNED_CALLBACK_FIELDS}
    )
    for rule, escape_slashes in (("callback", True), ("request", False)):
        expected = sign(timestamp, php_json(signed, escape_slashes=escape_slashes), api_key)
        # As bytes: compare_digest refuses str with non-ASCII characters.
        if given and hmac.compare_digest(given.encode(), expected.encode()):
            return rule
    return None


class Kasushou:
    name = "kasushou"
    settings_type = KasushouSettings
    max_batch = 20
    default_callback_ack = "ok"

    def build_query(self, account: Account, order_ids: Sequence[str]) -> ProviderRequest:
        settings: KasushouSettings = account.settings
        # day=0 looks at all of the account's orders: a confirmation must never miss one.
        body = request_body({"day": 0, "external_orderno": "", "ordersn": ",".join(order_ids)})
        timestamp = str(time.time_ns() // 1_000_000)
        return ProviderRequest(
            url=account.base_url.rstrip("/") + "/api/v1/order/info",
            headers={
                "Sign": sign(timestamp, body.decode(), settings.api_key),
                "Timestamp": timestamp,
                "UserId": str(settings.user_id),
                "Content-Type": "application/json; charset=utf-8",
            },
            content=body,
        )

    def parse_query(
        self, account: Account, order_ids: Sequence[str], response: ProviderResponse
    ) -> list[OrderSnapshot]:
        reader = AnswerReader(account, order_ids)
        answer = reader.json(response)
        code, message = answer.get("code"), str(answer.get("msg", ""))[:200]
        if code == 500:
            raise reader.error(ProviderUnavailable, f"code 500: {message}")
        if code != 200:
            raise reader.error(ProviderRejected, f"code {code}: {message}")
        items = answer.get("data") or []
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise reader.error(MismatchedAnswer, "data is not a list of orders")
        wanted = set(order_ids)
        snapshots = []
        for item in items:
            order_id = str(item.get("ordersn", ""))
            if order_id not in wanted:
                raise reader.error(MismatchedAnswer, f"answer names order {order_id!r}")
            status, provider_status = map_status(STATUSES, item.get("status"))
            details = {
                "recharge_info": item.get("recharge_info", []),
                "recharge_hints": item.get("recharge_hints", ""),
                "has_back_money": reader.decimal(item.get("has_back_money"), "has_back_money"),
                "card_list": item.get("card_list", []),
            }
            if "express_list" in item:
                details["express_list"] = item["express_list"]
            snapshots.append(
                OrderSnapshot(
                    provider=self.name,
                    account=account.name,
                    order_id=order_id,
                    external_order_id=str(item.get("external_orderno") or ""),
                    status=status,
                    provider_status=provider_status,
                    amount=reader.decimal(item.get("total_price"), "total_price"),
                    currency=account.settings.currency,
                    details=mask_secrets(jsonable(details), hider(account.card_key)),
                )
            )
        return snapshots

    def parse_callback(
        self, account: Account, body: bytes, headers: Mapping[str, str]
    ) -> CallbackHint:
        callback = decode_callback(account, body, headers)
        order_id = require_text(account, callback.fields, "ordersn")
        rule = verify_callback(callback.fields, account.settings.api_key)
        if rule is None:
            raise BadSignature(self.name, account.name, "sign does not match", order_id)
        log.debug(
            "kasushou callback for %s/%s signed by the %s rule", account.name, shown(order_id), rule
        )
        return hint(callback, order_id, signature_rule=rule)


PROVIDER = Kasushou()
