"""Shared fixtures: test accounts for each provider, and the sandbox providers on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from bridge.accounts import Account
from bridge.broker import EmbeddedBroker, free_port
from bridge.config import KafkaSettings
from bridge.sandbox import Sandbox
from bridge.servers import serve
from tests.helpers import make_accounts
from tests.kafka import TcpProxy

if TYPE_CHECKING:
    from tests.bridge_fixtures import RunningBridge


@dataclass
class RunningSandbox:
    sandbox: Sandbox
    url: str
    # The test accounts, pointed at this sandbox.
    accounts: dict[str, Account]


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    accounts = make_accounts()
    box = Sandbox(list(accounts.values()))
    async with serve(box.app) as url:
        pointed = {
            provider: dataclasses.replace(account, base_url=f"{url}/{provider}")
            for provider, account in accounts.items()
        }
        yield RunningSandbox(box, url, pointed)


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """One embedded Kafka-protocol broker for the whole test session."""
    running = EmbeddedBroker()
    running.start()
    try:
        asyncio.run(running.wait_ready())
        yield running
    finally:
        running.stop()


def kafka_settings_for(bootstrap_servers: str, partitions: int = 3) -> KafkaSettings:
    """Settings with topics of their own, so tests sharing a broker never see each other."""
    suffix = uuid.uuid4().hex[:8]
    return KafkaSettings(
        bootstrap_servers=bootstrap_servers,
        status_topic=f"status-{suffix}",
        inbox_topic=f"inbox-{suffix}",
        deadletter_topic=f"deadletter-{suffix}",
        state_topic=f"state-{suffix}",
        partitions=partitions,
        replication_factor=1,
        enable_idempotence=False,  # the embedded broker has no InitProducerId
    )


@pytest.fixture
def kafka_settings(broker: EmbeddedBroker) -> KafkaSettings:
    return kafka_settings_for(broker.bootstrap_servers)


@dataclass
class CutOffBroker:
    """A broker of its own behind a proxy: `proxy.cut()` makes Kafka unreachable."""

    broker: EmbeddedBroker
    proxy: TcpProxy
    settings: KafkaSettings


@pytest.fixture
async def cut_off_broker() -> AsyncIterator[CutOffBroker]:
    proxy_port = free_port()
    own = EmbeddedBroker(advertised_port=proxy_port)
    own.start()
    proxy = TcpProxy(own.port, proxy_port)
    try:
        # The broker advertises the proxy's port: it is only reachable through it.
        await proxy.start()
        await own.wait_ready()
        yield CutOffBroker(own, proxy, kafka_settings_for(own.bootstrap_servers))
    finally:
        proxy.cut()
        own.stop()


@pytest.fixture
async def bridge(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> AsyncIterator[RunningBridge]:
    """Receiver and worker running against the session broker and this test's sandbox."""
    from tests.bridge_fixtures import running_bridge

    async with running_bridge(sandbox, kafka_settings) as running:
        yield running
