"""Start-up checks: topics created and lined up, one clear line when they are not."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bridge.config import KafkaSettings
from bridge.errors import StartupError
from bridge.kafka import ensure_topics


async def partition_counts(settings: KafkaSettings) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_topics(
            [settings.inbox_topic, settings.status_topic, settings.state_topic]
        )
    finally:
        await admin.close()
    return {d["topic"]: len(d["partitions"]) for d in described}


async def test_missing_topics_are_created_with_the_partitions_setting(
    kafka_settings: KafkaSettings,
) -> None:
    settings = dataclasses.replace(kafka_settings, partitions=5)
    await ensure_topics(settings)
    await ensure_topics(settings)  # a second start finds them
    assert set((await partition_counts(settings)).values()) == {5}


async def test_topics_whose_partitions_differ_stop_the_bridge(
    kafka_settings: KafkaSettings,
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(kafka_settings.state_topic, 2, 1)])
    finally:
        await admin.close()
    with pytest.raises(StartupError) as caught:
        await ensure_topics(kafka_settings)
    message = str(caught.value)
    assert "need the same partition count" in message
    assert f"{kafka_settings.state_topic} has 2" in message
    assert f"{kafka_settings.inbox_topic} has 3" in message
    assert "\n" not in message


async def test_serve_without_kafka_stops_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(
        '[kafka]\nbootstrap_servers = "127.0.0.1:9"\n'
        '[[accounts]]\nname = "l"\nprovider = "lunpay"\nbase_url = "http://127.0.0.1:9"\n'
        'merchant_id = "M"\naccount_id = "A"\nsecret = "s"\n'
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    assert err.decode() == (
        "order-bridge: Kafka at 127.0.0.1:9 is not reachable: KafkaConnectionError\n"
    )
