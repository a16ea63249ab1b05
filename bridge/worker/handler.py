"""Confirming one order, start to finish: for hints from the inbox or a due poll.

Every confirmation ends in the order's new state record: what was published, and
when to ask again. An order is followed from its first hint until its status is
final, so one whose callbacks never come still reaches a final event. The order's
event and state are written by `OrderWriter`, the one sequence that survives a crash.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from dataclasses import dataclass

from aiokafka.structs import ConsumerRecord

from bridge import tracing
from bridge.accounts import Account
from bridge.clock import epoch_from_iso, iso, utc_now
from bridge.config import Config
from bridge.deadletter import Reason, dead_letter, unreadable_dead_letter
from bridge.errors import OrderNotFound, ProviderError, UnknownAccount
from bridge.events import StatusEvent, Trigger
from bridge.inbox import InboxRecord
from bridge.logs import order_fields
from bridge.metrics import Metrics
from bridge.orders import OrderSnapshot, order_key
from bridge.redact import shown
from bridge.state import OrderState, StateStore
from bridge.worker.confirm import Confirmer, Unconfirmed
from bridge.worker.fence import Fenced
from bridge.worker.flood import HintBudget
from bridge.worker.polls import PollSchedule
from bridge.worker.writer import OrderWriter

log = logging.getLogger(__name__)


class Decision(enum.Enum):
    PUBLISH = "publish"
    UNCHANGED = "unchanged"
    # Lower in rank than what was published: a lagging replica or cache answered.
    STALE = "stale"


def decide(previous: OrderState | None, snapshot: OrderSnapshot) -> Decision:
    """Whether a confirmed snapshot is news. Status only moves forward from the highest
    rank ever published; `unknown` always shows, and never reopens a lower status."""
    if previous is None or previous.status is None:
        return Decision.PUBLISH
    if (previous.status, previous.code) == (snapshot.status, snapshot.provider_status.code):
        return Decision.UNCHANGED
    highest = previous.highest or previous.status
    new, top = snapshot.status.rank, highest.rank
    if new is not None and top is not None and new < top:
        return Decision.STALE
    return Decision.PUBLISH


def _claims_other_code(record: InboxRecord | None, known: OrderState) -> bool:
    """Whether a callback claims another provider code than the one published."""
    claimed = None if record is None else record.claimed_status
    return claimed is not None and claimed != str(known.code)


def _only_polled_again(state: OrderState, written: OrderState | None, last_rung: int) -> bool:
    """Whether `state` differs from `written` only by more polls at the polling ladder's
    last interval, and so a later next poll. Such a state needs no record of its own: a
    restore from `written` polls the order sooner, at the same interval, and that is all.
    Most polls of a long-followed order are these: at the defaults, 288 of 3 days' 293.
    """
    if written is None or written.next_poll is None or state.next_poll is None:
        return False
    if min(state.polls, written.polls) < last_rung:
        return False
    return dataclasses.replace(state, next_poll=written.next_poll, polls=written.polls) == written


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
        writer: OrderWriter,
        state: StateStore,
        schedule: PollSchedule,
        confirmer: Confirmer,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._writer = writer
        self._state = state
        self._schedule = schedule
        self._confirmer = confirmer
        self._metrics = metrics
        self._budget = HintBudget(config.worker.unverified_hints_per_minute)

    async def handle(self, partition: int, records: list[ConsumerRecord]) -> None:
        """Inbox records of one order (callbacks, watch requests, replays) that waited
        together: one confirmation answers them all."""
        hints = []
        for raw in records:
            try:
                hints.append(InboxRecord.decode(raw.value or b""))
            except ValueError as exc:
                await self.unreadable(raw, str(exc))
        if not hints:
            return
        # One that no flood can forge first: a signed callback, a watch request, a replay.
        trusted = (h for h in hints if h.signature_rule or h.trigger != "callback")
        record = next(trusted, hints[-1])
        if len(hints) > 1:
            self._metrics.inc("order_bridge_hints_coalesced_total", provider=record.provider)
        try:
            account = self._config.account(record.provider, record.account)
        except UnknownAccount as exc:
            for hint in hints:
                await self._write_dead_letter(
                    "rejected", str(exc), hint.provider, hint.account, hint.order_id, hint
                )
            return
        order = _Order(partition, account, record.order_id, record)
        known = self._state.get(partition, order.key)
        # An order confirmed and still followed is real, and its hints are coalesced: they
        # need no share of the budget, nor wait behind the polls of made-up ids.
        followed = known is not None and known.status is not None and known.next_poll is not None
        unverified = record.trigger == "callback" and not record.signature_rule
        if unverified and not followed and not self._budget.take(account.name):
            await self._poll_soon(order, known)
            return
        span = f"confirm {record.trigger}"
        with tracing.resumed(record.traceparent, span, {"order_bridge.order_key": order.key}):
            await self._confirm(order, record.trigger)

    async def unreadable(self, record: ConsumerRecord, problem: str) -> None:
        """Keeps a record that cannot be read in the dead-letter topic, and skips it."""
        value, headers = unreadable_dead_letter(record, problem)
        key = record.key.decode("utf-8", "replace") if record.key else "?"
        await self._writer.send(self._config.kafka.deadletter_topic, key, value, headers)
        self._metrics.inc("order_bridge_deadletters_total", reason="unreadable")
        log.error(
            "skipped an unreadable record at %s partition %d offset %d: %s",
            record.topic,
            record.partition,
            record.offset,
            shown(problem),
        )

    async def poll(self, partition: int, key: str) -> None:
        """One due poll of an order this worker follows, or forgetting one it no longer does."""
        state = self._state.get(partition, key)
        if state is not None and state.next_poll is None:
            if state.forget_at is not None and time.time() >= state.forget_at:
                await self._writer.forget(partition, key)
            return
        provider, account_name, order_id = key.split("/", 2)
        try:
            account = self._config.account(provider, account_name)
        except UnknownAccount:
            log.warning("%s: its account is no longer configured; not polled any more", shown(key))
            if state is None:
                self._schedule.set(partition, key, None)
            else:  # no longer followed, so forgotten after `forget_after`
                await self._save(partition, key, state, state, next_poll=None)
            return
        with tracing.resumed(None, "confirm poll", {"order_bridge.order_key": key}):
            await self._confirm(_Order(partition, account, order_id, None), "poll")

    async def _poll_soon(self, order: _Order, known: OrderState | None) -> None:
        """Over the flood guard's budget: the hint waits for a poll of its order, now for
        an order confirmed before; after the first interval for one never confirmed,
        which may be made up, so that a flood of them is spread out."""
        self._metrics.inc(
            "order_bridge_hints_total", provider=order.account.provider, outcome="deferred"
        )
        now = time.time()
        confirmed = known is not None and known.status is not None
        due = now if confirmed else now + self._config.polling.interval(0)
        if known is not None and known.next_poll is not None and known.next_poll <= due:
            return
        base = known or OrderState(first_seen=now)
        await self._save(order.partition, order.key, base, known, next_poll=due)

    async def _confirm(self, order: _Order, trigger: Trigger) -> None:
        written = self._state.get(order.partition, order.key)
        try:
            await self._settle(order, trigger, written)
        except Fenced:
            raise  # the partition's next owner does it again
        except Exception as exc:
            # A bug, ours or an adapter's, on an answer nobody foresaw, or an event Kafka
            # can never take. The hint is kept (replayable) and the order stays
            # followed; the traceback is in the log.
            log.exception("%s: confirming failed unexpectedly", shown(order.key))
            if order.record is not None:
                detail = f"unexpected {type(exc).__name__}; see the worker's log"
                await self._dead_letter(order, "failed", detail)
            now = time.time()
            known = self._state.get(order.partition, order.key) or OrderState(first_seen=now)
            next_poll = now + self._config.polling.interval(known.polls)
            # Written whatever its record holds: the memory may have moved past it.
            await self._finish(order, known, None, "failed", next_poll)

    async def _settle(self, order: _Order, trigger: Trigger, written: OrderState | None) -> None:
        """Queries the order, publishes what changed, saves its state and next poll."""
        account, order_id = order.account, order.order_id
        now = time.time()
        known = written or OrderState(first_seen=now)
        polling = self._config.polling
        try:
            if trigger == "poll":
                snapshot = await self._confirmer.query(account, order_id, urgent=False)
            else:
                snapshot = await self._confirmer.confirm(account, order_id)
        except OrderNotFound as exc:
            if known.status is not None:
                # It was confirmed before: the provider's answer is a glitch, retried
                # by the next poll like any transient error.
                await self._failed(order, known, written, "not_found_glitch", None)
                return
            misses = known.misses + 1
            next_poll: float | None = now + polling.interval(misses - 1)
            if misses > polling.not_found_retries:
                await self._dead_letter(order, "not_found", str(exc))
                next_poll = None
            known = dataclasses.replace(known, misses=misses)
            await self._finish(order, known, written, "not_found", next_poll)
            return
        except Unconfirmed as exc:
            # The hint is dead-lettered, but the order stays followed: polls go on.
            await self._dead_letter(order, "unconfirmed", str(exc), exc.attempts)
            await self._finish(order, known, written, "unconfirmed", now + polling.interval(0))
            return
        except ProviderError as exc:
            # Transient (only polls get here: the next poll is their retry), or permanent,
            # such as a key rotated at the provider: either way the order stays followed.
            outcome = "query_failed" if exc.transient else "rejected"
            await self._failed(order, known, written, outcome, exc)
            return

        decision = decide(written, snapshot)
        if decision is Decision.PUBLISH:
            known = await self._publish(order, snapshot, known, trigger)
        elif decision is Decision.STALE:
            self._metrics.inc("order_bridge_stale_answers_total", provider=account.provider)
            log.info(
                "%s: provider says %s, %s was published already; asking again soon",
                shown(order.key),
                snapshot.status,
                known.highest or known.status,
            )
        # A final order is followed no more, unless the answer may come from a lagging
        # replica: a lower rank than published, or another code than a callback claims.
        # Then it is asked again, as long as the polling ladder is.
        lagging = decision is Decision.STALE or (
            decision is Decision.UNCHANGED and _claims_other_code(order.record, known)
        )
        polls = 0 if decision is Decision.PUBLISH else known.polls + 1
        final = known.status is not None and known.status.is_final
        followed = not final or (lagging and polls <= len(polling.intervals))
        if (known.polls, known.misses, known.failures, known.refusals) != (polls, 0, 0, 0):
            # Not for nothing: a replace is ~9 us, and most answers change none of these.
            known = dataclasses.replace(known, polls=polls, misses=0, failures=0, refusals=0)
        next_poll = now + polling.interval(polls) if followed else None
        await self._finish(order, known, written, decision.value, next_poll)

    async def _failed(
        self,
        order: _Order,
        known: OrderState,
        written: OrderState | None,
        outcome: str,
        error: ProviderError | None,
    ) -> None:
        """A query that failed for an order that stays followed: asked again later,
        backing off; a permanent error is dead-lettered once an incident (and for
        every hint, which is replayable)."""
        permanent = error is not None and not error.transient
        if permanent and (order.record is not None or known.refusals == 0):
            await self._dead_letter(order, "rejected", str(error))
        next_poll = time.time() + self._config.polling.interval(known.failures)
        known = dataclasses.replace(
            known, failures=known.failures + 1, refusals=known.refusals + permanent
        )
        await self._finish(order, known, written, outcome, next_poll)

    async def _finish(
        self,
        order: _Order,
        known: OrderState,
        written: OrderState | None,
        outcome: str,
        next_poll: float | None,
    ) -> None:
        """Stops following an order past its max age, then saves and schedules it."""
        age = time.time() - known.first_seen
        if next_poll is not None and age > self._config.polling.max_age:
            status = known.status or "unconfirmed"
            detail = f"still {status} after {age / 3600:.1f} h: no longer polled"
            await self._dead_letter(order, "stale", detail)
            next_poll = None
        await self._save(order.partition, order.key, known, written, next_poll=next_poll)
        self._metrics.inc(
            "order_bridge_hints_total", provider=order.account.provider, outcome=outcome
        )

    async def _publish(
        self, order: _Order, snapshot: OrderSnapshot, known: OrderState, trigger: Trigger
    ) -> OrderState:
        event = StatusEvent(
            snapshot=snapshot,
            previous_status=known.status,
            previous_event_id=known.event_id,
            trigger=trigger,
            observed_at=utc_now(),
        )
        published = await self._writer.publish(order.partition, order.key, event, known)
        self._metrics.inc("order_bridge_events_published_total", status=snapshot.status.value)
        if trigger == "callback" and order.record is not None:
            self._observe_callback_to_event(order.account.provider, order.record.received_at)
        # Its fields take a dict and a parse of the key: not worth making for nothing.
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s: %s -> %s (%s, ce_id %s)",
                shown(order.key),
                known.status or "new",
                snapshot.status,
                trigger,
                event.id,
                extra={**order_fields(order.key), "ce_id": event.id},
            )
        return published

    def _observe_callback_to_event(self, provider: str, received_at: str) -> None:
        try:
            received = epoch_from_iso(received_at) or 0.0
        except ValueError:
            return  # written by something other than a receiver: no latency to tell
        waited = max(0.0, time.time() - received)
        self._metrics.observe("order_bridge_callback_to_event_seconds", waited, provider=provider)

    async def _save(
        self,
        partition: int,
        key: str,
        known: OrderState,
        written: OrderState | None,
        *,
        next_poll: float | None,
    ) -> None:
        """Writes the order's state record (unless `written`, what it holds, is the same)
        and schedules its next poll, or when it is forgotten."""
        forget_at = None
        if next_poll is None:
            # Already not followed: keep the first forget time.
            forget_at = (written.forget_at if written else None) or (
                time.time() + self._config.polling.forget_after
            )
        state = dataclasses.replace(known, next_poll=next_poll, forget_at=forget_at)
        last_rung = len(self._config.polling.intervals) - 1
        unchanged = state == written or _only_polled_again(state, written, last_rung)
        await self._writer.save(partition, key, state, written=unchanged)
        self._schedule.set(partition, key, state.next_due)

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
        await self._writer.send(self._config.kafka.deadletter_topic, key, value, headers)
        self._metrics.inc("order_bridge_deadletters_total", reason=reason)
        fields = order_fields(key)
        log.warning(
            "dead-lettered %s: %s: %s", shown(key), reason, shown(detail, 300), extra=fields
        )
