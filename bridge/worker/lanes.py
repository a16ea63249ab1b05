"""Per-order sequencing: one order's hints one after another, different orders at once."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]


class OrderLanes:
    """Runs the jobs of one key in submission order, and jobs of different keys concurrently.

    A job handles its own errors; one that raises anyway is logged, and the lane goes
    on with the next, so one bad job never strands the ones behind it.
    """

    def __init__(self) -> None:
        self._lanes: dict[str, collections.deque[Job]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, key: str, job: Job) -> None:
        lane = self._lanes.get(key)
        if lane is not None:
            lane.append(job)
            return
        self._lanes[key] = collections.deque([job])
        task = asyncio.create_task(self._run(key), name=f"order {key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: str) -> None:
        lane = self._lanes[key]
        try:
            while lane:
                try:
                    await lane[0]()
                except Exception:
                    log.exception("a job for %s failed", key)
                lane.popleft()
        finally:
            del self._lanes[key]

    def __contains__(self, key: str) -> bool:
        """Whether `key` has work queued or running."""
        return key in self._lanes

    def __len__(self) -> int:
        """The number of orders with work queued or running."""
        return len(self._lanes)

    async def drain(self, timeout: float) -> int:
        """Waits up to `timeout` seconds for every lane to finish, then cancels the rest.

        Returns how many lanes were cancelled.
        """
        tasks = set(self._tasks)
        if not tasks:
            return 0
        _, unfinished = await asyncio.wait(tasks, timeout=timeout)
        for task in unfinished:
            task.cancel()
        for task in unfinished:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return len(unfinished)
