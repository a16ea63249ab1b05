"""The inbox record: an accepted hint as the receiver stores it and the worker reads it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import orjson

from bridge.events import TRIGGERS, Trigger
from bridge.orders import order_key
from bridge.redact import shown

# Request headers kept with a callback: enough to trace it, nothing that authenticates.
KEPT_HEADERS = ("content-type", "user-agent", "x-forwarded-for", "x-real-ip", "x-request-id")


@dataclass(frozen=True)
class InboxRecord:
    """Written with `version`; read by workers of older and newer versions alike.

    A version only ever adds fields with defaults: a reader ignores the fields it does
    not know and takes a missing or null optional field as its default, so receivers
    and workers can be upgraded one at a time.
    """

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
    # Since version 2: the W3C trace context the worker continues (`bridge.tracing`).
    traceparent: str | None = None

    VERSION: ClassVar[int] = 2

    @property
    def key(self) -> str:
        return order_key(self.provider, self.account, self.order_id)

    def to_json(self) -> dict[str, Any]:
        # Written out, not `dataclasses.asdict`: that deep-copies every field, which took a
        # tenth of the receiver's CPU per callback. A field added must be added here too
        # (tests/test_worker_parts.py checks that none is missing).
        return {
            "version": self.VERSION,
            "provider": self.provider,
            "account": self.account,
            "order_id": self.order_id,
            "trigger": self.trigger,
            "received_at": self.received_at,
            "content_type": self.content_type,
            "body": self.body,
            "headers": dict(self.headers),
            "claimed_status": self.claimed_status,
            "signature_rule": self.signature_rule,
            "traceparent": self.traceparent,
        }

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json())

    @classmethod
    def decode(cls, value: bytes) -> InboxRecord:
        """The record in `value`, of any version; ValueError when it is not one."""
        try:
            data = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not an inbox record: {exc}") from None
        given = (
            {k: v for k, v in data.items() if k in _FIELDS and v is not None}
            if isinstance(data, dict)
            else {}
        )
        problem = _problem(given)
        if problem:
            raise ValueError(f"not an inbox record: {problem}")
        return cls(**given)


def _problem(given: dict[str, Any]) -> str | None:
    if not all(isinstance(given.get(name), str) and given[name] for name in _REQUIRED):
        return f"missing one of {', '.join(_REQUIRED)}"
    if given["trigger"] not in TRIGGERS:
        return f"unknown trigger '{shown(given['trigger'])}'"
    for name in ("content_type", "body", "claimed_status", "signature_rule", "traceparent"):
        if not isinstance(given.get(name, ""), str):
            return f"{name} is not text"
    headers = given.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        return "headers are not text"
    return None


_REQUIRED = ("provider", "account", "order_id", "trigger", "received_at")
_FIELDS = frozenset(f.name for f in fields(InboxRecord))
