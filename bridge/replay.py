"""`order-bridge replay`: dead letters back into the inbox, to be confirmed again.

Only the worker's dead letters carry an inbox record, so only they are replayed;
a callback refused at the door (400, 401, 413, 415) can never be accepted as it was.

Each dead letter is replayed once: after its inbox record is acked, a marker naming
its place (partition, offset) goes to the dead-letter topic itself
(`bridge.deadletters`), and a later replay, in any process, skips what is marked. A
crash between the two writes replays that one again, which is harmless: the worker
publishes an order's change only once. Two replays run at the same moment may both
write one dead letter back, for the same reason harmlessly.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field, replace

import orjson

from bridge.clock import iso, utc_now
from bridge.config import KafkaSettings
from bridge.deadletters import DeadLetter, Filter, read_topic, replay_marker
from bridge.inbox import InboxRecord
from bridge.kafka import Producer


@dataclass
class Report:
    """What a replay did, by reason."""

    replayed: Counter[str] = field(default_factory=Counter)
    # Matched, but written back by an earlier replay.
    already: Counter[str] = field(default_factory=Counter)
    # Matched, but holding no inbox record: refused callbacks, unreadable records.
    not_replayable: Counter[str] = field(default_factory=Counter)

    def lines(self, *, dry_run: bool = False) -> list[str]:
        verb = "would replay" if dry_run else "replayed"
        lines = [f"{verb} {_counted(self.replayed)}"]
        if self.already:
            lines.append(f"skipped {_counted(self.already)}: replayed before")
        if self.not_replayable:
            lines.append(f"skipped {_counted(self.not_replayable)}: no inbox record to replay")
        return lines


def _counted(counts: Counter[str]) -> str:
    total = sum(counts.values())
    noun = "dead letter" if total == 1 else "dead letters"
    by_reason = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
    return f"{total} {noun}" + (f" ({by_reason})" if counts else "")


async def replay_matching(
    settings: KafkaSettings,
    chosen: Filter,
    *,
    dry_run: bool = False,
    rate: float | None = None,
) -> Report:
    """Writes the dead letters `chosen` matches, not replayed before, back into the inbox
    with trigger `replay`, oldest first, at most `rate` a second."""
    report = Report()
    topic = await read_topic(settings)
    todo: list[tuple[DeadLetter, InboxRecord]] = []
    for letter in topic.chosen(chosen):
        record = _inbox_record(letter)
        if record is None:
            report.not_replayable[letter.reason] += 1
        elif letter.replayed_at is not None:
            report.already[letter.reason] += 1
        else:
            todo.append((letter, record))
    if dry_run or not todo:
        report.replayed.update(letter.reason for letter, _ in todo)
        return report
    producer = Producer(settings)
    await producer.start()
    try:
        pace = _Pace(rate)
        for letter, record in todo:
            await pace.wait()
            again = replace(record, trigger="replay", received_at=iso(utc_now()))
            await producer.send(settings.inbox_topic, again.key, again.encode(), timeout=30)
            value, headers = replay_marker(letter.position)
            await producer.send(settings.deadletter_topic, record.key, value, headers, timeout=30)
            report.replayed[letter.reason] += 1
    finally:
        await producer.stop()
    return report


async def replay(
    settings: KafkaSettings,
    *,
    reasons: Collection[str] = (),
    order_key: str | None = None,
    dry_run: bool = False,
) -> Counter[str]:
    """`replay_matching` by reasons and order; how many were replayed, by reason."""
    chosen = Filter(reasons=frozenset(reasons), order=order_key)
    return (await replay_matching(settings, chosen, dry_run=dry_run)).replayed


def _inbox_record(letter: DeadLetter) -> InboxRecord | None:
    record = letter.value.get("record")
    if not isinstance(record, dict):
        return None
    try:
        return InboxRecord.decode(orjson.dumps(record))
    except ValueError:
        return None


class _Pace:
    """At most `rate` passes a second (no limit when None)."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 0.0 if rate is None else 1.0 / rate
        self._next = time.monotonic()

    async def wait(self) -> None:
        now = time.monotonic()
        if self._next > now:
            await asyncio.sleep(self._next - now)
        self._next = max(self._next, now) + self._interval
