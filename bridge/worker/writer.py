"""Writing an order's event and state record: the one sequence that survives a crash.

The status topic is the truth of what was published; the state record is the memory
of it, written after. For one change:

1. the event is sent to the status topic and acked (acks=all): it is published, and
   the worker's memory of the order moves to it at once;
2. the state record is sent and acked. It names the event's offset, and the offset of
   the status partition below which every event is remembered by a state record
   already acked (`covered`).

A crash after 1 and before 2 leaves the state record behind the status topic. The
next owner restores the state partition, then reads the status partition from the
highest `covered` offset to its end and applies the events it finds (`StateStore`),
so it knows every published change before it runs a hint: the previous_status chain
and the forward-only rule hold, and a change asked again gets the same ce_id.

Why not an outbox (the state record carrying the intended event, written first)?
It takes the same two acked writes in turn, plus a third to mark the event sent, or
else every restore re-publishes every order's last event; and it keeps a second copy
of what consumers already hold. With the status topic as the truth, the state record
is a checkpoint, and the tail a restore reads is the few events since the last one.

Writes go only to partitions the worker owns while its group session lives
(`Fence`): a worker that lost its partitions writes nothing more for them.
"""

from __future__ import annotations

import asyncio
import logging
import os

from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.structs import RecordMetadata

from bridge import tracing
from bridge.config import KafkaSettings
from bridge.events import StatusEvent
from bridge.kafka import Producer
from bridge.state import OrderState, StateStore
from bridge.worker.confirm import backoff
from bridge.worker.fence import Fence

log = logging.getLogger(__name__)

# A testing aid: `ORDER_BRIDGE_CRASH_AT=event_acked:3` ends the process the third time
# the write sequence reaches that step, as a SIGKILL would.
CRASH_STEPS = ("event_sent", "event_acked", "state_sent", "state_acked")
_CRASH_AT = os.environ.get("ORDER_BRIDGE_CRASH_AT", "")


class _CrashPoint:
    def __init__(self, spec: str) -> None:
        step, _, count = spec.partition(":")
        self.step = step if step in CRASH_STEPS else None
        self.left = int(count) if count.isdigit() else 1

    def reached(self, step: str) -> None:
        if step == self.step:
            self.left -= 1
            if self.left <= 0:
                os._exit(86)


class _Coverage:
    """Which status offsets of one partition are remembered by acked state records."""

    def __init__(self, end: int, pending: set[int]) -> None:
        self._pending = pending
        self._end = end

    def event_acked(self, offset: int) -> None:
        self._pending.add(offset)
        self._end = max(self._end, offset + 1)

    def state_acked(self, offset: int) -> None:
        self._pending.discard(offset)

    def pending(self, offset: int | None) -> bool:
        """Whether the event at `offset` is acked and no state record covers it yet."""
        return offset in self._pending

    @property
    def covered(self) -> int:
        """Every event below this offset is remembered by a state record already acked.

        Events still in flight land above it: a partition's offsets grow in ack order.
        """
        return min(self._pending) if self._pending else self._end


class OrderWriter:
    def __init__(
        self, producer: Producer, settings: KafkaSettings, store: StateStore, fence: Fence
    ) -> None:
        self._producer = producer
        self._settings = settings
        self._store = store
        self.fence = fence
        self._coverage: dict[int, _Coverage] = {}
        self._crash = _CrashPoint(_CRASH_AT)

    def open(self, partition: int, status_end: int, unsaved: set[int]) -> None:
        """Starts writing for `partition`, whose status topic ends at `status_end`: every
        event before it is remembered by a state record but those at offsets `unsaved`,
        whose orders the restore brought forward and must save again."""
        self._coverage[partition] = _Coverage(status_end, set(unsaved))
        self.fence.grant([partition])

    async def close(self, partitions: list[int], timeout: float) -> None:
        """Stops writing for `partitions`, then waits (up to `timeout` seconds) for the
        writes already sent to land: none may land after the next owner restored."""
        self.fence.revoke(partitions)
        for partition in partitions:
            self._coverage.pop(partition, None)
        if not await self._producer.flush(timeout):
            log.warning("writes for partitions %s still unacked after %gs", partitions, timeout)

    async def publish(
        self, partition: int, key: str, event: StatusEvent, known: OrderState
    ) -> OrderState:
        """Sends `event` and returns once it is acked, with the order's memory moved to
        it. Its state record is not written yet: `save()` does that."""
        self._crash.reached("event_sent")
        headers = [*event.headers(), *tracing.kafka_headers()]
        metadata = await self.send(
            self._settings.status_topic, key, event.value(), headers, partition=partition
        )
        self._crash.reached("event_acked")
        if (coverage := self._coverage.get(partition)) is not None:
            coverage.event_acked(metadata.offset)
        state = known.published(
            event.snapshot.status,
            event.snapshot.provider_status.code,
            event.id,
            event.observed_at.timestamp(),
            metadata.offset,
        )
        # At once, so that whatever happens next to the order starts from this event.
        self._store.put(partition, key, state)
        return state

    async def save(self, partition: int, key: str, state: OrderState, written: bool) -> None:
        """Makes `state` the order's memory and, unless its record holds it already
        (`written`), writes it as its state record. The record is written anyway while
        the order's event is not covered by one (a restore brought it forward from the
        status topic): until then every restore reads the status topic from there."""
        self._store.put(partition, key, state)
        coverage = self._coverage.get(partition)
        if written and (coverage is None or not coverage.pending(state.event_offset)):
            return
        covered = None if coverage is None else coverage.covered
        self._crash.reached("state_sent")
        value = state.encode(covered)
        await self.send(self._settings.state_topic, key, value, partition=partition)
        self._crash.reached("state_acked")
        if coverage is not None and state.event_offset is not None:
            coverage.state_acked(state.event_offset)

    async def forget(self, partition: int, key: str) -> None:
        """A tombstone for the order: compaction drops its record, restores skip it."""
        await self.send(self._settings.state_topic, key, None, partition=partition)
        self._store.remove(partition, key)

    async def send(
        self,
        topic: str,
        key: str,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        *,
        partition: int | None = None,
    ) -> RecordMetadata:
        """Sends until Kafka acks: the work is not done, nor its inbox offset committed,
        before. A record for inbox `partition` goes to that partition of `topic`, and
        only while the partition is this worker's (`Fenced` once it is not)."""
        attempt = 0
        while True:
            if partition is not None:
                await self.fence.check(partition)
            try:
                return await self._producer.send(
                    topic, key, value, headers, timeout=30, partition=partition
                )
            except MessageSizeTooLargeError:
                raise  # no retry can make it fit
            except (KafkaError, TimeoutError) as exc:
                attempt += 1
                delay = backoff(attempt, 0.5, 10.0)
                log.warning("%s: write to %s failed (%r); again in %.1fs", key, topic, exc, delay)
                await asyncio.sleep(delay)
