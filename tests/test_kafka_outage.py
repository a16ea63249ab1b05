"""Kafka going away at awkward moments: clients stop cleanly, workers wait for their state."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from bridge.kafka import client_options, ensure_topics, stop_consumer
from bridge.service import Bridge
from tests.bridge_fixtures import RunningBridge, bridge_config, running_bridge
from tests.conftest import CutOffBroker, RunningSandbox
from tests.kafka import read_topic


async def wait_for_log(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in record.getMessage() for record in caplog.records):
        assert time.monotonic() < deadline, f"no log line with {text!r}"
        await asyncio.sleep(0.05)


@contextmanager
def on_log(logger: str, text: str, action: Callable[[], object]) -> Iterator[None]:
    """Runs `action` inside the logging call of the first line holding `text`: at that moment."""

    class Trigger(logging.Handler):
        fired = False

        def emit(self, record: logging.LogRecord) -> None:
            if not self.fired and text in record.getMessage():
                self.fired = True
                action()

    handler = Trigger()
    target = logging.getLogger(logger)
    target.addHandler(handler)
    level = target.level
    target.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        target.setLevel(level)
        target.removeHandler(handler)


async def cut_off_consumer(cut_off_broker: CutOffBroker) -> AIOKafkaConsumer:
    """A consumer of inbox partition 0 (the topics made) that has fetched once; then the
    broker is cut off."""
    settings = cut_off_broker.settings
    consumer = AIOKafkaConsumer(**client_options(settings), fetch_max_wait_ms=50)
    await consumer.start()
    consumer.assign([TopicPartition(settings.inbox_topic, 0)])
    await consumer.getmany(timeout_ms=100)
    cut_off_broker.proxy.cut()
    return consumer


async def test_a_consumer_stopped_while_its_fetches_fail_stops_cleanly(
    cut_off_broker: CutOffBroker, caplog: pytest.LogCaptureFixture
) -> None:
    await ensure_topics(cut_off_broker.settings)
    consumer = await cut_off_consumer(cut_off_broker)
    # Each failed fetch is logged, then backs off: stop during that back-off.
    fetching = asyncio.create_task(consumer.getmany(timeout_ms=10_000))
    await wait_for_log(caplog, "Failed fetch messages")
    fetching.cancel()
    await stop_consumer(consumer)  # raised CancelledError here (aio-libs/aiokafka#647)


async def test_a_command_stopped_by_ctrl_c_as_fetches_fail_leaves_nothing_running(
    cut_off_broker: CutOffBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl-C cancels a command's task, which stops its consumer on the way out: the
    cancellation it already has must not cut that stop short, or the client's tasks
    stay behind for asyncio.run to wait on."""
    await ensure_topics(cut_off_broker.settings)
    before = asyncio.all_tasks()
    consumer = await cut_off_consumer(cut_off_broker)

    async def command() -> None:
        try:
            await consumer.getmany(timeout_ms=10_000)
        finally:
            await stop_consumer(consumer)

    running = asyncio.create_task(command())
    await wait_for_log(caplog, "Failed fetch messages")
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert [t for t in asyncio.all_tasks() - before if not t.done()] == []


async def test_a_worker_assigned_partitions_as_kafka_goes_away_waits_for_its_state(
    sandbox: RunningSandbox, cut_off_broker: CutOffBroker, caplog: pytest.LogCaptureFixture
) -> None:
    settings = cut_off_broker.settings
    async with running_bridge(sandbox, settings) as first:
        order_id, key = first.create("lunpay", "succeeded")
        await first.post_callback("lunpay", order_id)
        await first.events_for(key, 1)
    # The provider repeats the callback while no worker runs: the hint waits in the inbox.
    async with running_bridge(sandbox, settings, with_worker=False) as receiver:
        await receiver.post_until_accepted("lunpay", order_id)

    # The next worker gets its partitions, and Kafka is gone before it reads their state.
    assigned = "Setting newly assigned partitions"
    async with (
        httpx.AsyncClient(timeout=10) as http,
        read_topic(settings, settings.status_topic) as status,
        read_topic(settings, settings.deadletter_topic) as deadletter,
    ):
        with on_log("aiokafka.consumer.group_coordinator", assigned, cut_off_broker.proxy.cut):
            async with Bridge(bridge_config(sandbox, settings)) as bridge:
                second = RunningBridge(bridge, sandbox, http, status, deadletter)
                await wait_for_log(caplog, "restoring state of partitions")
                await cut_off_broker.proxy.start()
                # The waiting hint must wait for the state too, which knows this change
                # was published: no second event.
                await second.wait_for_metric('order_bridge_hints_total{outcome="unchanged"', 1)
                assert len(await second.events_for(key, 1)) == 1


async def test_a_worker_stops_promptly_while_kafka_is_away(
    sandbox: RunningSandbox, cut_off_broker: CutOffBroker, caplog: pytest.LogCaptureFixture
) -> None:
    config = bridge_config(sandbox, cut_off_broker.settings)
    assigned = "Setting newly assigned partitions"
    with on_log("aiokafka.consumer.group_coordinator", assigned, cut_off_broker.proxy.cut):
        bridge = await Bridge(config).__aenter__()
        await wait_for_log(caplog, "restoring state of partitions")
        async with httpx.AsyncClient() as http:
            ready = await http.get(f"{bridge.url}/readyz")
        assert ready.status_code == 503
        assert any(p.startswith("restoring state of partitions") for p in ready.json()["problems"])
        # SIGTERM now: the stop must not wait for Kafka to come back.
        await asyncio.wait_for(bridge.__aexit__(None, None, None), 30)
