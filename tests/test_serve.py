"""`order-bridge serve` as a process: on two cores the receiver in its process and the
worker in a child; with --one-process both in one. Each stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bridge.broker import free_port
from bridge.config import KafkaSettings
from bridge.processes import WORKER_NICENESS
from tests.bridge_fixtures import bridge_config, config_toml
from tests.conftest import RunningSandbox
from tests.kafka import read_topic

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="serve splits on 2+ CPUs")


@dataclass
class Serve:
    process: asyncio.subprocess.Process
    url: str

    def children(self) -> list[int]:
        return children_of(self.process.pid)

    async def worker(self) -> int:
        """The worker child: started once the receiver is up, so maybe after /readyz."""
        await wait_until(lambda: len(self.children()) == 1, "no worker child started")
        (pid,) = self.children()
        return pid

    async def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        """Sends `sig`; the exit code and the log, once the process has ended."""
        if self.process.returncode is None:
            self.process.send_signal(sig)
        _, stderr = await asyncio.wait_for(self.process.communicate(), 40)
        assert self.process.returncode is not None
        return self.process.returncode, stderr.decode()


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # After the command's closing parenthesis: state, then the parent's pid.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def serving(
    sandbox: RunningSandbox, kafka: KafkaSettings, tmp_path: Path, *options: str
) -> AsyncIterator[Serve]:
    config = bridge_config(sandbox, kafka)
    config = dataclasses.replace(config, http=dataclasses.replace(config.http, port=free_port()))
    text, env = config_toml(config)
    (tmp_path / "bridge.toml").write_text(text)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "serve", "--config", str(tmp_path / "bridge.toml"),
        *options, env={**os.environ, **env}, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    serve = Serve(process, f"http://{config.http.host}:{config.http.port}")
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            deadline = time.monotonic() + 30
            while not await ready(http, serve.url):
                assert process.returncode is None, "serve ended before it was ready"
                assert time.monotonic() < deadline, "serve never became ready"
                await asyncio.sleep(0.1)
        yield serve
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for child in children_of(process.pid):
            os.kill(child, signal.SIGKILL)


async def ready(http: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await http.get(f"{url}/readyz")).status_code == 200
    except httpx.TransportError:
        return False


async def post_one(sandbox: RunningSandbox, serve: Serve, kafka: KafkaSettings) -> None:
    """A callback in, its event out."""
    order = sandbox.sandbox.create_order("lunpay-test", status=4)
    body, content_type = sandbox.sandbox.callback("lunpay-test", order.order_id)
    async with httpx.AsyncClient(timeout=5) as http:
        answer = await http.post(
            f"{serve.url}/callbacks/lunpay/lunpay-test",
            content=body,
            headers={"content-type": content_type},
        )
    assert answer.status_code == 200
    async with read_topic(kafka, kafka.status_topic) as status:
        (event,) = await status.wait_for_count(1)
    assert event.value["order_id"] == order.order_id


async def test_the_worker_runs_in_a_child_and_both_stop_cleanly_on_sigterm(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    async with serving(sandbox, kafka_settings, tmp_path) as serve:
        worker = await serve.worker()
        # Short of CPU, the receiver goes first: the worker's backlog waits in the inbox.
        assert os.getpriority(os.PRIO_PROCESS, worker) == (
            os.getpriority(os.PRIO_PROCESS, serve.process.pid) + WORKER_NICENESS
        )
        await post_one(sandbox, serve, kafka_settings)
        code, log = await serve.stop()
    assert code == 0, log
    assert not alive(worker)
    assert f"the worker in process {worker}" in log
    # Each stopped as on SIGTERM: the child when serve closed its stdin.
    assert log.count("stopping: finishing in-flight work") == 2, log
    assert "Traceback" not in log


async def test_one_process_keeps_the_worker_in(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    async with serving(sandbox, kafka_settings, tmp_path, "--one-process") as serve:
        assert serve.children() == []
        await post_one(sandbox, serve, kafka_settings)
        code, log = await serve.stop()
    assert code == 0, log


async def test_a_worker_child_that_dies_stops_serve(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    async with serving(sandbox, kafka_settings, tmp_path) as serve:
        worker = await serve.worker()
        os.kill(worker, signal.SIGKILL)
        code, log = await serve.stop(signal.SIGCONT)  # no stop asked: it must end on its own
    assert code != 0
    assert f"the worker process {worker} was ended by signal 9" in log


async def test_the_worker_child_stops_when_serve_is_killed(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    async with serving(sandbox, kafka_settings, tmp_path) as serve:
        worker = await serve.worker()
        await serve.stop(signal.SIGKILL)
        await wait_until(lambda: not alive(worker), "the orphaned worker kept running")
