"""The inbox record: an accepted hint as the receiver stores it and the worker reads it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from bridge.events import TRIGGERS, Trigger
from bridge.orders import order_key

# Request headers kept with a callback: enough to trace it, nothing that authenticates.
KEPT_HEADERS = ("content-type", "user-agent", "x-forwarded-for", "x-real-ip", "x-request-id")


@dataclass(frozen=True)
class InboxRecord:
    provider: str
    account: str
    order_id: str
    trigger: Trigger
    received_at: str
    content_type: str = ""
    # The callback body with card secrets masked.
    body: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    # What the callback claimed: recorded for people, never trusted.
    claimed_status: str | None = None
    signature_rule: str | None = None

    @property
    def key(self) -> str:
        return order_key(self.provider, self.account, self.order_id)

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, **asdict(self), "headers": dict(self.headers)}

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json())

    @classmethod
    def decode(cls, value: bytes) -> InboxRecord:
        """The record in `value`; ValueError when it is not one."""
        try:
            data = orjson.loads(value)
            data.pop("version", None)
            record = cls(**data)
        except (orjson.JSONDecodeError, TypeError, AttributeError) as exc:
            raise ValueError(f"not an inbox record: {exc}") from None
        if record.trigger not in TRIGGERS or not all(
            isinstance(v, str) and v for v in (record.provider, record.account, record.order_id)
        ):
            raise ValueError("not an inbox record: missing provider, account, order or trigger")
        return record
