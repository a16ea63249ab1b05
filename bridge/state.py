"""The worker's per-order memory, kept in the compacted state topic.

Inbox, status and state share keys and partition counts, so the worker that owns
inbox partition p finds all of its orders' memory in state partition p and
restores exactly those partitions when they are assigned to it.

The status topic, not the state topic, is the truth of what was published: an
event is acked before the state record that remembers it is written, so a crash in
between leaves the state behind the status topic. Each state record therefore says
which status offsets it covers, and a restore reads the status partition from there
to its end and applies the events it finds (see `bridge/worker/writer.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka.structs import ConsumerRecord

from bridge.clock import epoch_from_iso, iso_from_epoch
from bridge.config import KafkaSettings
from bridge.kafka import read_to_end
from bridge.orders import Status

log = logging.getLogger(__name__)

STATE_VERSION = 2


@dataclass(frozen=True, slots=True)
class OrderState:
    """What the bridge knows of an order it follows: what it published, when to ask again.

    Times are epoch seconds here (small in memory) and ISO 8601 in the record.
    """

    first_seen: float
    # The last published status; None until the first event.
    status: Status | None = None
    code: int | str | None = None
    event_id: str | None = None
    published_at: float | None = None
    # When to poll next; None once the order is final or no longer followed.
    next_poll: float | None = None
    # Answers in a row that changed nothing: picks the poll interval.
    polls: int = 0
    # "Not found" answers in a row (a watched order whose creation lags).
    misses: int = 0
    # When an order no longer followed is forgotten.
    forget_at: float | None = None
    # The published status of the highest rank so far: `unknown` in between never
    # reopens a lower status.
    highest: Status | None = None
    # The status-topic offset of the last published event.
    event_offset: int | None = None
    # Queries in a row that failed with a provider error (an incident while above 0),
    # and how many of them were refusals: the first refusal of an incident is
    # dead-lettered.
    failures: int = 0
    refusals: int = 0

    @property
    def next_due(self) -> float | None:
        """When the worker next acts on the order: a poll, or forgetting it."""
        return self.next_poll if self.next_poll is not None else self.forget_at

    def published(
        self, status: Status, code: int | str, event_id: str, at: float, offset: int
    ) -> OrderState:
        """This state after the event of `status` was acked at status offset `offset`."""
        highest = self.highest
        if status.rank is not None and (highest is None or status.rank >= (highest.rank or 0)):
            highest = status
        return dataclasses.replace(
            self,
            status=status,
            code=code,
            event_id=event_id,
            published_at=at,
            highest=highest,
            event_offset=offset,
        )

    def encode(self, covered: int | None = None) -> bytes:
        """The state record; `covered` is the status offset below which every event of the
        partition is remembered by a state record already written."""
        return orjson.dumps(
            {
                "version": STATE_VERSION,
                "first_seen_at": iso_from_epoch(self.first_seen),
                "status": None if self.status is None else self.status.value,
                "code": self.code,
                "event_id": self.event_id,
                "published_at": iso_from_epoch(self.published_at),
                "next_poll_at": iso_from_epoch(self.next_poll),
                "polls": self.polls,
                "misses": self.misses,
                "forget_at": iso_from_epoch(self.forget_at),
                "highest_status": None if self.highest is None else self.highest.value,
                "event_offset": self.event_offset,
                "failures": self.failures,
                "refusals": self.refusals,
                "covered_offset": covered,
            }
        )

    @classmethod
    def decode(cls, value: bytes) -> tuple[OrderState, int | None]:
        """The state in a record and its covered offset; ValueError when it is not one.

        Written by any version: unknown fields are ignored, unknown statuses read as
        `unknown`, fields added since version 1 default.
        """
        try:
            data = _object(orjson.loads(value))
            state = cls(
                first_seen=_required(epoch_from_iso(_text(data["first_seen_at"]))),
                status=_status(data.get("status")),
                code=_code(data.get("code")),
                event_id=_text(data.get("event_id")),
                published_at=epoch_from_iso(_text(data.get("published_at"))),
                next_poll=epoch_from_iso(_text(data.get("next_poll_at"))),
                polls=_count(data.get("polls")),
                misses=_count(data.get("misses")),
                forget_at=epoch_from_iso(_text(data.get("forget_at"))),
                highest=_status(data.get("highest_status")) or _status(data.get("status")),
                event_offset=_offset(data.get("event_offset")),
                failures=_count(data.get("failures")),
                refusals=_count(data.get("refusals")),
            )
            return state, _offset(data.get("covered_offset"))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a state record: {type(exc).__name__}: {exc}") from None


def _object(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    raise TypeError(f"expected a JSON object, got {type(value).__name__}")


def _required(value: float | None) -> float:
    if value is None:
        raise ValueError("a required time is null")
    return value


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"expected text, got {type(value).__name__}")


def _status(value: Any) -> Status | None:
    if value is None:
        return None
    try:
        return Status(value)
    except ValueError:
        return Status.UNKNOWN  # a status of a newer version


def _code(value: Any) -> int | str | None:
    if value is None or (isinstance(value, int | str) and not isinstance(value, bool)):
        return value
    return str(value)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _offset(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(frozen=True, slots=True)
class PublishedEvent:
    """What a status event tells the restore: enough to bring an order's state up to it."""

    status: Status
    code: int | str
    event_id: str
    at: float

    @classmethod
    def decode(cls, record: ConsumerRecord) -> PublishedEvent:
        """ValueError when the record is not a status event."""
        try:
            data = _object(orjson.loads(record.value or b""))
            headers = dict(record.headers or ())
            code = _code(data["provider_status"]["code"])
            at = epoch_from_iso(_text(data.get("observed_at"))) or record.timestamp / 1000
            status = _status(data["status"]) or Status.UNKNOWN
            return cls(status, code if code is not None else "", headers["ce_id"].decode(), at)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a status event: {type(exc).__name__}") from None


@dataclass
class Restored:
    """What restoring some partitions found besides the states themselves."""

    # Orders whose state the status topic brought forward: their records must be
    # written again before the partition's covered offset may pass their events.
    caught_up: dict[int, set[str]] = dataclasses.field(default_factory=dict)
    # The end of each status partition as the restore read it.
    status_ends: dict[int, int] = dataclasses.field(default_factory=dict)
    # Records that could not be read, and why: skipped, and dead-lettered by the worker.
    unreadable: list[tuple[ConsumerRecord, str]] = dataclasses.field(default_factory=list)


class StateStore:
    """The states of the orders in the partitions this worker owns."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._partitions: dict[int, dict[str, OrderState]] = {}

    def get(self, partition: int, key: str) -> OrderState | None:
        return self._partitions.get(partition, {}).get(key)

    def put(self, partition: int, key: str, state: OrderState) -> None:
        self._partitions.setdefault(partition, {})[key] = state

    def remove(self, partition: int, key: str) -> None:
        self._partitions.get(partition, {}).pop(key, None)

    def forget(self, partitions: list[int]) -> None:
        for partition in partitions:
            self._partitions.pop(partition, None)

    def __len__(self) -> int:
        return sum(len(orders) for orders in self._partitions.values())

    def items(self, partition: int) -> list[tuple[str, OrderState]]:
        return list(self._partitions.get(partition, {}).items())

    async def restore(self, partitions: list[int]) -> Restored:
        """Reads `partitions` of the state topic from the beginning (last record per key
        wins), then their status partitions from the covered offset on."""
        started = time.monotonic()
        found = Restored()
        restored: dict[int, dict[str, OrderState]] = {p: {} for p in partitions}
        covered: dict[int, int] = {}
        topic = self._settings.state_topic
        async for record in read_to_end(self._settings, topic, partitions):
            orders = restored[record.partition]
            if record.key is None:
                found.unreadable.append((record, "a state record without a key"))
                continue
            key = record.key.decode(errors="replace")
            if record.value is None:
                orders.pop(key, None)
                continue
            try:
                state, mark = OrderState.decode(record.value)
            except ValueError as exc:
                found.unreadable.append((record, str(exc)))
                continue
            orders[key] = state
            if mark is not None:
                covered[record.partition] = max(covered.get(record.partition, 0), mark)
        caught_up = await self._catch_up(restored, covered, found)
        self._partitions.update(restored)
        log.info(
            "restored %d orders from %s partitions %s in %.2fs (%d brought up to the status topic)",
            sum(len(orders) for orders in restored.values()),
            topic,
            partitions,
            time.monotonic() - started,
            caught_up,
        )
        return found

    async def _catch_up(
        self, restored: dict[int, dict[str, OrderState]], covered: dict[int, int], found: Restored
    ) -> int:
        """Applies the status events the state records do not remember yet."""
        topic = self._settings.status_topic
        start = {p: covered.get(p, 0) for p in restored}
        count = 0
        tail = read_to_end(self._settings, topic, list(restored), start, found.status_ends)
        async for record in tail:
            orders = restored[record.partition]
            if record.key is None:
                continue
            key = record.key.decode(errors="replace")
            known = orders.get(key)
            if known and known.event_offset is not None and record.offset <= known.event_offset:
                continue
            try:
                event = PublishedEvent.decode(record)
            except ValueError as exc:
                found.unreadable.append((record, str(exc)))
                continue
            base = known or OrderState(first_seen=event.at)
            state = base.published(
                event.status, event.code, event.event_id, event.at, record.offset
            )
            # Its schedule went with the state record: ask again at once, which also
            # sets when a final order is forgotten.
            orders[key] = dataclasses.replace(state, next_poll=time.time(), forget_at=None)
            found.caught_up.setdefault(record.partition, set()).add(key)
            count += 1
        return count
