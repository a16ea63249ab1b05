"""`order-bridge replay`: dead letters back into the inbox, to be confirmed again.

Only the worker's dead letters carry an inbox record, so only they are replayed;
a callback refused at the door (400, 401, 413, 415) can never be accepted as it was.
Replaying twice is harmless: the worker publishes an order's change only once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import replace

import orjson

from bridge.clock import iso, utc_now
from bridge.config import KafkaSettings
from bridge.inbox import InboxRecord
from bridge.kafka import Producer, read_to_end


async def replay(
    settings: KafkaSettings,
    *,
    reasons: Collection[str] = (),
    order_key: str | None = None,
    dry_run: bool = False,
) -> Counter[str]:
    """Writes matching dead letters' inbox records back with trigger `replay`.

    Returns how many were replayed, by reason (nothing is written with `dry_run`).
    """
    replayed: Counter[str] = Counter()
    producer = Producer(settings)
    await producer.start()
    try:
        async for message in read_to_end(settings, settings.deadletter_topic):
            try:
                letter = orjson.loads(message.value)
                record = InboxRecord.decode(orjson.dumps(letter["record"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if reasons and letter.get("reason") not in reasons:
                continue
            if order_key and record.key != order_key:
                continue
            if not dry_run:
                again = replace(record, trigger="replay", received_at=iso(utc_now()))
                await producer.send(settings.inbox_topic, again.key, again.encode(), timeout=30)
            replayed[letter["reason"]] += 1
    finally:
        await producer.stop()
    return replayed
