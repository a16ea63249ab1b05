"""What ingest.py and pipeline.py share: `order-bridge` roles as real processes from a
config file, CPU seconds from /proc, topic record counts and percentiles."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from bridge.accounts import Secret
from bridge.config import Config

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60.0


# -- the config file -------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def config_toml(config: Config) -> tuple[str, dict[str, str]]:
    """`config` as a TOML file, and the environment holding its secrets (`env:` refs)."""
    env: dict[str, str] = {}

    def table(section: Any) -> list[str]:
        lines = []
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            if value is None or field.name == "settings":
                continue
            if isinstance(value, Secret):
                name = f"BENCH_SECRET_{len(env)}"
                env[name] = value.reveal()
                value = f"env:{name}"
            lines.append(f"{field.name} = {_toml_value(value)}")
        return lines

    lines = ["[kafka]", *table(config.kafka), "[http]", *table(config.http)]
    lines += ["[worker]", *table(config.worker), "[polling]", *table(config.polling)]
    for account in config.accounts:
        lines += ["[[accounts]]", *table(account), *table(account.settings)]
    return "\n".join(lines) + "\n", env


# -- bridge roles as processes ---------------------------------------------------------------


@dataclass
class RoleProcess:
    role: str
    process: asyncio.subprocess.Process
    log: IO[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_lines(self) -> list[str]:
        self.log.seek(0)
        return self.log.read().decode(errors="replace").splitlines()


async def wait_ready(url: str, role: RoleProcess, timeout: float = START_TIMEOUT) -> None:
    """Until GET {url}/readyz answers 200; SystemExit if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as http:
        while True:
            if role.process.returncode is not None:
                raise SystemExit(f"FAILED: {role.role} exited: {role.log_lines()[-3:]}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{url}/readyz")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise SystemExit(f"FAILED: {role.role} not ready: {role.log_lines()[-3:]}")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def role_process(
    role: str, config: Config, directory: Path, extra_env: Mapping[str, str] | None = None
) -> AsyncIterator[RoleProcess]:
    """`python -m bridge ROLE --config FILE` from this tree; SIGTERM (then SIGKILL) at exit."""
    text, env = config_toml(config)
    path = directory / f"{role}.toml"
    path.write_text(text, encoding="utf-8")
    environ = {**os.environ, **env, **(extra_env or {})}
    environ["PYTHONPATH"] = str(ROOT)
    with tempfile.TemporaryFile() as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            role,
            "--config",
            str(path),
            env=environ,
            cwd=str(ROOT),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        try:
            yield RoleProcess(role, process, log)
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except TimeoutError:
                    process.kill()
                    await process.wait()


# -- CPU and counts --------------------------------------------------------------------------


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU seconds of a process so far (0 without /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # After the command: state is field 3, utime and stime fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def topic_records(bootstrap: str, topic: str) -> int:
    """Records in `topic`, counted by reading it from the beginning to its end offsets."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=4 << 20
    )
    await consumer.start()
    try:
        await consumer.topics()
        partitions = consumer.partitions_for_topic(topic) or set()
        parts = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not parts:
            return 0
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        count = 0
        while [p for p in parts if await consumer.position(p) < ends[p]]:
            batches = await consumer.getmany(timeout_ms=500, max_records=50_000)
            count += sum(len(records) for records in batches.values())
        return count
    finally:
        await consumer.stop()


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest rank: the smallest value with `fraction` of the values at or below it."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]
