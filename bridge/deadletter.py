"""The dead-letter record: what could not be confirmed or accepted, with the reason.

Records that carry the inbox record they came from can be replayed: written back
to the inbox with trigger `replay`.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from aiokafka.structs import ConsumerRecord

from bridge import redact
from bridge.clock import iso, utc_now
from bridge.inbox import InboxRecord

Reason = Literal[
    # Callbacks refused at the door (the record holds the masked body).
    "malformed",
    "bad_signature",
    "too_large",
    "unsupported_media_type",
    # Hints the worker could not confirm (the record holds the inbox record).
    "unconfirmed",  # transient errors until the retry budget ran out
    "rejected",  # a permanent provider error
    "not_found",
    "stale",  # not final after the polling max age: no longer followed
    "unreadable",  # a record of the inbox or state topic that cannot be decoded
    "failed",  # an unexpected error while confirming: a bug, see the worker's log
]


def dead_letter(
    reason: Reason,
    detail: str,
    *,
    provider: str,
    account: str,
    order_id: str | None = None,
    record: InboxRecord | None = None,
    body: str | None = None,
    attempts: int = 0,
    source: dict[str, Any] | None = None,
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value and headers of a dead-letter record. Nothing here may hold a secret."""
    value: dict[str, Any] = {
        "reason": reason,
        "detail": detail,
        "provider": provider,
        "account": account,
        "order_id": order_id,
        "at": iso(utc_now()),
        "attempts": attempts,
        "record": None if record is None else record.to_json(),
    }
    if body is not None:
        value["body"] = body
    if source is not None:
        value["source"] = source
    return orjson.dumps(value), [("reason", reason.encode())]


def unreadable_dead_letter(
    record: ConsumerRecord, problem: str
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The dead letter of a Kafka record that cannot be read: where it is, why, and its
    bytes as text with card secrets masked. Its names come from its key when it has one."""
    key = record.key.decode("utf-8", "replace") if record.key else ""
    provider, account, order_id = ([*key.split("/", 2), "", ""])[:3]
    text = None if record.value is None else record.value.decode("utf-8", "replace")
    return dead_letter(
        "unreadable",
        problem,
        provider=provider or "?",
        account=account or "?",
        order_id=order_id or None,
        body=None if text is None else redact.mask_text(text),
        source={"topic": record.topic, "partition": record.partition, "offset": record.offset},
    )
