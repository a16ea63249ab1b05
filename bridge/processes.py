"""`serve` on several cores: the receiver in this process, the worker in a child.

One event loop running both gives each a share of one core; the receiver then
answers callbacks only as fast as the worker leaves it room. A child process for
the worker gives each its own core, under one command and one supervisor.

The child is `order-bridge worker --with-parent`, with this process's config and
log options. It holds a pipe from this process as its stdin: when this process is
gone, even SIGKILLed, the pipe ends and the child stops as on SIGTERM; closing it is
also how this process stops the child.

The child runs at a lower CPU priority (nice +WORKER_NICENESS). When the machine is
short of CPU, the receiver goes first: a provider waits on its answer and may give up
and retry, while the worker's backlog waits safely in the inbox and is caught up once
the peak passes. With CPU to spare, the priority changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence

log = logging.getLogger(__name__)

# Added to the child's nice value. At +10, the child gets about a tenth of a core it
# shares with the receiver (Linux's weights: 110 to 1024).
WORKER_NICENESS = 10
# Time the child gets beyond its own drain to stop after SIGTERM, before SIGKILL.
STOP_GRACE = 15.0


def worker_command(config: str | None, options: Sequence[str]) -> list[str]:
    """The child's command line: `config` is the --config given (None: the
    ORDER_BRIDGE_CONFIG the child inherits), `options` the log options."""
    command = [sys.executable, "-m", "bridge", "worker", "--with-parent", *options]
    return command + (["--config", config] if config else [])


@contextlib.asynccontextmanager
async def worker_process(
    command: Sequence[str], drain_timeout: float
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Runs the worker child for the block. It is stopped by closing its stdin, not by
    a signal: a SIGINT from the terminal or a SIGTERM to the whole group reaches it
    too, and a second signal would make it exit at once, undrained. SIGKILL if it
    has not stopped within its `drain_timeout` and a grace."""
    child = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.PIPE)
    with contextlib.suppress(OSError):  # where the OS refuses, the child keeps our priority
        os.setpriority(
            os.PRIO_PROCESS, child.pid, os.getpriority(os.PRIO_PROCESS, 0) + WORKER_NICENESS
        )
    log.info("worker process %d started", child.pid)
    try:
        yield child
    finally:
        if child.stdin is not None:
            child.stdin.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_timeout + STOP_GRACE):
                await child.wait()
        if child.returncode is None:
            log.error("worker process %d did not stop in time: killed", child.pid)
            child.kill()
            await child.wait()


async def exited(child: asyncio.subprocess.Process) -> str:
    """Waits for `child` to end; says how."""
    code = await child.wait()
    if code < 0:
        return f"the worker process {child.pid} was ended by signal {-code}"
    return f"the worker process {child.pid} exited with {code}"


def stop_with_parent(stop: asyncio.Event) -> None:
    """Sets `stop` when the parent's end of our stdin closes: the parent is gone."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()

    def readable() -> None:
        try:
            data = os.read(fd, 1024)
        except BlockingIOError:
            return
        if not data:
            loop.remove_reader(fd)
            if not stop.is_set():
                log.info("the parent process closed our stdin (it stops, or it is gone)")
                stop.set()

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
