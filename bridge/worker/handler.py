"""One hint, start to finish: confirm the order, then publish what changed or dead-letter."""

from __future__ import annotations

import asyncio
import enum
import logging

from aiokafka.errors import KafkaError

from bridge.config import Config
from bridge.deadletter import Reason, dead_letter
from bridge.errors import OrderNotFound, ProviderError, UnknownAccount
from bridge.events import StatusEvent, iso, utc_now
from bridge.inbox import InboxRecord
from bridge.kafka import Producer
from bridge.metrics import Metrics
from bridge.orders import OrderSnapshot
from bridge.state import OrderState, StateStore
from bridge.worker.confirm import Confirmer, Unconfirmed, backoff

log = logging.getLogger(__name__)


class Decision(enum.Enum):
    PUBLISH = "publish"
    UNCHANGED = "unchanged"
    # Lower in rank than what was published: a lagging replica or cache answered.
    STALE = "stale"


def decide(previous: OrderState | None, snapshot: OrderSnapshot) -> Decision:
    """Whether a confirmed snapshot is news. Status only moves forward; `unknown` always shows."""
    if previous is None:
        return Decision.PUBLISH
    if (previous.status, previous.code) == (snapshot.status, snapshot.provider_status.code):
        return Decision.UNCHANGED
    new, old = snapshot.status.rank, previous.status.rank
    if new is not None and old is not None and new < old:
        return Decision.STALE
    return Decision.PUBLISH


class HintHandler:
    def __init__(
        self,
        config: Config,
        producer: Producer,
        state: StateStore,
        confirmer: Confirmer,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._producer = producer
        self._state = state
        self._confirmer = confirmer
        self._metrics = metrics

    async def handle(self, partition: int, value: bytes | None) -> None:
        try:
            record = InboxRecord.decode(value or b"")
        except ValueError as exc:
            await self._dead_letter("unreadable", str(exc), "?", "?")
            return
        try:
            account = self._config.account(record.provider, record.account)
        except UnknownAccount as exc:
            await self._dead_letter("rejected", str(exc), record.provider, record.account, record)
            return
        settings = self._config.worker
        for stale_attempt in range(settings.stale_retries + 1):
            try:
                snapshot = await self._confirmer.confirm(account, record.order_id)
            except Unconfirmed as exc:
                await self._dead_letter(
                    "unconfirmed", str(exc), account.provider, account.name, record, exc.attempts
                )
                return
            except OrderNotFound as exc:
                await self._dead_letter(
                    "not_found", str(exc), account.provider, account.name, record
                )
                return
            except ProviderError as exc:
                await self._dead_letter(
                    "rejected", str(exc), account.provider, account.name, record
                )
                return
            previous = self._state.get(partition, record.key)
            decision = decide(previous, snapshot)
            if decision is Decision.PUBLISH:
                await self._publish(partition, record, snapshot, previous)
            elif decision is Decision.STALE:
                assert previous is not None
                self._metrics.inc("order_bridge_stale_answers_total", provider=account.provider)
                log.info(
                    "%s: provider says %s, %s was published already; asking again later",
                    record.key,
                    snapshot.status,
                    previous.status,
                )
                if stale_attempt < settings.stale_retries:
                    await asyncio.sleep(
                        backoff(stale_attempt + 1, settings.retry_initial, settings.retry_max)
                    )
                    continue
            self._metrics.inc(
                "order_bridge_hints_total", provider=account.provider, outcome=decision.value
            )
            return

    async def _publish(
        self,
        partition: int,
        record: InboxRecord,
        snapshot: OrderSnapshot,
        previous: OrderState | None,
    ) -> None:
        event = StatusEvent(
            snapshot=snapshot,
            previous_status=None if previous is None else previous.status,
            previous_event_id=None if previous is None else previous.event_id,
            trigger=record.trigger,
            observed_at=utc_now(),
        )
        kafka = self._config.kafka
        # The event first, then the memory of it: a crash in between re-publishes the
        # same change with the same ce_id, never loses it.
        await self._send(kafka.status_topic, record.key, event.value(), event.headers())
        state = OrderState(
            status=snapshot.status,
            code=snapshot.provider_status.code,
            event_id=event.id,
            published_at=iso(event.observed_at),
        )
        await self._send(kafka.state_topic, record.key, state.encode())
        self._state.put(partition, record.key, state)
        self._metrics.inc("order_bridge_events_published_total", status=snapshot.status.value)
        log.info(
            "%s: %s -> %s (%s, ce_id %s)",
            record.key,
            event.previous_status or "new",
            snapshot.status,
            record.trigger,
            event.id,
        )

    async def _dead_letter(
        self,
        reason: Reason,
        detail: str,
        provider: str,
        account: str,
        record: InboxRecord | None = None,
        attempts: int = 0,
    ) -> None:
        value, headers = dead_letter(
            reason,
            detail,
            provider=provider,
            account=account,
            order_id=None if record is None else record.order_id,
            record=record,
            attempts=attempts,
        )
        key = record.key if record is not None else f"{provider}/{account}"
        await self._send(self._config.kafka.deadletter_topic, key, value, headers)
        self._metrics.inc("order_bridge_deadletters_total", reason=reason)
        self._metrics.inc("order_bridge_hints_total", provider=provider, outcome=reason)
        log.warning("dead-lettered %s: %s: %s", key, reason, detail)

    async def _send(
        self, topic: str, key: str, value: bytes, headers: list[tuple[str, bytes]] | None = None
    ) -> None:
        """Sends until Kafka acks: the hint is not done, nor its offset committed, before."""
        attempt = 0
        while True:
            try:
                await self._producer.send(topic, key, value, headers, timeout=30)
            except (KafkaError, TimeoutError) as exc:
                attempt += 1
                delay = backoff(attempt, 0.5, 10.0)
                log.warning("%s: write to %s failed (%r); again in %.1fs", key, topic, exc, delay)
                await asyncio.sleep(delay)
            else:
                return
