"""The worker's memory across hand-overs: records it cannot read, records of other
versions, and a member that lost its partitions while a write was on its way."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

from bridge.clock import iso, now_iso, utc_now
from bridge.config import KafkaSettings
from bridge.kafka import ensure_topics
from bridge.sandbox import Faults
from tests.bridge_fixtures import bridge_config, config_toml, running_bridge
from tests.conftest import RunningSandbox
from tests.kafka import read_topic


async def produce(
    settings: KafkaSettings, topic: str, records: list[tuple[bytes | None, bytes]]
) -> None:
    """Writes raw records to every partition of `topic`, as another version (or a bug) might."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        for partition in range(settings.partitions):
            for key, value in records:
                await producer.send_and_wait(topic, value, key=key, partition=partition)
    finally:
        await producer.stop()


async def test_unreadable_state_records_are_dead_lettered_and_skipped(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    await ensure_topics(kafka_settings)
    garbage = b'{"first_seen_at": "2026-11-22T10:00:00Z", "card_password": "951753", oops'
    await produce(
        kafka_settings,
        kafka_settings.state_topic,
        [(b"lunpay/lunpay-test/broken", garbage), (None, b"{}")],
    )
    async with running_bridge(sandbox, kafka_settings) as bridge:
        letters = await bridge.deadletter.wait_for_count(2 * kafka_settings.partitions)
        # The partitions are not stalled: a callback still becomes its event.
        order_id, key = bridge.create("lunpay", "succeeded")
        assert (await bridge.post_callback("lunpay", order_id)).status_code == 200
        (event,) = await bridge.events_for(key, 1)
        ready = await bridge.http.get(f"{bridge.url}/readyz")
    assert event.value["status"] == "succeeded"
    assert ready.status_code == 200
    assert {letter.value["reason"] for letter in letters} == {"unreadable"}
    sources = {
        (v["source"]["topic"], v["source"]["partition"], v["source"]["offset"])
        for v in (letter.value for letter in letters)
    }
    expected = {
        (kafka_settings.state_topic, p, o) for p in range(kafka_settings.partitions) for o in (0, 1)
    }
    assert sources == expected
    broken = [letter.value for letter in letters if letter.key == "lunpay/lunpay-test/broken"]
    assert len(broken) == kafka_settings.partitions
    assert broken[0]["order_id"] == "broken"
    assert "951753" not in broken[0]["body"]
    assert "card_password" in broken[0]["body"]


async def test_state_records_of_a_newer_version_are_read(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    account = sandbox.accounts["lunpay"].name
    await ensure_topics(kafka_settings)
    order = sandbox.sandbox.create_order(account, status=2)  # processing
    key = f"lunpay/{account}/{order.order_id}"
    newer = {
        "version": 99,
        "first_seen_at": iso(utc_now()),
        "status": "chargeback",  # a status this version does not know: read as unknown
        "highest_status": "succeeded",
        "code": 12,
        "event_id": "f2b0e0c4-0000-5000-8000-000000000000",
        "next_poll_at": None,
        "a_field_from_the_future": [1, 2, 3],
    }
    await produce(kafka_settings, kafka_settings.state_topic, [(key.encode(), orjson.dumps(newer))])
    async with running_bridge(sandbox, kafka_settings) as bridge:
        # A lagging answer below the highest rank published is not news...
        await bridge.post_callback("lunpay", order.order_id)
        await bridge.wait_for_metric('order_bridge_stale_answers_total{provider="lunpay"}', 1)
        # ...a refund is, and it follows the newer version's event.
        bridge.move("lunpay", order.order_id, "refunded")
        await bridge.post_callback("lunpay", order.order_id)
        (event,) = await bridge.events_for(key, 1)
        letters = await bridge.deadletter.quiet(0.5)
    assert (event.value["previous_status"], event.value["status"]) == ("unknown", "refunded")
    assert letters == []


async def start_worker(config: Path, env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "-v",
            "worker",
            "--config",
            str(config),
            env={**os.environ, **env},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=out,
        )


async def test_a_member_that_lost_its_session_writes_nothing_more(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """Worker A asks the provider about an order, then freezes past its session. B takes
    the partition over and publishes the order's changes; when A wakes up, the answer it
    was waiting for must not become an event: it would break the chain after B's."""
    # A's hint must not run out of budget while it is frozen.
    config = bridge_config(sandbox, kafka_settings, worker={"retry_budget": 600.0})
    text, env = config_toml(config)
    config_file = tmp_path / "bridge.toml"
    config_file.write_text(text)
    account = sandbox.accounts["lunpay"].name
    workers: list[asyncio.subprocess.Process] = []
    async with (
        running_bridge(sandbox, kafka_settings, with_worker=False) as client,
        read_topic(kafka_settings, kafka_settings.status_topic) as status,
    ):
        try:
            first = await start_worker(config_file, env, tmp_path / "a.log")
            workers.append(first)
            warm_id, warm_key = client.create("lunpay", "succeeded")
            await client.post_callback("lunpay", warm_id)
            await status.wait_for(lambda rs: any(r.key == warm_key for r in rs), 30)

            # The provider holds A's query (logged on arrival) until A is frozen: a query
            # logged at answer time would race the freeze with A's event.
            sandbox.sandbox.set_faults(account, Faults(hang=True))
            order_id, key = client.create("lunpay", "processing")
            await client.post_callback("lunpay", order_id)
            async with asyncio.timeout(20):
                await sandbox.sandbox.wait_for_queries(account, order_id)
            first.send_signal(signal.SIGSTOP)
            sandbox.sandbox.set_faults(account, Faults())  # answers A's query: processing

            second = await start_worker(config_file, env, tmp_path / "b.log")
            workers.append(second)
            await status.wait_for(lambda rs: any(r.key == key for r in rs), 30, "B's first event")
            client.move("lunpay", order_id, "succeeded")
            await client.post_callback("lunpay", order_id)
            await status.wait_for(
                lambda rs: len([r for r in rs if r.key == key]) == 2, 30, "B's second event"
            )

            first.send_signal(signal.SIGCONT)
            # A's answer is ready at once; its heartbeat learns the session is gone.
            records = await status.quiet(4)
        finally:
            for worker in workers:
                if worker.returncode is None:
                    worker.send_signal(signal.SIGCONT)
                    worker.kill()
                    await worker.wait()
    events = [r.value for r in records if r.key == key]
    chain = [(e["previous_status"], e["status"]) for e in events]
    assert chain == [(None, "processing"), ("processing", "succeeded")], (
        chain,
        (tmp_path / "a.log").read_text()[-3000:],
    )


def test_now_iso_is_iso_of_utc_now() -> None:
    for _ in range(1000):
        before = iso(utc_now())
        text = now_iso()
        after = iso(utc_now())
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text), text
        assert before <= text <= after
