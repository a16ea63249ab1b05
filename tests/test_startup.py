"""Start-up checks: topics created and lined up, one clear line when they are not."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from bridge.config import KafkaSettings
from bridge.errors import ConfigError, StartupError
from bridge.kafka import ensure_topics
from tests.bridge_fixtures import bridge_config
from tests.conftest import RunningSandbox
from tests.procs import BridgeProcess, write_config


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


def topics(settings: KafkaSettings) -> list[str]:
    return [
        settings.inbox_topic,
        settings.status_topic,
        settings.deadletter_topic,
        settings.state_topic,
    ]


async def topic_configs(settings: KafkaSettings) -> dict[str, dict[str, str]]:
    """Each topic's configs as the broker reports them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in topics(settings)]
        )
    finally:
        await admin.close()
    return {
        resource["resource_name"]: {
            entry["config_names"]: entry["config_value"] for entry in resource["config_entries"]
        }
        for response in responses
        for resource in response.to_object()["resources"]
    }


async def create_topics(
    settings: KafkaSettings, replication: int, configs: dict[str, str], names: list[str]
) -> None:
    """Topics made before the bridge starts, as an operator might have made them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, settings.partitions, replication, topic_configs=configs)
                for name in names
            ]
        )
    finally:
        await admin.close()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(("replication", "min_insync"), [(1, "1"), (3, "2")])
async def test_topics_created_get_min_insync_replicas(
    kafka_settings: KafkaSettings, replication: int, min_insync: str
) -> None:
    # The embedded broker takes replication factor 3 though it is one broker.
    settings = dataclasses.replace(kafka_settings, replication_factor=replication)
    await ensure_topics(settings)
    configs = await topic_configs(settings)
    assert {name: c["min.insync.replicas"] for name, c in configs.items()} == dict.fromkeys(
        topics(settings), min_insync
    )
    assert configs[settings.state_topic]["cleanup.policy"] == "compact"


@pytest.mark.parametrize(
    ("replication", "min_insync", "meaning"),
    [
        (1, 1, "survives the loss of 0 brokers, not 1"),
        (2, 2, "fails after 1 broker lost, not 2"),
    ],
)
async def test_topics_weaker_than_the_settings_are_warned_about(
    kafka_settings: KafkaSettings,
    caplog: pytest.LogCaptureFixture,
    replication: int,
    min_insync: int,
    meaning: str,
) -> None:
    settings = dataclasses.replace(kafka_settings, replication_factor=3)  # min.insync 2
    configs = {"min.insync.replicas": str(min_insync)}
    await create_topics(settings, replication, configs, topics(settings))
    await ensure_topics(settings)  # warned, not stopped
    assert warnings(caplog) == [
        f"topic {name} has replication factor {replication}, min.insync.replicas "
        f"{min_insync}, the settings say 3 and 2: an acks=all write to it {meaning}"
        for name in topics(settings)
    ]


async def test_topics_as_the_settings_say_are_not_warned_about(
    kafka_settings: KafkaSettings, caplog: pytest.LogCaptureFixture
) -> None:
    await create_topics(kafka_settings, 1, {"min.insync.replicas": "1"}, topics(kafka_settings))
    await ensure_topics(kafka_settings)
    assert warnings(caplog) == []


async def test_a_topic_whose_min_insync_replicas_is_not_reported_is_said_at_info(
    kafka_settings: KafkaSettings, caplog: pytest.LogCaptureFixture
) -> None:
    # The embedded broker reports no min.insync.replicas for a topic made without one.
    await create_topics(kafka_settings, 1, {}, [kafka_settings.inbox_topic])
    with caplog.at_level(logging.INFO, "bridge.kafka"):
        await ensure_topics(kafka_settings)
    assert warnings(caplog) == []
    assert (
        f"min.insync.replicas of topics {kafka_settings.inbox_topic} not checked: the broker "
        "does not report it"
    ) in caplog.messages


async def test_a_topic_with_more_min_insync_replicas_than_replicas_stops_the_bridge(
    kafka_settings: KafkaSettings,
) -> None:
    await create_topics(
        kafka_settings, 1, {"min.insync.replicas": "2"}, [kafka_settings.state_topic]
    )
    with pytest.raises(StartupError) as caught:
        await ensure_topics(kafka_settings)
    assert str(caught.value) == (
        f"topic {kafka_settings.state_topic} has min.insync.replicas 2 but 1 replica(s): "
        "every acks=all write to it would fail"
    )


async def test_min_insync_replicas_above_the_replication_factor_is_a_config_error(
    kafka_settings: KafkaSettings,
) -> None:
    settings = dataclasses.replace(kafka_settings, min_insync_replicas=2)
    with pytest.raises(ConfigError) as caught:
        await ensure_topics(settings)
    assert str(caught.value) == (
        "config: kafka.min_insync_replicas: is 2, above replication_factor 1: "
        "every acks=all write would fail"
    )


async def test_min_insync_replicas_of_one_with_replicas_is_warned_about(
    kafka_settings: KafkaSettings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = dataclasses.replace(kafka_settings, replication_factor=3, min_insync_replicas=1)
    await ensure_topics(settings)
    assert warnings(caplog)[0] == (
        "kafka.min_insync_replicas is 1 with replication_factor 3: an acks=all write is acked "
        "by one broker and lost with it (replication_factor 3 with min_insync_replicas 2 "
        "survives the loss of one)"
    )


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


async def test_a_proxy_the_worker_cannot_use_stops_it_with_one_line(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    config_file = tmp_path / "bridge.toml"
    env = write_config(bridge_config(sandbox, kafka_settings), config_file)
    process = BridgeProcess("worker", "worker", config_file, env, tmp_path)
    await process.start({"HTTPS_PROXY": "socks5://ops:s3cret@127.0.0.1:1080"})
    assert process.process is not None
    assert await asyncio.wait_for(process.process.wait(), 60) == 2, process.tail()
    # One line, nothing left unclosed behind it (the worker's Kafka consumer, say).
    said = [line for line in process.log.read_text().splitlines() if " INFO " not in line]
    assert said == [
        "order-bridge: config: HTTPS_PROXY: socks5:// proxies are not supported, only http:// ones"
    ], process.tail()
