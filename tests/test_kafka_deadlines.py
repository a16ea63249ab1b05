"""`Producer.send`'s deadline: a send not acked in time raises TimeoutError; any other
cancellation stays a cancellation."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from aiokafka import AIOKafkaProducer

from bridge.config import KafkaSettings
from bridge.kafka import Producer


class _Broker:
    """Stands for aiokafka's producer: acks a send after `delay` seconds (None: never)."""

    def __init__(self, delay: float | None) -> None:
        self.delay = delay

    async def send_and_wait(self, topic: str, value: bytes | None, **_: Any) -> str:
        if self.delay is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay or 0)
        return f"acked {topic}"


def _producer(delay: float | None) -> Producer:
    producer = Producer(KafkaSettings())
    producer._producer = cast(AIOKafkaProducer, _Broker(delay))
    return producer


async def test_a_send_acked_in_time_returns_its_metadata() -> None:
    producer = _producer(0.01)
    sends = [producer.send("inbox", f"k{i}", b"v", timeout=5) for i in range(20)]
    assert await asyncio.gather(*sends) == ["acked inbox"] * 20


async def test_a_send_not_acked_in_time_raises_timeout_error() -> None:
    producer = _producer(None)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await producer.send("inbox", "k", b"v", timeout=0.05)
    assert 0.05 <= loop.time() - started < 1
    # The producer stays usable, and the task is not left cancelled.
    producer._producer = cast(AIOKafkaProducer, _Broker(0))
    assert await producer.send("inbox", "k", b"v", timeout=0.05) == "acked inbox"
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


async def test_sends_sharing_a_deadline_each_time_out() -> None:
    producer = _producer(None)
    sends = [producer.send("inbox", f"k{i}", b"v", timeout=0.05) for i in range(5)]
    results = await asyncio.gather(*sends, return_exceptions=True)
    assert all(isinstance(result, TimeoutError) for result in results)


async def test_a_send_cancelled_before_its_deadline_is_cancelled() -> None:
    producer = _producer(None)
    task = asyncio.create_task(producer.send("inbox", "k", b"v", timeout=0.2))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.3)  # its deadline's timer fires on nothing


async def test_a_send_without_timeout_waits_for_its_ack() -> None:
    producer = _producer(0.05)
    assert await producer.send("inbox", "k", b"v") == "acked inbox"
