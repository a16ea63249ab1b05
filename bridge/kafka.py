"""Kafka plumbing shared by the receiver and the worker: client options, topics, the producer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import ConsumerRecord, RecordMetadata

from bridge.config import KafkaSettings
from bridge.errors import StartupError

log = logging.getLogger(__name__)

CLIENT_ID = "order-bridge"


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Connection options common to every aiokafka client of the bridge."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": CLIENT_ID,
        "security_protocol": settings.security_protocol,
    }
    if settings.sasl_mechanism:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        if settings.sasl_password is not None:
            options["sasl_plain_password"] = settings.sasl_password.reveal()
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(cafile=settings.ssl_cafile)
    return options


async def ensure_topics(settings: KafkaSettings) -> None:
    """Creates the bridge's topics when missing, and checks that their partitions line up.

    Inbox, status and state must have the same partition count: the worker that owns
    inbox partition p finds its orders' memory in state partition p.
    """
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=10_000)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        wanted = {
            settings.inbox_topic: {},
            settings.status_topic: {},
            settings.deadletter_topic: {},
            settings.state_topic: {"cleanup.policy": "compact"},
        }
        missing = [
            NewTopic(name, settings.partitions, settings.replication_factor, topic_configs=configs)
            for name, configs in wanted.items()
            if name not in existing
        ]
        if missing:
            response = await admin.create_topics(missing)
            for name, code, *rest in response.topic_errors:
                # 36: created meanwhile by another bridge process.
                if code not in (0, 36):
                    message = rest[0] if rest and rest[0] else f"error {code}"
                    raise StartupError(f"cannot create topic {name}: {message}")
            log.info("created topics %s", ", ".join(t.name for t in missing))
        counts = await _partition_counts(admin, list(wanted))
    except (KafkaError, OSError) as exc:
        raise StartupError(
            f"Kafka at {settings.bootstrap_servers} is not reachable: {type(exc).__name__}"
        ) from None
    finally:
        await admin.close()
    keyed = [settings.inbox_topic, settings.status_topic, settings.state_topic]
    if len({counts[name] for name in keyed}) != 1:
        found = ", ".join(f"{name} has {counts[name]}" for name in keyed)
        raise StartupError(f"inbox, status and state topics need the same partition count: {found}")


async def _partition_counts(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    counts = {}
    for description in await admin.describe_topics(topics):
        name = description["topic"]
        if description.get("error_code"):
            raise StartupError(
                f"topic {name} cannot be described (error {description['error_code']})"
            )
        counts[name] = len(description["partitions"])
    return counts


async def read_to_end(
    settings: KafkaSettings, topic: str, partitions: list[int] | None = None
) -> AsyncIterator[ConsumerRecord]:
    """Every record of `partitions` of `topic` (all when None), oldest first, up to the
    end they have now; without a consumer group."""
    consumer = AIOKafkaConsumer(
        **client_options(settings), enable_auto_commit=False, fetch_max_wait_ms=50
    )
    try:
        await consumer.start()
        if partitions is None:
            partitions = sorted(consumer.partitions_for_topic(topic) or ())
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            # Bounded batches keep a restore's peak memory low (25% less than unbounded).
            batches = await consumer.getmany(*pending, timeout_ms=200, max_records=500)
            for records in batches.values():
                for record in records:
                    yield record
            for tp in list(pending):
                # Some brokers under-report end_offsets after a batched write: the
                # high-water mark of a fetch is the end that counts.
                end = max(ends[tp], consumer.highwater(tp) or 0)
                if await consumer.position(tp) >= end:
                    pending.discard(tp)
    finally:
        await stop_consumer(consumer)


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """`consumer.stop()`, carried through even when Kafka has just become unreachable.

    aiokafka (aio-libs/aiokafka#647) lets the cancellation of a fetch that is backing
    off after a failure escape from `stop()`, half-way: the caller's task would look
    cancelled and the connections would stay open. Only a cancellation of our own
    task is passed on.
    """
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        fetches = list(consumer._fetcher._pending_tasks)
        for fetch in fetches:
            fetch.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)
        await consumer._client.close()


class Producer:
    """The process's one Kafka producer: acks=all, idempotence as configured."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        if self._producer is not None:
            return
        # Made here, not in __init__: aiokafka warns about a client never closed.
        producer = AIOKafkaProducer(
            **client_options(self._settings),
            acks="all",
            enable_idempotence=self._settings.enable_idempotence,
            linger_ms=2,
            request_timeout_ms=30_000,
        )
        try:
            await producer.start()
        except (KafkaError, OSError) as exc:
            await producer.stop()
            raise StartupError(
                f"Kafka producer cannot start: {type(exc).__name__}: {exc}"
            ) from None
        self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    @property
    def _running(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("the producer is not started")
        return self._producer

    async def send(
        self,
        topic: str,
        key: str,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        timeout: float | None = None,
    ) -> RecordMetadata:
        """Sends one record and waits for the broker's ack (at most `timeout` seconds).

        A send that times out may still be delivered later: callers must tolerate that.
        """
        sent = self._running.send_and_wait(topic, value, key=key.encode(), headers=headers)
        metadata: RecordMetadata = await asyncio.wait_for(sent, timeout)
        return metadata

    async def reachable(self, timeout: float = 2.0) -> bool:
        """Whether the cluster answers a metadata request now."""
        try:
            metadata = self._running.client.fetch_all_metadata()
            return bool(await asyncio.wait_for(metadata, timeout))
        except (KafkaError, OSError, TimeoutError, RuntimeError):
            return False
