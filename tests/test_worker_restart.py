"""A worker process killed mid-flight and restarted: nothing lost, same event ids."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
from aiokafka import AIOKafkaProducer

from bridge.config import KafkaSettings
from bridge.orders import Status
from bridge.sandbox import Faults
from bridge.service import Bridge
from bridge.state import OrderState
from tests.bridge_fixtures import bridge_config, config_toml, running_bridge
from tests.conftest import RunningSandbox
from tests.kafka import read_topic

# Each provider's code for "succeeded".
SUCCEEDED = {"lemft": 1, "lunpay": 4, "kasushou": 3}
ORDERS_PER_PROVIDER = 8


async def start_worker(config: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "worker",
        "--config",
        str(config),
        env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_a_killed_worker_loses_nothing_and_republishes_with_the_same_ids(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    config = bridge_config(sandbox, kafka_settings)
    text, env = config_toml(config)
    config_file = tmp_path / "bridge.toml"
    config_file.write_text(text)
    # A slow provider keeps many hints in flight when the worker dies.
    for account in sandbox.accounts.values():
        sandbox.sandbox.set_faults(account.name, Faults(latency=0.3))

    keys = []
    async with (
        Bridge(config, worker=False) as receiver,
        httpx.AsyncClient(timeout=10) as http,
        read_topic(kafka_settings, kafka_settings.status_topic) as status,
    ):
        first = await start_worker(config_file, env)
        for provider, account in sandbox.accounts.items():
            for _ in range(ORDERS_PER_PROVIDER):
                order = sandbox.sandbox.create_order(account.name, status=SUCCEEDED[provider])
                body, content_type = sandbox.sandbox.callback(account.name, order.order_id)
                answer = await http.post(
                    f"{receiver.url}/callbacks/{provider}/{account.name}",
                    content=body,
                    headers={"content-type": content_type},
                )
                assert answer.status_code == 200
                keys.append(f"{provider}/{account.name}/{order.order_id}")

        await status.wait_for_count(3, timeout=30)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        published_before_kill = len(status.records)
        assert published_before_kill < len(keys), "the kill should land mid-stream"

        second = await start_worker(config_file, env)
        try:
            await status.wait_for(
                lambda rs: {r.key for r in rs} >= set(keys), timeout=60, what="every order"
            )
        finally:
            second.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode == 0, stderr.decode()

    by_key = defaultdict(list)
    for record in status.records:
        by_key[record.key].append(record)
    assert set(by_key) == set(keys)
    for events in by_key.values():
        # Re-published after the kill, perhaps, but always as the same change.
        assert {e.value["status"] for e in events} == {"succeeded"}
        assert len({e.headers["ce_id"] for e in events}) == 1


async def test_a_hint_still_retrying_when_the_worker_stops_is_handed_back(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    account = sandbox.accounts["lemft"].name
    sandbox.sandbox.set_faults(account, Faults(error_rate=1.0))
    patient = {"retry_budget": 600.0, "drain_timeout": 0.5}
    async with running_bridge(sandbox, kafka_settings, worker=patient) as first:
        order_id, key = first.create("lemft", "succeeded")
        await first.post_callback("lemft", order_id)
        async with asyncio.timeout(20):
            await sandbox.sandbox.wait_for_queries(account, order_id, count=2)
    # The stop cut the hint's retries short: it must not count as done.
    sandbox.sandbox.set_faults(account, Faults())
    async with running_bridge(sandbox, kafka_settings) as second:
        (event,) = await second.events_for(key, 1)
    assert (event.value["trigger"], event.value["status"]) == ("callback", "succeeded")


async def test_hints_wait_for_their_partitions_state_to_be_restored(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    async with running_bridge(sandbox, kafka_settings) as first:
        order_id, key = first.create("lunpay", "succeeded")
        await first.post_callback("lunpay", order_id)
        await first.events_for(key, 1)
    # Other orders' state, so that restoring takes a while; aiokafka fetches the inbox
    # of a partition while its state is still being read.
    await write_state_records(kafka_settings, 20_000)
    # The provider repeats the callback while no worker runs: the hint waits in the inbox.
    async with running_bridge(sandbox, kafka_settings, with_worker=False) as receiver:
        await receiver.post_until_accepted("lunpay", order_id)
    async with running_bridge(sandbox, kafka_settings) as second:
        # The restored state knows this change was published: no second event.
        await second.wait_for_metric('order_bridge_hints_total{outcome="unchanged"', 1)
        assert len(await second.events_for(key, 1)) == 1


async def write_state_records(settings: KafkaSettings, count: int) -> None:
    """`count` state records of final orders, which the worker neither polls nor forgets."""
    value = OrderState(first_seen=time.time(), status=Status.SUCCEEDED, code=1).encode()
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=20)
    await producer.start()
    try:
        sent = [
            await producer.send(settings.state_topic, value, key=f"lemft/old/{i}".encode())
            for i in range(count)
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
