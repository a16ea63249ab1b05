"""The worker: a member of the consumer group on the inbox topic.

It takes hints from its partitions, runs each order's hints in order (different
orders at once), and commits an offset only when every hint before it is done.
It also polls the orders of its partitions that are not final yet: polls run in
the same per-order lanes as hints, so one order is never confirmed twice at once.
On a rebalance or SIGTERM it gives in-flight work `drain_timeout` seconds, then
hands the rest back uncommitted: the partitions' next owner does it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from functools import partial

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.protocol.group import LeaveGroupRequest
from aiokafka.structs import ConsumerRecord

from bridge.config import Config
from bridge.kafka import Producer, client_options, stop_consumer
from bridge.metrics import Metrics
from bridge.providers.client import ProviderClient
from bridge.state import Restored, StateStore
from bridge.worker.confirm import Confirmer
from bridge.worker.fence import Fence, Fenced
from bridge.worker.gateway import Gateways
from bridge.worker.handler import HintHandler
from bridge.worker.lanes import OrderLanes
from bridge.worker.offsets import PartitionOffsets
from bridge.worker.polls import PollSchedule
from bridge.worker.writer import OrderWriter

log = logging.getLogger(__name__)

# Seconds an offset commit may take before it is left to the next one.
COMMIT_TIMEOUT = 10.0


class Worker:
    def __init__(
        self, config: Config, producer: Producer, metrics: Metrics, *, user_agent: str
    ) -> None:
        self._config = config
        self._metrics = metrics
        settings = config.worker
        # First: a proxy it cannot use (a ConfigError) leaves nothing else to close.
        # Its own client, not httpx (`bridge.providers.client` says why); traced, each
        # query gets its client span all the same (`bridge.tracing.post`).
        self._client = ProviderClient(user_agent)
        self._consumer = AIOKafkaConsumer(
            **client_options(config.kafka),
            group_id=settings.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(settings.session_timeout * 1000),
            heartbeat_interval_ms=int(settings.heartbeat_interval * 1000),
            # Every hint can wait that long before the worker sees it on some brokers
            # (config.py), and an idle worker sends a fetch this often.
            fetch_max_wait_ms=max(1, round(config.kafka.fetch_max_wait * 1000)),
        )
        self._state = StateStore(config.kafka)
        self._schedule = PollSchedule()
        self._gateways = Gateways(self._client, metrics, settings)
        self._writer = OrderWriter(
            producer, config.kafka, self._state, Fence(settings.session_timeout)
        )
        self._handler = HintHandler(
            config,
            self._writer,
            self._state,
            self._schedule,
            Confirmer(self._gateways, settings),
            metrics,
        )
        self._lanes: dict[int, OrderLanes] = {}
        self._offsets: dict[int, PartitionOffsets] = {}
        # Polls handed to lanes and not finished, by partition: a release drops its count
        # with the partition, since cancelled lanes never run the jobs queued in them.
        self._polls_in_flight: dict[int, int] = {}
        # Partitions whose state is restored; records of the others wait in `_held`.
        self._restored: set[int] = set()
        self._held: dict[int, list[ConsumerRecord]] = {}
        # Since when each partition's hints wait for its restore, and why the last one
        # failed: for /readyz.
        self._held_since: dict[int, float] = {}
        self._restore_problem: str | None = None
        # Hints waiting in their order's lane, by partition and key: a hint for an order
        # whose hints wait already joins them, so they cost one query.
        self._waiting: dict[tuple[int, str], list[ConsumerRecord]] = {}
        # Set when the poll loop should look at the schedule again now.
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        # For the metrics: the offset last committed of each partition, and when each
        # hint taken and not finished was written to the inbox (epoch s), by offset.
        self._committed: dict[int, int] = {}
        self._written_at: dict[int, dict[int, float]] = {}
        metrics.sample("order_bridge_hints_in_flight", lambda: self.in_flight)
        metrics.sample("order_bridge_oldest_hint_age_seconds", self._oldest_hint_age)
        metrics.sample("order_bridge_orders_known", lambda: len(self._state))
        metrics.sample("order_bridge_orders_followed", self._followed)

    @property
    def running(self) -> bool:
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    @property
    def in_flight(self) -> int:
        return sum(offsets.in_flight for offsets in self._offsets.values())

    async def start(self) -> None:
        """Joins the group; hints flow once partitions are assigned and their state restored."""
        if self._tasks:
            return
        self._consumer.subscribe([self._config.kafka.inbox_topic], listener=_Rebalance(self))
        await self._consumer.start()
        self._writer.fence.watch(self._consumer._coordinator)
        self._tasks = [
            asyncio.create_task(self._run(), name="worker inbox"),
            asyncio.create_task(self._poll(), name="worker polls"),
        ]

    async def failure(self) -> str:
        """Waits for one of the worker's loops to end before `stop()`, which only a bug
        makes happen, and says which one and why (the traceback goes to the log)."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        task = done.pop()
        if task.cancelled():
            return f"{task.get_name()} was cancelled"
        exc = task.exception()
        log.error("%s ended", task.get_name(), exc_info=exc)
        return f"{task.get_name()} ended: {type(exc).__name__}"

    async def stop(self) -> None:
        """Stops fetching, lets in-flight hints finish (bounded), commits, leaves the group."""
        if not self._tasks:
            return
        self._stopping = True
        self._wake.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._release(list(self._lanes))
        await self._gateways.aclose()
        await self._client.aclose()
        await self._leave_group()
        await stop_consumer(self._consumer)
        self._tasks = []

    async def _run(self) -> None:
        settings = self._config.worker
        next_commit = time.monotonic() + settings.commit_interval
        while not self._stopping:
            self._apply_backpressure()
            # No more than max_in_flight taken: one fetch can hold thousands of hints.
            room = max(1, settings.max_in_flight - self.in_flight)
            try:
                batches = await self._consumer.getmany(timeout_ms=100, max_records=room)
            except KafkaError as exc:
                log.warning("fetching from the inbox failed: %r", exc)
                await asyncio.sleep(1)
                continue
            for tp, records in batches.items():
                for record in records:
                    self._take(tp.partition, record)
            if time.monotonic() >= next_commit:
                await self._commit()
                next_commit = time.monotonic() + settings.commit_interval

    async def _poll(self) -> None:
        """Hands due polls to their orders' lanes, no more than max_in_flight at once."""
        while not self._stopping:
            room = self._config.worker.max_in_flight - sum(self._polls_in_flight.values())
            for partition, key in self._schedule.due(time.time(), room):
                self._polls_in_flight[partition] = self._polls_in_flight.get(partition, 0) + 1
                lanes = self._lanes.setdefault(partition, OrderLanes())
                lanes.submit(key, partial(self._poll_one, partition, key))
            await self._report_lag()
            next_due = self._schedule.next_due()
            # Handlers schedule new polls without waking this loop: look again soon.
            wait = 0.25 if next_due is None else min(0.25, max(0.01, next_due - time.time()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _poll_one(self, partition: int, key: str) -> None:
        try:
            await self._handler.poll(partition, key)
        except Fenced as exc:
            log.info("%s: a poll handed back unfinished", exc)
        finally:
            if partition in self._polls_in_flight:
                self._polls_in_flight[partition] -= 1

    def _take(self, partition: int, record: ConsumerRecord) -> None:
        offsets = self._offsets.setdefault(partition, PartitionOffsets())
        offsets.started(record.offset)
        self._written_at.setdefault(partition, {})[record.offset] = record.timestamp / 1000
        if partition not in self._restored:
            # aiokafka fetches a new partition while its state is still being restored.
            self._held.setdefault(partition, []).append(record)
            self._held_since.setdefault(partition, time.monotonic())
            return
        self._submit(partition, record)

    def _submit(self, partition: int, record: ConsumerRecord) -> None:
        key = record.key.decode("utf-8", "replace") if record.key else f"offset {record.offset}"
        waiting = self._waiting.get((partition, key))
        if waiting is not None:
            waiting.append(record)
            return
        self._waiting[(partition, key)] = [record]
        lanes = self._lanes.setdefault(partition, OrderLanes())
        if key in lanes and key.count("/") >= 2:
            # The order is busy, maybe with a poll that waits behind other orders' hints
            # for a token: this hint would wait behind it, so it goes with the hints.
            _, account, order_id = key.split("/", 2)
            self._gateways.hurry(account, order_id)
        lanes.submit(key, partial(self._handle, partition, key))

    async def _handle(self, partition: int, key: str) -> None:
        # Hints that arrive from now on wait for a query of their own: this one may
        # have been asked before their change.
        records = self._waiting.pop((partition, key), [])
        try:
            await self._handler.handle(partition, records)
        except asyncio.CancelledError:
            # Handed back by a drain: the offsets stay uncommitted, for the next owner.
            raise
        except Fenced as exc:
            log.info("%s: handed back unfinished", exc)
            return
        except Exception:
            offset = records[0].offset if records else -1
            log.exception("hint at inbox partition %d offset %d failed", partition, offset)
        offsets = self._offsets.get(partition)
        written_at = self._written_at.get(partition, {})
        if offsets is not None:
            for record in records:
                offsets.finished(record.offset)
                written_at.pop(record.offset, None)

    def _apply_backpressure(self) -> None:
        # Pausing, rather than not polling, keeps the consumer's group membership alive.
        assigned = self._consumer.assignment()
        if self.in_flight >= self._config.worker.max_in_flight:
            self._consumer.pause(*assigned)
        elif self._consumer.paused():
            self._consumer.resume(*assigned)

    async def _commit(self, partitions: list[int] | None = None) -> None:
        topic = self._config.kafka.inbox_topic
        chosen = self._offsets if partitions is None else partitions
        offsets = {p: self._offsets[p].to_commit() for p in chosen if p in self._offsets}
        ready = {TopicPartition(topic, p): o for p, o in offsets.items() if o is not None}
        if not ready:
            return
        try:
            # Bounded: aiokafka looks for the group coordinator for as long as Kafka is away.
            await asyncio.wait_for(self._consumer.commit(ready), COMMIT_TIMEOUT)
        except (KafkaError, TimeoutError) as exc:
            # Not fatal: the next commit covers these offsets too, or the next owner
            # does these hints again.
            log.warning("committing inbox offsets failed: %r", exc)
            return
        for tp, offset in ready.items():
            if (partition := self._offsets.get(tp.partition)) is not None:
                partition.committed(offset)
                self._committed[tp.partition] = offset

    async def _release(self, partitions: list[int]) -> None:
        """Finishes (within drain_timeout) or hands back the hints of `partitions`."""
        # First, so that no poll of these partitions starts while they drain.
        self._schedule.forget(partitions)
        timeout = self._config.worker.drain_timeout
        lanes = [self._lanes[p] for p in partitions if p in self._lanes]
        cancelled = sum(await asyncio.gather(*(lane.drain(timeout) for lane in lanes)))
        if cancelled:
            log.warning("handed back %d orders' hints unfinished", cancelled)
        # Nothing more is written for these partitions, and what was sent lands before
        # the next owner restores them.
        await self._writer.close(partitions, timeout)
        await self._commit(partitions)
        for partition in partitions:
            self._lanes.pop(partition, None)
            self._offsets.pop(partition, None)
            self._polls_in_flight.pop(partition, None)
            self._held.pop(partition, None)
            self._held_since.pop(partition, None)
            self._committed.pop(partition, None)
            self._written_at.pop(partition, None)
            self._metrics.forget("order_bridge_inbox_lag", partition=str(partition))
        self._waiting = {k: v for k, v in self._waiting.items() if k[0] not in partitions}
        self._restored.difference_update(partitions)
        self._state.forget(partitions)

    async def _assigned(self, partitions: list[int]) -> None:
        # Hints must not run before their orders' state is back: without it the
        # forward-only rule cannot hold. So a restore that fails is tried again, until
        # the worker stops: aiokafka's stop() waits for this listener to return.
        self._writer.fence.renew()
        while True:
            if self._stopping:
                return
            try:
                found = await self._state.restore(partitions)
                await self._open(partitions, found)
                break
            except (KafkaError, OSError) as exc:
                self._restore_problem = f"restoring state of partitions {partitions} failed"
                log.warning("%s (%r); again in 1s", self._restore_problem, exc)
                await asyncio.sleep(1)
        self._restore_problem = None
        for partition in partitions:
            self._schedule.own(partition)
            for key, state in self._state.items(partition):
                self._schedule.set(partition, key, state.next_due)
            self._restored.add(partition)
            self._held_since.pop(partition, None)
            for record in self._held.pop(partition, []):
                self._submit(partition, record)
        self._wake.set()
        topic_partitions = self._consumer.partitions_for_topic(self._config.kafka.inbox_topic)
        total = len(topic_partitions or ()) or self._config.kafka.partitions
        self._gateways.share(len(self._restored), total)
        log.info("owning inbox partitions %s", sorted(partitions))

    async def _open(self, partitions: list[int], found: Restored) -> None:
        """Opens restored partitions for writing, once the records nobody can read are
        in the dead-letter topic. Orders the status topic brought forward are polled at
        once, which saves their state: until then, their events are not covered."""
        for record, problem in found.unreadable:
            await self._handler.unreadable(record, problem)
        for partition in partitions:
            states = [self._state.get(partition, key) for key in found.caught_up.get(partition, ())]
            unsaved = {s.event_offset for s in states if s and s.event_offset is not None}
            self._writer.open(partition, found.status_ends.get(partition, 0), unsaved)

    async def _report_lag(self) -> None:
        """Sets each owned partition's inbox lag: its high watermark (known once fetched
        from) minus the offset committed, or the position read from before a commit."""
        assigned = self._consumer.assignment()
        highwaters = {tp: self._consumer.highwater(tp) for tp in assigned}
        for tp, highwater in highwaters.items():
            if highwater is None:
                continue
            done = self._committed.get(tp.partition)
            if done is None:
                # Valid once the partition was fetched from: no wait, unless reset.
                with contextlib.suppress(IllegalStateError, TimeoutError):
                    async with asyncio.timeout(1):
                        done = await self._consumer.position(tp)
            if done is not None:
                lag = max(0, highwater - done)
                self._metrics.set("order_bridge_inbox_lag", lag, partition=str(tp.partition))

    def _oldest_hint_age(self) -> float:
        """Seconds since the oldest hint not finished was written to the inbox; 0 if none."""
        # Offsets are taken in order, so each partition's first is its oldest.
        firsts = [next(iter(taken.values())) for taken in self._written_at.values() if taken]
        return max(0.0, time.time() - min(firsts)) if firsts else 0.0

    def _followed(self) -> int:
        """Orders whose next poll is scheduled, not those only kept until forgotten."""
        return sum(
            state.next_poll is not None
            for partition in self._restored
            for _, state in self._state.items(partition)
        )

    def degraded(self) -> list[str]:
        """Accounts whose circuit breaker is open: their queries wait, nothing fails."""
        return self._gateways.degraded()

    def problems(self) -> list[str]:
        """What keeps the worker from confirming hints; empty when nothing does."""
        found = []
        if not self.running:
            found.append("the worker is not running")
        if self._restore_problem:
            found.append(self._restore_problem)
        stalled = self._config.worker.stall_after
        now = time.monotonic()
        waiting = sorted(p for p, since in self._held_since.items() if now - since > stalled)
        if waiting:
            found.append(f"hints of partitions {waiting} wait for their state over {stalled:g}s")
        return found

    async def _leave_group(self) -> None:
        # Tansu numbers a group's first generation 0, and aiokafka only leaves from
        # generation 1 on, so a stopped first member would hold its partitions until its
        # session expires. Leaving explicitly is what Kafka itself expects anyway.
        coordinator = getattr(self._consumer, "_coordinator", None)
        if coordinator is not None and coordinator.generation == 0 and coordinator.member_id:
            with contextlib.suppress(KafkaError, OSError):
                await coordinator._send_req(
                    LeaveGroupRequest(coordinator.group_id, coordinator.member_id)
                )


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._worker._release([tp.partition for tp in revoked])

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._worker._assigned([tp.partition for tp in assigned])
