"""A running bridge: the receiver, the worker, or both, started and stopped in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Sequence
from types import TracebackType

from starlette.applications import Starlette

from bridge import __version__, processes, tracing
from bridge.config import Config
from bridge.errors import StartupError
from bridge.kafka import Producer, ensure_topics
from bridge.metrics import Metrics
from bridge.probes import create_probe_app
from bridge.receiver import Readiness, create_app
from bridge.servers import serve
from bridge.worker import Worker

log = logging.getLogger(__name__)


class Bridge:
    """`async with Bridge(config) as bridge:` runs it; leaving the block shuts it down:
    stop taking callbacks, finish or hand back in-flight hints, commit, close."""

    def __init__(self, config: Config, *, receiver: bool = True, worker: bool = True) -> None:
        self.config = config
        self.metrics = Metrics()
        self.producer = Producer(config.kafka)
        self.worker: Worker | None = None
        # The receiver's base URL; a worker-only bridge serves its probes on `probe_url`.
        self.url: str | None = None
        self.probe_url: str | None = None
        # Names this bridge to providers (User-Agent), so their logs tell instances apart.
        self.instance = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"
        self._with_receiver = receiver
        self._with_worker = worker
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Bridge:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        await ensure_topics(self.config.kafka)
        await self.producer.start()
        self._stack.push_async_callback(self.producer.stop)
        if self._with_worker and not self._with_receiver:
            # Up before the worker joins its group and down after it left: /healthz
            # answers throughout, /readyz says what is not running yet.
            app = create_probe_app(self.metrics, self.readiness)
            self.probe_url = await self._serve(app, self.config.worker.http_port)
        if self._with_worker:
            user_agent = f"order-bridge/{__version__} ({self.instance})"
            self.worker = Worker(self.config, self.producer, self.metrics, user_agent=user_agent)
            await self.worker.start()
            self._stack.push_async_callback(self.worker.stop)
        if self._with_receiver:
            app = create_app(self.config, self.producer, self.metrics, self.readiness)
            tracing.instrument_app(app)
            self.url = await self._serve(app, self.config.http.port)

    async def _serve(self, app: Starlette, port: int) -> str:
        """Serves `app` on `[http] host` and `port` until the bridge stops; its base URL."""
        settings = self.config.http
        return await self._stack.enter_async_context(
            serve(
                app,
                settings.host,
                port,
                header_timeout=settings.header_timeout,
                idle_timeout=settings.idle_timeout,
            )
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def readiness(self) -> Readiness:
        """What keeps the bridge from being ready, and what slows it down."""
        problems, degraded = [], []
        if not await self.producer.reachable():
            problems.append(f"Kafka at {self.config.kafka.bootstrap_servers} is not reachable")
        if self._with_worker:
            worker = self.worker
            problems += worker.problems() if worker else ["the worker is not running"]
            degraded += worker.degraded() if worker else []
        return Readiness(problems, degraded)


async def run(
    config: Config,
    *,
    receiver: bool = True,
    worker: bool = True,
    worker_command: Sequence[str] | None = None,
    with_parent: bool = False,
) -> None:
    """Runs the bridge until SIGTERM or SIGINT; a second signal exits at once.

    With `worker_command`, the worker runs as that child process instead of in this
    one (`bridge.processes`); with `with_parent`, this process stops when its parent
    is gone. A worker that dies on its own, in this process or in the child, stops
    the bridge too, with StartupError: a process that exits gets restarted by its
    supervisor, a half-dead one would just sit there.
    """
    stop = stop_on_signals()
    if with_parent:
        processes.stop_with_parent(stop)
    tracing.setup(config.tracing)
    async with contextlib.AsyncExitStack() as stack:
        in_process = worker and not worker_command
        # The receiver first: without Kafka it fails the start before a child exists.
        bridge = await stack.enter_async_context(
            Bridge(config, receiver=receiver, worker=in_process)
        )
        child = None
        if worker and worker_command:
            drain = config.worker.drain_timeout
            child = await stack.enter_async_context(processes.worker_process(worker_command, drain))
        parts = " and ".join(p for p, on in (("receiver", receiver), ("worker", worker)) if on)
        where = f" on {bridge.url}" if bridge.url else ""
        if bridge.probe_url:
            where = f"; /healthz, /readyz and /metrics on {bridge.probe_url}"
        if child is not None:
            where += f"; the worker in process {child.pid}"
        log.info("order-bridge %s running%s", parts, where)
        if child is not None:
            failure = await _until_stopped(stop, processes.exited(child))
        else:
            failure = await _until_stopped(stop, bridge.worker.failure() if bridge.worker else None)
        if failure is not None:
            raise StartupError(f"the worker stopped: {failure}; exiting")
        log.info("stopping: finishing in-flight work")


async def _until_stopped(stop: asyncio.Event, failure: Awaitable[str] | None) -> str | None:
    """Waits for `stop`; returns early, saying why, when `failure` (the worker's end)
    comes first."""
    if failure is None:
        await stop.wait()
        return None
    stopping = asyncio.create_task(stop.wait())
    failing = asyncio.ensure_future(failure)
    await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    failing.cancel()
    return None if stop.is_set() else failing.result()


def stop_on_signals() -> asyncio.Event:
    """An event the first SIGINT or SIGTERM sets; a second signal exits at once.

    Installed before anything starts, so a signal at any moment means a clean stop.
    """
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            log.error("second signal: exiting now")
            os._exit(1)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    return stop
