"""lemft: card issuing (open-card and recharge orders).

No request signing is documented: the account's `key` travels in the JSON body,
so it must only go over HTTPS and is kept out of every repr and log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
    jsonable,
    map_status,
    require_text,
)
from bridge.redact import mask_secrets
from bridge.sealing import hider

if TYPE_CHECKING:
    from bridge.accounts import Account

STATUSES: StatusTable = {
    0: (Status.PROCESSING, "processing"),
    1: (Status.SUCCEEDED, "completed"),
    2: (Status.REFUNDED, "refunded"),
    3: (Status.FAILED, "abnormal"),
    4: (Status.ON_HOLD, "under_review"),
}

# order_info fields passed on to consumers as they are.
_DETAIL_FIELDS = (
    "order_type",
    "card_type",
    "card_id",
    "bin_id",
    "holder_id",
    "fee",
    "track_code",
    "track_supplier",
    "track_at",
    "complete_at",
    "create_at",
)


@dataclass(frozen=True)
class LemftSettings:
    customer_id: int
    app_id: int
    key: Secret
    api_version: str = "v1"


class Lemft:
    name = "lemft"
    settings_type = LemftSettings
    max_batch = 1
    default_callback_ack = "success"

    def build_query(self, account: Account, order_ids: Sequence[str]) -> ProviderRequest:
        (order_id,) = order_ids
        settings: LemftSettings = account.settings
        body = {
            "customer_id": settings.customer_id,
            "app_id": settings.app_id,
            "key": settings.key.reveal(),
            "order_id": order_id,
        }
        return ProviderRequest(
            url=f"{account.base_url.rstrip('/')}/{settings.api_version}/openApi/card/order/getOrder",
            headers={"Content-Type": "application/json"},
            content=orjson.dumps(body),
        )

    def parse_query(
        self, account: Account, order_ids: Sequence[str], response: ProviderResponse
    ) -> list[OrderSnapshot]:
        reader = AnswerReader(account, order_ids)
        answer = reader.json(response)
        code = answer.get("code")
        if code != 0:
            message = str(answer.get("message", ""))[:200]
            raise reader.error(ProviderRejected, f"code {code}: {message}")
        data = answer.get("data") or {}
        if not isinstance(data, dict):
            raise reader.error(InvalidAnswer, "data is not an object")
        info = data.get("order_info")
        if not info:
            return []
        if not isinstance(info, dict):
            raise reader.error(InvalidAnswer, "order_info is not an object")
        order_id = str(info.get("order_id", ""))
        if order_id not in order_ids:
            raise reader.error(MismatchedAnswer, f"answer names order {order_id!r}")
        status, provider_status = map_status(STATUSES, info.get("status"))
        details = {name: info[name] for name in _DETAIL_FIELDS if name in info}
        details["fee"] = reader.decimal(info.get("fee"), "fee")
        details["bills"] = [
            {**bill, "bill_list": [_with_money(reader, line) for line in bill.get("bill_list", [])]}
            for bill in _objects(reader, data.get("order_bill_list"), "order_bill_list")
        ]
        return [
            OrderSnapshot(
                provider=self.name,
                account=account.name,
                order_id=order_id,
                external_order_id=str(info.get("out_order_id") or ""),
                status=status,
                provider_status=provider_status,
                amount=reader.decimal(info.get("amount"), "amount"),
                currency=str(info.get("currency") or ""),
                details=mask_secrets(jsonable(details), hider(account.card_key)),
            )
        ]

    def parse_callback(
        self, account: Account, body: bytes, headers: Mapping[str, str]
    ) -> CallbackHint:
        # lemft's webhook signing is not published: the callback is an unauthenticated hint.
        callback = decode_callback(account, body, headers)
        return hint(callback, require_text(account, callback.fields, "order_id"))


def _objects(reader: AnswerReader, value: Any, name: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise reader.error(InvalidAnswer, f"{name} is not a list of objects")
    return value


def _with_money(reader: AnswerReader, line: Any) -> Any:
    if not isinstance(line, dict):
        raise reader.error(InvalidAnswer, "bill_list is not a list of objects")
    return {**line, "amount": reader.decimal(line.get("amount"), "bill amount")}


PROVIDER = Lemft()
