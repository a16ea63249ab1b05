"""A whole bridge in the test's event loop, against the session broker and a sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx

from bridge.accounts import Secret
from bridge.config import Config, HttpSettings, KafkaSettings, PollSettings, WorkerSettings
from bridge.service import Bridge
from tests.conftest import RunningSandbox
from tests.kafka import Record, TopicReader, read_topic

# Each provider's codes for some statuses.
CODES = {
    "lemft": {"processing": 0, "succeeded": 1, "refunded": 2},
    "lunpay": {"processing": 2, "succeeded": 4, "refunded": 6},
    "kasushou": {"processing": 2, "succeeded": 3, "refunded": 5},
}

# Short timings so faults and retries play out in seconds.
FAST_WORKER = WorkerSettings(
    group_id="order-bridge-test",
    retry_budget=5.0,
    retry_initial=0.05,
    retry_max=0.5,
    commit_interval=0.2,
    session_timeout=2.0,
    heartbeat_interval=0.5,
    drain_timeout=2.0,
    breaker_cooldown=0.5,
    http_port=0,  # worker-only processes serve their probes on a free port
)


def bridge_config(
    sandbox: RunningSandbox,
    kafka: KafkaSettings,
    *,
    worker: Mapping[str, Any] | None = None,
    polling: PollSettings | None = None,
    accounts: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """A config for the sandbox's accounts; `accounts` changes them by provider name."""
    changes = accounts or {}
    return Config(
        kafka=kafka,
        http=HttpSettings(port=0, inbox_timeout=2.0, retry_after=1),
        # A group of its own per test, as its topics are.
        worker=dataclasses.replace(
            FAST_WORKER, group_id=f"group-{kafka.inbox_topic}", **(worker or {})
        ),
        polling=polling or PollSettings(),
        accounts=tuple(
            dataclasses.replace(account, **changes.get(provider, {}))
            for provider, account in sandbox.accounts.items()
        ),
    )


@dataclass
class RunningBridge:
    bridge: Bridge
    sandbox: RunningSandbox
    http: httpx.AsyncClient
    status: TopicReader
    deadletter: TopicReader

    @property
    def url(self) -> str:
        assert self.bridge.url is not None
        return self.bridge.url

    def create(
        self, provider: str, status: str = "processing", order_id: str | None = None
    ) -> tuple[str, str]:
        """A sandbox order in `status`; returns its id and its Kafka key."""
        account = self.sandbox.accounts[provider].name
        order = self.sandbox.sandbox.create_order(
            account,
            order_id=order_id,
            status=CODES[provider][status],
            amount=Decimal("375.28"),
            currency="USD",
        )
        return order.order_id, f"{provider}/{account}/{order.order_id}"

    def move(self, provider: str, order_id: str, status: str | int) -> None:
        """Changes the order at the provider (no callback)."""
        code = status if isinstance(status, int) else CODES[provider][status]
        self.sandbox.sandbox.set_status(self.sandbox.accounts[provider].name, order_id, code)

    async def watch(self, provider: str, order_id: str) -> httpx.Response:
        account = self.sandbox.accounts[provider].name
        return await self.http.post(
            f"{self.url}/orders/watch",
            json={"provider": provider, "account": account, "order_id": order_id},
        )

    def callback_url(self, provider: str) -> str:
        return f"{self.url}/callbacks/{provider}/{self.sandbox.accounts[provider].name}"

    async def post_callback(
        self, provider: str, order_id: str, **options: object
    ) -> httpx.Response:
        account = self.sandbox.accounts[provider].name
        body, content_type = self.sandbox.sandbox.callback(account, order_id, **options)  # type: ignore[arg-type]
        return await self.http.post(
            self.callback_url(provider), content=body, headers={"content-type": content_type}
        )

    async def post_until_accepted(self, provider: str, order_id: str) -> None:
        """Posts the callback as a provider does: again after `Retry-After` until a 200."""
        deadline = time.monotonic() + 30
        while (answer := await self.post_callback(provider, order_id)).status_code != 200:
            assert answer.status_code == 503, answer.text
            assert time.monotonic() < deadline, "the bridge kept answering 503"
            await asyncio.sleep(float(answer.headers["retry-after"]))

    async def wait_for_metric(self, name: str, at_least: float) -> str:
        """The /metrics text, once the samples of `name` add up to `at_least`."""
        deadline = time.monotonic() + 20
        while True:
            text = (await self.http.get(f"{self.url}/metrics")).text
            total = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith(name) and not line.startswith("#")
            )
            if total >= at_least:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} stayed below {at_least}:\n{text}")
            await asyncio.sleep(0.1)

    async def events_for(self, key: str, count: int, timeout: float = 20.0) -> list[Record]:
        records = await self.status.wait_for(
            lambda rs: len([r for r in rs if r.key == key]) >= count,
            timeout,
            f"{count} events for {key}",
        )
        return [r for r in records if r.key == key]


@contextlib.asynccontextmanager
async def running_bridge(
    sandbox: RunningSandbox,
    kafka: KafkaSettings,
    *,
    with_worker: bool = True,
    worker: Mapping[str, Any] | None = None,
    polling: PollSettings | None = None,
    accounts: Mapping[str, Mapping[str, Any]] | None = None,
) -> AsyncIterator[RunningBridge]:
    """A bridge on the sandbox, its config changed as `bridge_config` says."""
    config = bridge_config(sandbox, kafka, worker=worker, polling=polling, accounts=accounts)
    async with (
        Bridge(config, worker=with_worker) as bridge,
        httpx.AsyncClient(timeout=10) as http,
        read_topic(kafka, kafka.status_topic) as status,
        read_topic(kafka, kafka.deadletter_topic) as deadletter,
    ):
        yield RunningBridge(bridge, sandbox, http, status, deadletter)


def config_toml(config: Config) -> tuple[str, dict[str, str]]:
    """`config` as a TOML file, and the environment that holds its secrets (`env:` refs)."""
    env: dict[str, str] = {}

    def table(section: object) -> list[str]:
        lines = []
        for f in dataclasses.fields(section):  # type: ignore[arg-type]
            value = getattr(section, f.name)
            if value is None or f.name == "settings":
                continue
            if isinstance(value, Secret):
                name = f"TEST_SECRET_{len(env)}"
                env[name] = value.reveal()
                value = f"env:{name}"
            lines.append(f"{f.name} = {toml_value(value)}")
        return lines

    lines = ["[kafka]", *table(config.kafka), "[http]", *table(config.http)]
    lines += ["[worker]", *table(config.worker), "[polling]", *table(config.polling)]
    for account in config.accounts:
        lines += ["[[accounts]]", *table(account), *table(account.settings)]
    return "\n".join(lines) + "\n", env


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))
