"""Confirming one order, start to finish: for a hint from the inbox or a due poll.

Every confirmation ends in the order's new state record: what was published, and
when to ask again. An order is followed from its first hint until its status is
final, so one whose callbacks never come still reaches a final event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from dataclasses import dataclass

from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from bridge.accounts import Account
from bridge.clock import iso, utc_now
from bridge.config import Config
from bridge.deadletter import Reason, dead_letter
from bridge.errors import OrderNotFound, ProviderError, UnknownAccount
from bridge.events import StatusEvent, Trigger
from bridge.inbox import InboxRecord
from bridge.kafka import Producer
from bridge.metrics import Metrics
from bridge.orders import OrderSnapshot, order_key
from bridge.state import OrderState, StateStore
from bridge.worker.confirm import Confirmer, Unconfirmed, backoff
from bridge.worker.polls import PollSchedule

log = logging.getLogger(__name__)


class Decision(enum.Enum):
    PUBLISH = "publish"
    UNCHANGED = "unchanged"
    # Lower in rank than what was published: a lagging replica or cache answered.
    STALE = "stale"


def decide(previous: OrderState | None, snapshot: OrderSnapshot) -> Decision:
    """Whether a confirmed snapshot is news. Status only moves forward; `unknown` always shows."""
    if previous is None or previous.status is None:
        return Decision.PUBLISH
    if (previous.status, previous.code) == (snapshot.status, snapshot.provider_status.code):
        return Decision.UNCHANGED
    new, old = snapshot.status.rank, previous.status.rank
    if new is not None and old is not None and new < old:
        return Decision.STALE
    return Decision.PUBLISH


@dataclass(frozen=True)
class _Order:
    """The order one confirmation is about."""

    partition: int
    account: Account
    order_id: str
    # The inbox record that asked, when it was not a poll.
    record: InboxRecord | None

    @property
    def key(self) -> str:
        return order_key(self.account.provider, self.account.name, self.order_id)


class HintHandler:
    def __init__(
        self,
        config: Config,
        producer: Producer,
        state: StateStore,
        schedule: PollSchedule,
        confirmer: Confirmer,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._producer = producer
        self._state = state
        self._schedule = schedule
        self._confirmer = confirmer
        self._metrics = metrics

    async def handle(self, partition: int, value: bytes | None) -> None:
        """One inbox record: a callback, watch request or replay."""
        try:
            record = InboxRecord.decode(value or b"")
        except ValueError as exc:
            await self._write_dead_letter("unreadable", str(exc), "?", "?", "?")
            return
        try:
            account = self._config.account(record.provider, record.account)
        except UnknownAccount as exc:
            await self._write_dead_letter(
                "rejected", str(exc), record.provider, record.account, record.order_id, record
            )
            return
        await self._confirm(partition, account, record.order_id, record.trigger, record)

    async def poll(self, partition: int, key: str) -> None:
        """One due poll of an order this worker follows, or forgetting one it no longer does."""
        state = self._state.get(partition, key)
        if state is not None and state.next_poll is None:
            if state.forget_at is not None and time.time() >= state.forget_at:
                # A tombstone: compaction drops the record, restores skip the order.
                await self._send(self._config.kafka.state_topic, key, None)
                self._state.remove(partition, key)
            return
        provider, account_name, order_id = key.split("/", 2)
        try:
            account = self._config.account(provider, account_name)
        except UnknownAccount:
            log.warning("%s: its account is no longer configured; not polled any more", key)
            if state is None:
                self._schedule.set(partition, key, None)
            else:  # no longer followed, so forgotten after `forget_after`
                await self._save(partition, key, state, None, None, None)
            return
        await self._confirm(partition, account, order_id, "poll")

    async def _confirm(
        self,
        partition: int,
        account: Account,
        order_id: str,
        trigger: Trigger,
        record: InboxRecord | None = None,
    ) -> None:
        order = _Order(partition, account, order_id, record)
        try:
            await self._settle(order, trigger)
        except Exception as exc:
            # A bug, ours or an adapter's, on an answer nobody foresaw, or an event Kafka
            # can never take. The hint is kept (replayable) and the order stays
            # followed; the traceback is in the log.
            log.exception("%s: confirming failed unexpectedly", order.key)
            if record is not None:
                detail = f"unexpected {type(exc).__name__}; see the worker's log"
                await self._dead_letter(order, "failed", detail)
            known = self._state.get(partition, order.key) or OrderState(first_seen=time.time())
            next_poll = time.time() + self._config.polling.interval(known.polls)
            await self._finish(order, known, "failed", next_poll)

    async def _settle(self, order: _Order, trigger: Trigger) -> None:
        """Queries the order, publishes what changed, saves its state and next poll."""
        account, order_id = order.account, order.order_id
        previous = self._state.get(order.partition, order.key)
        now = time.time()
        known = previous or OrderState(first_seen=now)
        polling = self._config.polling
        try:
            if trigger == "poll":
                snapshot = await self._confirmer.query(account, order_id, urgent=False)
            else:
                snapshot = await self._confirmer.confirm(account, order_id)
        except OrderNotFound as exc:
            misses = known.misses + 1
            next_poll: float | None = now + polling.interval(misses - 1)
            if misses > polling.not_found_retries:
                await self._dead_letter(order, "not_found", str(exc))
                next_poll = None
            await self._finish(order, known, "not_found", next_poll, misses=misses)
            return
        except Unconfirmed as exc:
            # The hint is dead-lettered, but the order stays followed: polls go on.
            await self._dead_letter(order, "unconfirmed", str(exc), exc.attempts)
            await self._finish(order, known, "unconfirmed", now + polling.interval(0))
            return
        except ProviderError as exc:
            if exc.transient:  # only polls get here: the next poll is their retry
                next_poll = now + polling.interval(known.polls)
                await self._finish(order, known, "poll_failed", next_poll)
                return
            await self._dead_letter(order, "rejected", str(exc))
            await self._finish(order, known, "rejected", None)
            return

        decision = decide(previous, snapshot)
        if decision is Decision.PUBLISH:
            known = await self._publish(order.key, snapshot, known, trigger)
        elif decision is Decision.STALE:
            self._metrics.inc("order_bridge_stale_answers_total", provider=account.provider)
            log.info(
                "%s: provider says %s, %s was published already; asking again soon",
                order.key,
                snapshot.status,
                known.status,
            )
        done = known.status is not None and known.status.is_final
        polls = known.polls + 1 if decision is Decision.UNCHANGED and not done else 0
        next_poll = None if done else now + polling.interval(polls)
        await self._finish(order, known, decision.value, next_poll, polls=polls, misses=0)

    async def _finish(
        self,
        order: _Order,
        known: OrderState,
        outcome: str,
        next_poll: float | None,
        *,
        polls: int | None = None,
        misses: int | None = None,
    ) -> None:
        """Stops following an order past its max age, then saves and schedules it."""
        age = time.time() - known.first_seen
        if next_poll is not None and age > self._config.polling.max_age:
            status = known.status or "unconfirmed"
            detail = f"still {status} after {age / 3600:.1f} h: no longer polled"
            await self._dead_letter(order, "stale", detail)
            next_poll = None
        await self._save(order.partition, order.key, known, next_poll, polls, misses)
        self._metrics.inc(
            "order_bridge_hints_total", provider=order.account.provider, outcome=outcome
        )

    async def _publish(
        self, key: str, snapshot: OrderSnapshot, known: OrderState, trigger: Trigger
    ) -> OrderState:
        event = StatusEvent(
            snapshot=snapshot,
            previous_status=known.status,
            previous_event_id=known.event_id,
            trigger=trigger,
            observed_at=utc_now(),
        )
        # The event first, then the memory of it (saved by the caller): a crash in
        # between re-publishes the same change with the same ce_id, never loses it.
        await self._send(self._config.kafka.status_topic, key, event.value(), event.headers())
        self._metrics.inc("order_bridge_events_published_total", status=snapshot.status.value)
        log.info(
            "%s: %s -> %s (%s, ce_id %s)",
            key,
            known.status or "new",
            snapshot.status,
            trigger,
            event.id,
        )
        return OrderState(
            first_seen=known.first_seen,
            status=snapshot.status,
            code=snapshot.provider_status.code,
            event_id=event.id,
            published_at=event.observed_at.timestamp(),
        )

    async def _save(
        self,
        partition: int,
        key: str,
        known: OrderState,
        next_poll: float | None,
        polls: int | None,
        misses: int | None,
    ) -> None:
        """Writes the order's new state record (when it changed) and schedules its next poll."""
        forget_at = (
            None if next_poll is not None else time.time() + self._config.polling.forget_after
        )
        state = OrderState(
            first_seen=known.first_seen,
            status=known.status,
            code=known.code,
            event_id=known.event_id,
            published_at=known.published_at,
            next_poll=next_poll,
            polls=known.polls if polls is None else polls,
            misses=known.misses if misses is None else misses,
            forget_at=forget_at,
        )
        previous = self._state.get(partition, key)
        if previous is not None and previous.forget_at is not None and forget_at is not None:
            # Already not followed: keep the first forget time, and skip a needless write.
            state = dataclasses.replace(state, forget_at=previous.forget_at)
        if state != previous:
            await self._send(self._config.kafka.state_topic, key, state.encode())
        self._remember(partition, key, state, state.next_due)

    def _remember(
        self, partition: int, key: str, state: OrderState | None, next_poll: float | None
    ) -> None:
        if state is not None:
            self._state.put(partition, key, state)
        self._schedule.set(partition, key, next_poll)

    async def _dead_letter(
        self, order: _Order, reason: Reason, detail: str, attempts: int = 0
    ) -> None:
        provider, account = order.account.provider, order.account.name
        # A poll has no inbox record: one naming the order keeps the dead letter replayable.
        record = order.record or InboxRecord(
            provider, account, order.order_id, "poll", received_at=iso(utc_now())
        )
        await self._write_dead_letter(
            reason, detail, provider, account, order.order_id, record, attempts
        )

    async def _write_dead_letter(
        self,
        reason: Reason,
        detail: str,
        provider: str,
        account: str,
        order_id: str,
        record: InboxRecord | None = None,
        attempts: int = 0,
    ) -> None:
        value, headers = dead_letter(
            reason,
            detail,
            provider=provider,
            account=account,
            order_id=order_id,
            record=record,
            attempts=attempts,
        )
        key = order_key(provider, account, order_id)
        await self._send(self._config.kafka.deadletter_topic, key, value, headers)
        self._metrics.inc("order_bridge_deadletters_total", reason=reason)
        log.warning("dead-lettered %s: %s: %s", key, reason, detail)

    async def _send(
        self,
        topic: str,
        key: str,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Sends until Kafka acks: the work is not done, nor its offset committed, before."""
        attempt = 0
        while True:
            try:
                await self._producer.send(topic, key, value, headers, timeout=30)
            except MessageSizeTooLargeError:
                raise  # no retry can make it fit
            except (KafkaError, TimeoutError) as exc:
                attempt += 1
                delay = backoff(attempt, 0.5, 10.0)
                log.warning("%s: write to %s failed (%r); again in %.1fs", key, topic, exc, delay)
                await asyncio.sleep(delay)
            else:
                return
