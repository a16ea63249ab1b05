"""Bridge processes for the fault tests: `order-bridge receiver` and `order-bridge worker`
run as real processes from this tree, SIGKILLed at will and restarted as a supervisor
would restart them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bridge.config import Config
from tests.bridge_fixtures import config_toml

# The tree these tests belong to: its `bridge` is the one the processes run.
ROOT = Path(__file__).resolve().parents[1]
# The process's own line once it runs: "order-bridge worker running", "... on URL".
_RUNNING = re.compile(rb"order-bridge [a-z ]+ running(?: on (\S+))?")


def write_config(config: Config, path: Path) -> dict[str, str]:
    """Writes `config` as TOML to `path`; returns the environment holding its secrets
    (`env:` references)."""
    text, env = config_toml(config)
    path.write_text(text)
    return env


@dataclass(frozen=True)
class Exit:
    """How one incarnation of a process ended."""

    name: str
    incarnation: int
    returncode: int
    # killed (our SIGKILL), stopped (our SIGTERM), or unexpected (it ended on its own).
    how: str
    log: Path

    def __str__(self) -> str:
        return f"{self.name}#{self.incarnation} {self.how} with {self.returncode} (log {self.log})"


class BridgeProcess:
    """One `order-bridge` role, started again and again; each incarnation logs to a file."""

    def __init__(
        self,
        name: str,
        role: str,
        config_file: Path,
        env: Mapping[str, str],
        log_dir: Path,
    ) -> None:
        self.name = name
        self.role = role
        self.config_file = config_file
        self.env = dict(env)
        self.log_dir = log_dir
        self.incarnation = 0
        # The log of an incarnation that never ran: it hung while starting (see terminate).
        self.hung: Path | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.log: Path = log_dir / f"{name}.0.log"
        self.url: str | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, extra_env: Mapping[str, str] | None = None) -> None:
        """Starts a new incarnation (the previous one must have ended)."""
        assert not self.alive, f"{self.name} is still running"
        self.incarnation += 1
        self.log = self.log_dir / f"{self.name}.{self.incarnation}.log"
        self.url = None
        # faulthandler: a process that hangs dumps its stacks on SIGABRT (see terminate).
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PYTHONFAULTHANDLER": "1",
            **self.env,
            **(extra_env or {}),
        }
        with self.log.open("wb") as out:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bridge",
                "-v",
                self.role,
                "--config",
                str(self.config_file),
                cwd=ROOT,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )

    async def wait_running(self, timeout: float = 30.0) -> None:
        """Returns once the incarnation logged that it runs; fails if it ends first."""
        deadline = time.monotonic() + timeout
        while True:
            found = _RUNNING.search(self.log.read_bytes())
            if found:
                self.url = found.group(1).decode() if found.group(1) else None
                return
            if not self.alive:
                raise AssertionError(f"{self.name} ended while starting:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not running after {timeout}s:\n{self.tail()}")
            await asyncio.sleep(0.05)

    async def wait_log(self, text: str, timeout: float) -> bool:
        """Whether the incarnation logs a line holding `text` within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while text.encode() not in self.log.read_bytes():
            if not self.alive or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def kill(self) -> int:
        """SIGKILL, and its exit status once it is gone."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        return await self.process.wait()

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, as an operator stops it; SIGKILL if it has not ended after `timeout`.

        An incarnation just started is first let run: a SIGTERM while Python still
        imports ends it by the signal's default action, before the bridge's handler."""
        assert self.process is not None
        try:
            await self.wait_running(min(timeout, 15.0))
        except AssertionError:
            if self.alive:  # hung while starting: faulthandler writes its stacks to its log
                self.hung = self.log
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGABRT)
                return await self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            return await self.kill()

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """Keeps `count` processes of a role running: one that ends, on its own or by our
    SIGKILL, is recorded and started again at once, as a supervisor would. Kills and
    stops go through here, so that it tells them apart from crashes."""

    def __init__(
        self,
        role: str,
        count: int,
        config_file: Path,
        env: Mapping[str, str],
        log_dir: Path,
        *,
        crash_env: Callable[[BridgeProcess], Mapping[str, str]] | None = None,
    ) -> None:
        self.processes = [
            BridgeProcess(f"{role}{i}", role, config_file, env, log_dir) for i in range(count)
        ]
        self.exits: list[Exit] = []
        # The extra environment of each incarnation (e.g. ORDER_BRIDGE_CRASH_AT).
        self._crash_env = crash_env or (lambda _: {})
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._expected: dict[str, str] = {}
        self._stopping = False
        self._lock = asyncio.Lock()

    @property
    def unexpected(self) -> list[Exit]:
        return [e for e in self.exits if e.how == "unexpected"]

    def count(self, how: str, returncode: int | None = None) -> int:
        return sum(
            1
            for e in self.exits
            if e.how == how and (returncode is None or e.returncode == returncode)
        )

    async def start(self, timeout: float = 30.0) -> None:
        async with self._lock:
            for process in self.processes:
                await self._start(process)
        await asyncio.gather(*(p.wait_running(timeout) for p in self.processes))

    async def kill(self, index: int) -> bool:
        """SIGKILLs one process, which is started again at once; False when it was not
        running at that moment (ended on its own, being restarted)."""
        async with self._lock:
            process = self.processes[index]
            if not process.alive:
                return False
            self._expected[process.name] = "killed"
            await process.kill()
            return True

    async def stop(self, timeout: float = 30.0) -> dict[str, int]:
        """SIGTERMs them all, as an operator would; their exit statuses by name."""
        async with self._lock:
            self._stopping = True
            running = [p for p in self.processes if p.alive]
            for process in running:
                self._expected[process.name] = "stopped"
        codes = await asyncio.gather(*(p.terminate(timeout) for p in running))
        await asyncio.gather(*self._watchers.values())
        return {p.name: code for p, code in zip(running, codes, strict=True)}

    async def _start(self, process: BridgeProcess) -> None:
        await process.start(self._crash_env(process))
        self._watchers[process.name] = asyncio.create_task(self._watch(process))

    async def _watch(self, process: BridgeProcess) -> None:
        assert process.process is not None
        code = await process.process.wait()
        async with self._lock:
            how = self._expected.pop(process.name, "unexpected")
            ended = Exit(process.name, process.incarnation, code, how, process.log)
            self.exits.append(ended)
            if how == "unexpected":
                print(f"supervisor: {ended}; starting it again")
            if not self._stopping:
                await self._start(process)
