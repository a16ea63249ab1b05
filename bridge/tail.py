"""`order-bridge tail`: the status topic, one readable line an event."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from bridge.config import KafkaSettings
from bridge.errors import StartupError
from bridge.kafka import client_options, stop_consumer


@dataclass(frozen=True)
class Event:
    key: str
    headers: dict[str, str]
    value: dict[str, Any]

    def describe(self) -> str:
        """`observed_at  key  previous -> status  amount currency  (code label, trigger)`."""
        v = self.value
        change = f"{v.get('previous_status') or 'new'} -> {v.get('status')}"
        amount = f"{v.get('amount') or ''} {v.get('currency') or ''}".strip() or "-"
        code = v.get("provider_status") or {}
        return (
            f"{v.get('observed_at')}  {self.key}  {change}  {amount}"
            f"  (code {code.get('code')} {code.get('label')}, {v.get('trigger')})"
        )


@contextlib.contextmanager
def kafka_errors(settings: KafkaSettings) -> Iterator[None]:
    """Kafka's errors as one StartupError line (exit code 1), for the commands that read."""
    try:
        yield
    except (KafkaError, OSError) as exc:
        raise StartupError(
            f"Kafka at {settings.bootstrap_servers} is not reachable: {type(exc).__name__}"
        ) from None


async def partitions_of(settings: KafkaSettings, topic: str) -> list[int]:
    """The partitions of `topic`; none when it does not exist."""
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False)
    try:
        with kafka_errors(settings):
            await consumer.start()
            return sorted(consumer.partitions_for_topic(topic) or ())
    finally:
        await stop_consumer(consumer)


@contextlib.asynccontextmanager
async def follow_topic(
    settings: KafkaSettings, topic: str, *, from_beginning: bool, max_wait_ms: int = 100
) -> AsyncIterator[AsyncIterator[ConsumerRecord]]:
    """Yields an iterator over the records of `topic` as they arrive, without a group,
    from its beginning or its end. A topic that does not exist is a StartupError.

    `max_wait_ms`: how long the broker may hold a fetch that finds nothing new. Kafka
    answers it as soon as a record comes; a broker that does not (the embedded one)
    makes it a record's delay."""
    consumer = AIOKafkaConsumer(
        **client_options(settings), enable_auto_commit=False, fetch_max_wait_ms=max_wait_ms
    )
    try:
        with kafka_errors(settings):
            await consumer.start()
            found = consumer.partitions_for_topic(topic) or ()
            if not found:
                raise StartupError(f"topic {topic} does not exist: has the bridge run yet?")
            partitions = [TopicPartition(topic, p) for p in sorted(found)]
            consumer.assign(partitions)
            if from_beginning:
                await consumer.seek_to_beginning(*partitions)
            else:
                await consumer.seek_to_end(*partitions)
        yield _records(consumer)
    finally:
        await stop_consumer(consumer)


async def _records(consumer: AIOKafkaConsumer) -> AsyncIterator[ConsumerRecord]:
    async for record in consumer:
        yield record


@contextlib.asynccontextmanager
async def follow(
    settings: KafkaSettings, *, from_beginning: bool, max_wait_ms: int = 100
) -> AsyncIterator[AsyncIterator[Event]]:
    """Yields an iterator over the status topic's events, as they arrive, without a group."""
    async with follow_topic(
        settings, settings.status_topic, from_beginning=from_beginning, max_wait_ms=max_wait_ms
    ) as records:
        yield _events(records)


async def _events(records: AsyncIterator[ConsumerRecord]) -> AsyncIterator[Event]:
    async for record in records:
        try:
            value = orjson.loads(record.value)
        except (orjson.JSONDecodeError, TypeError):
            continue
        yield Event(
            key=record.key.decode() if record.key else "",
            headers={k: v.decode(errors="replace") for k, v in record.headers},
            value=value,
        )


@contextlib.asynccontextmanager
async def each_event(
    settings: KafkaSettings, handle: Callable[[Event], Awaitable[None]], *, max_wait_ms: int = 100
) -> AsyncIterator[None]:
    """Calls `handle` for every status event, from the first on, while the block runs."""
    async with follow(settings, from_beginning=True, max_wait_ms=max_wait_ms) as events:

        async def consume() -> None:
            async for event in events:
                await handle(event)

        task = asyncio.create_task(consume())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def tail(settings: KafkaSettings, *, from_beginning: bool = False) -> None:
    async with follow(settings, from_beginning=from_beginning) as events:
        async for event in events:
            print(event.describe(), flush=True)
