"""A worker-only process serves /healthz, /readyz and /metrics on `[worker] http_port`."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx

from bridge.broker import free_port
from bridge.config import KafkaSettings
from bridge.service import Bridge
from tests.bridge_fixtures import bridge_config, running_bridge
from tests.conftest import CutOffBroker, RunningSandbox
from tests.procs import BridgeProcess, write_config

# A worker's probe port of its own, picked free: tests run side by side.
FREE_PORT = {"http_port": 0}
# A Prometheus sample line: name, optional labels, value.
SAMPLE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? [-+0-9.eEinfNa]+")


def metric_total(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((f"{name} ", f"{name}{{"))
    )


async def test_a_worker_only_bridge_serves_its_probes(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    port = free_port()
    config = bridge_config(sandbox, kafka_settings, worker={"http_port": port})
    async with (
        Bridge(config, receiver=False) as worker,
        running_bridge(sandbox, kafka_settings, with_worker=False) as receiver,
        httpx.AsyncClient(timeout=10) as http,
    ):
        assert worker.url is None
        probes = worker.probe_url
        assert probes == f"http://{config.http.host}:{port}"
        health = await http.get(f"{probes}/healthz")
        assert (health.status_code, health.text) == (200, "ok")
        ready = await http.get(f"{probes}/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"ready": True, "degraded": []}
        # Only the probes: callbacks go to receivers.
        refused = await http.post(f"{probes}/orders/watch", json={})
        assert refused.status_code == 404

        # The worker's own counters: an order it confirmed shows in its /metrics.
        order_id, key = receiver.create("lunpay", "succeeded")
        assert (await receiver.watch("lunpay", order_id)).status_code == 202
        await receiver.events_for(key, 1)
        metrics = await http.get(f"{probes}/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        lines = [line for line in metrics.text.splitlines() if line]
        assert any(line.startswith("# TYPE ") for line in lines)
        assert all(line.startswith("#") or SAMPLE.fullmatch(line) for line in lines), lines
        assert metric_total(metrics.text, "order_bridge_events_published_total") >= 1


async def test_a_worker_without_kafka_is_not_ready(
    sandbox: RunningSandbox, cut_off_broker: CutOffBroker
) -> None:
    config = bridge_config(sandbox, cut_off_broker.settings, worker=FREE_PORT)
    async with (
        Bridge(config, receiver=False) as worker,
        httpx.AsyncClient(timeout=10) as http,
    ):
        probes = worker.probe_url
        assert (await http.get(f"{probes}/readyz")).status_code == 200
        cut_off_broker.proxy.cut()
        ready = await http.get(f"{probes}/readyz")
        assert ready.status_code == 503, ready.text
        bootstrap = cut_off_broker.settings.bootstrap_servers
        assert f"Kafka at {bootstrap} is not reachable" in ready.json()["problems"]
        # Alive all the same: the orchestrator must not restart it for Kafka's sake.
        assert (await http.get(f"{probes}/healthz")).status_code == 200
        # Back, and ready again.
        await cut_off_broker.proxy.start()
        deadline = asyncio.get_running_loop().time() + 20
        while (await http.get(f"{probes}/readyz")).status_code != 200:
            assert asyncio.get_running_loop().time() < deadline, "not ready after Kafka came back"
            await asyncio.sleep(0.2)


async def test_order_bridge_worker_logs_its_probe_url_and_answers_there(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    config_file = tmp_path / "bridge.toml"
    env = write_config(bridge_config(sandbox, kafka_settings, worker=FREE_PORT), config_file)
    process = BridgeProcess("worker", "worker", config_file, env, tmp_path)
    await process.start()
    try:
        await process.wait_running()
        found = re.search(r"/readyz and /metrics on (http://\S+)", process.log.read_text())
        assert found, process.tail()
        probes = found.group(1)
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(f"{probes}/healthz")).status_code == 200
            assert (await http.get(f"{probes}/readyz")).status_code == 200
            metrics = await http.get(f"{probes}/metrics")
        assert "# TYPE order_bridge_" in metrics.text
    finally:
        assert await process.terminate() == 0, process.tail()
