"""A worker process killed mid-flight and restarted: nothing lost, same event ids."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import defaultdict
from pathlib import Path

import httpx

from bridge.config import KafkaSettings
from bridge.sandbox import Faults
from bridge.service import Bridge
from tests.bridge_fixtures import bridge_config, config_toml
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
