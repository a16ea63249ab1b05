"""A whole bridge in the test's event loop, against the session broker and a sandbox."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from bridge.config import Config, HttpSettings, KafkaSettings, WorkerSettings
from bridge.redact import Secret
from bridge.service import Bridge
from tests.conftest import RunningSandbox
from tests.kafka import Record, TopicReader, read_topic

# Short timings so faults and retries play out in seconds.
FAST_WORKER = WorkerSettings(
    group_id="order-bridge-test",
    retry_budget=5.0,
    retry_initial=0.05,
    retry_max=0.5,
    stale_retries=1,
    commit_interval=0.2,
    session_timeout=2.0,
    heartbeat_interval=0.5,
    drain_timeout=2.0,
)


def bridge_config(
    sandbox: RunningSandbox, kafka: KafkaSettings, **worker_changes: float | int | str
) -> Config:
    return Config(
        kafka=kafka,
        http=HttpSettings(port=0, inbox_timeout=2.0, retry_after=1),
        worker=dataclasses.replace(FAST_WORKER, **worker_changes),  # type: ignore[arg-type]
        accounts=tuple(sandbox.accounts.values()),
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

    async def events_for(self, key: str, count: int, timeout: float = 20.0) -> list[Record]:
        records = await self.status.wait_for(
            lambda rs: len([r for r in rs if r.key == key]) >= count,
            timeout,
            f"{count} events for {key}",
        )
        return [r for r in records if r.key == key]


@contextlib.asynccontextmanager
async def running_bridge(
    sandbox: RunningSandbox, kafka: KafkaSettings, **worker_changes: float | int | str
) -> AsyncIterator[RunningBridge]:
    config = bridge_config(sandbox, kafka, **worker_changes)
    async with (
        Bridge(config) as bridge,
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
    lines += ["[worker]", *table(config.worker)]
    for account in config.accounts:
        lines += ["[[accounts]]", *table(account), *table(account.settings)]
    return "\n".join(lines) + "\n", env


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))
