"""kasushou as a sandbox: `POST /api/v1/order/info` signed in headers, and signed callbacks.

Signing is written here from the provider's docs, not taken from `bridge.providers`:
the sandbox plays the provider, and the bridge's adapter is tested against it.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from bridge.sandbox import wire
from bridge.sandbox.base import Encoding, Query, Shown, random_digits, text_field
from bridge.sandbox.book import SandboxOrder

if TYPE_CHECKING:
    from bridge.accounts import Account

# Every hint has non-ASCII text and a `/`, so callbacks exercise both signing escapes.
_HINTS = {
    -1: "等待付款 / unpaid",
    1: "等待处理 / waiting",
    2: "正在处理 / processing",
    3: "充值成功 / done",
    4: "交易取消 / cancelled",
    5: "订单已取消,资金已退回商城余额! / refunded",
}
# The fields of an answer item that an order's own fields may override.
_ITEM_FIELDS = frozenset(
    {"external_orderno", "recharge_info", "recharge_hints", "total_price", "has_back_money"}
    | {"card_list", "express_list"}
)
_UNSIGNED_CALLBACK_FIELDS = frozenset({"sign", "card_list", "express_list"})
_PHP_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "/": "\\/",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
_TIMESTAMP = re.compile(r"[0-9]{13}")


def sha1_hex(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


def php_json_strings(fields: Mapping[str, str]) -> str:
    """A flat object of strings as PHP's `json_encode($post, JSON_UNESCAPED_UNICODE)` writes
    it: compact, non-ASCII as is, `/` as `\\/`; PHP still escapes U+2028 and U+2029."""

    def string(text: str) -> str:
        out = []
        for ch in text:
            if ch in _PHP_ESCAPES:
                out.append(_PHP_ESCAPES[ch])
            elif ch < " " or ch in "\u2028\u2029":
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'

    return "{" + ",".join(f"{string(k)}:{string(v)}" for k, v in fields.items()) + "}"


def callback_sign(fields: Mapping[str, str], api_key: str) -> str:
    """The callback rule: drop sign, card_list, express_list; sort the keys; PHP JSON."""
    signed = {k: v for k, v in fields.items() if k not in _UNSIGNED_CALLBACK_FIELDS}
    ordered = dict(sorted(signed.items(), key=lambda item: item[0].encode()))
    payload = fields["time"] + php_json_strings(ordered) + api_key
    return sha1_hex(payload.encode())


def _envelope(code: int, msg: str, data: Any = (), status_code: int = 200) -> Response:
    return wire.json_response({"code": code, "msg": msg, "data": list(data)}, status_code)


class Kasushou:
    name = "kasushou"
    path = "/api/v1/order/info"
    initial_status = 1

    def new_order_id(self, rng: random.Random) -> str:
        # 22 characters like D100759274105949519872.
        return "D1007" + random_digits(rng, 17)

    def order_defaults(self, rng: random.Random, amount: Decimal) -> dict[str, Any]:
        # A card-code order unless the test passes card_list=[] (virtual goods).
        card = {
            "card_no": "KS" + random_digits(rng, 14),
            "card_password": random_digits(rng, 4) + "-" + random_digits(rng, 4),
            "card_show_type": 1,
        }
        return {"recharge_info": [], "card_list": [card]}

    def read_query(
        self,
        accounts: Sequence[Account],
        body: bytes,
        headers: Mapping[str, str],
        path_params: Mapping[str, Any],
    ) -> Query:
        fields = wire.parse_object(body)
        ids, by_external = _requested_ids(fields or {})
        user_id = headers.get("userid", "").strip()
        account = next((a for a in accounts if str(a.settings.user_id) == user_id), None)
        if not user_id or account is None:
            return Query(None, ids, _envelope(400, "用户不存在"), "unknown_account")
        # Starlette decodes headers as latin-1: encoding back gives the bytes received.
        timestamp = headers.get("timestamp", "").encode("latin-1")
        given = headers.get("sign", "").encode("latin-1")
        # No freshness window is documented (the docs' own test vector is from 2023).
        expected = sha1_hex(timestamp + body + account.settings.api_key.reveal().encode())
        if not _TIMESTAMP.fullmatch(timestamp.decode("latin-1")) or not hmac.compare_digest(
            given, expected.encode()
        ):
            return Query(account, ids, _envelope(400, "签名错误"), "bad_sign")
        if fields is None:
            return Query(account, ids, _envelope(400, "参数错误"), "malformed")
        if not ids:
            return Query(account, ids, _envelope(400, "订单号不能为空"), "malformed")
        days = _days(fields.get("day", 30))
        if days is None:
            return Query(account, ids, _envelope(400, "day参数错误"), "malformed")
        return Query(account, ids, by_external=by_external, days=days)

    def answer(self, query: Query, found: Sequence[Shown]) -> tuple[Response, str]:
        # Ids it does not know are simply left out; none known gives an empty list.
        return _envelope(200, "成功", [_item(shown) for shown in found]), "ok"

    def server_error(self) -> Response:
        return _envelope(500, "未知错误", status_code=500)

    def refusal(self) -> Response:
        return _envelope(400, "订单号格式错误")

    def callback(
        self, account: Account, order: SandboxOrder, status: int, encoding: Encoding, bad_sign: bool
    ) -> tuple[bytes, str]:
        item = _item(Shown(order, status))
        fields = {
            "ordersn": order.order_id,
            "external_orderno": str(item["external_orderno"]),
            "status": str(status),
            "has_back_money": str(item["has_back_money"]),
            "total_price": str(item["total_price"]),
            "recharge_hints": str(item["recharge_hints"]),
            "time": wire.millis(),
        }
        api_key = account.settings.api_key.reveal()
        fields["sign"] = callback_sign(fields, api_key + "-wrong" if bad_sign else api_key)
        extras = {k: item[k] for k in ("card_list", "express_list") if item.get(k)}
        if encoding == "json":
            return wire.dumps({**fields, **extras}), wire.JSON_TYPE
        # A form can't nest: lists travel as JSON text.
        flat = {**fields, **{k: wire.dumps(v).decode() for k, v in extras.items()}}
        return urllib.parse.urlencode(flat).encode(), wire.FORM_TYPE


def _requested_ids(fields: Mapping[str, Any]) -> tuple[tuple[str, ...], bool]:
    for name, by_external in (("ordersn", False), ("external_orderno", True)):
        text = text_field(fields, name)
        ids = tuple(part.strip() for part in (text or "").split(",") if part.strip())
        if ids:
            return ids, by_external
    return (), False


def _days(value: Any) -> int | None:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _item(shown: Shown) -> dict[str, Any]:
    order, status = shown
    total = str(order.amount)
    item: dict[str, Any] = {
        "ordersn": order.order_id,
        "external_orderno": order.external_order_id,
        "recharge_info": [],
        "recharge_hints": _HINTS.get(status, "处理中 / pending"),
        "status": status,
        "total_price": total,
        "has_back_money": total if status == 5 else "0.00",
        "card_list": [],
    }
    item.update({k: v for k, v in order.fields.items() if k in _ITEM_FIELDS})
    return item


PROVIDER = Kasushou()
