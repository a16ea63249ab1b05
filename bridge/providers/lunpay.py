"""lunpay: A/B-site payment orders.

The query is signed with `merchant_id + account_id + order_no + secret`. Whether
that string is hashed is not published, so the digest is a setting (md5 default).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import orjson

from bridge.accounts import Secret
from bridge.errors import InvalidAnswer, MismatchedAnswer, ProviderRejected
from bridge.orders import CallbackHint, OrderSnapshot, Status
from bridge.providers.base import (
    AnswerReader,
    ProviderRequest,
    ProviderResponse,
    StatusTable,
    decode_callback,
    hint,
    map_status,
    require_text,
)

if TYPE_CHECKING:
    from bridge.accounts import Account

STATUSES: StatusTable = {
    0: (Status.PROCESSING, "in_progress"),
    1: (Status.PENDING, "awaiting_payment"),
    2: (Status.PROCESSING, "processing"),
    3: (Status.ON_HOLD, "on_hold"),
    4: (Status.SUCCEEDED, "completed"),
    5: (Status.CANCELLED, "cancelled"),
    6: (Status.REFUNDED, "refunded"),
    7: (Status.FAILED, "failed"),
    8: (Status.PENDING, "draft"),
    9: (Status.PARTIALLY_PAID, "partially_paid"),
}

Digest = Literal["md5", "sha256", "none"]

# lunpay has one failure answer (403): only its message tells a missing order from a
# bad sign, and a missing order may yet appear (it is asked again; a bad sign is not).
_NOT_FOUND = re.compile(r"not\s*found|not\s*exist|no such order|不存在|未找到", re.IGNORECASE)


@dataclass(frozen=True)
class LunpaySettings:
    merchant_id: int | str
    account_id: int | str
    secret: Secret
    sign_digest: Digest = "md5"


def sign(merchant_id: str, account_id: str, order_no: str, secret: Secret, digest: Digest) -> str:
    text = merchant_id + account_id + order_no + secret.reveal()
    if digest == "none":
        return text
    return hashlib.new(digest, text.encode(), usedforsecurity=False).hexdigest()


class Lunpay:
    name = "lunpay"
    settings_type = LunpaySettings
    max_batch = 1
    default_callback_ack = "success"

    def build_query(self, account: Account, order_ids: Sequence[str]) -> ProviderRequest:
        (order_no,) = order_ids
        s: LunpaySettings = account.settings
        merchant_id, account_id = str(s.merchant_id), str(s.account_id)
        body = {
            "account_id": account_id,
            "merchant_id": merchant_id,
            "order_no": order_no,
            "sign": sign(merchant_id, account_id, order_no, s.secret, s.sign_digest),
        }
        return ProviderRequest(
            url=account.base_url.rstrip("/") + "/api/order/query",
            headers={"Content-Type": "application/json"},
            content=orjson.dumps(body),
        )

    def parse_query(
        self, account: Account, order_ids: Sequence[str], response: ProviderResponse
    ) -> list[OrderSnapshot]:
        reader = AnswerReader(account, order_ids)
        answer = reader.json(response)
        code = answer.get("code")
        if code != 200:
            message = str(answer.get("msg", ""))[:200]
            if code == 403 and _NOT_FOUND.search(message):
                return []
            raise reader.error(ProviderRejected, f"code {code}: {message}")
        data = answer.get("data")
        if not data:
            return []
        if not isinstance(data, dict):
            raise reader.error(InvalidAnswer, "data is not an object")
        (order_no,) = order_ids
        # The documented answer does not repeat the order number; check it when it does.
        named = data.get("order_no")
        if named is not None and str(named) != order_no:
            raise reader.error(MismatchedAnswer, f"answer names order {named!r}")
        status, provider_status = map_status(STATUSES, data.get("status"))
        return [
            OrderSnapshot(
                provider=self.name,
                account=account.name,
                order_id=order_no,
                external_order_id="",
                status=status,
                provider_status=provider_status,
                amount=reader.decimal(data.get("total"), "total"),
                currency=str(data.get("currency") or ""),
                details={
                    "third_a_id": str(data.get("third_a_id") or ""),
                    "third_b_id": str(data.get("third_b_id") or ""),
                },
            )
        ]

    def parse_callback(
        self, account: Account, body: bytes, headers: Mapping[str, str]
    ) -> CallbackHint:
        # lunpay's callbacks are not published: an unauthenticated hint naming an order.
        callback = decode_callback(account, body, headers)
        return hint(callback, require_text(account, callback.fields, "order_no", "order_id"))


PROVIDER = Lunpay()
