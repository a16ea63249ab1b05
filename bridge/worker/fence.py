"""Hand-over fencing: a worker writes for a partition only while it surely owns it.

Kafka gives consumers no write fence without transactions, so the worker keeps its
own: a partition is writable from the moment its state is restored until its release
begins, and only while the member's group session is alive. The session is taken as
alive for `session_timeout` after the last heartbeat the coordinator answered; past
that, the group may already have handed the partition to another member, so writes
wait for the next good heartbeat, or for the revoke that follows a lost session.

What no fence kept by the writer can stop: a write checked while the lease held that
reaches Kafka only after it ended. The process may be frozen between the check and
the producer's request (a window of the producer's linger and a turn of the event
loop), or its request retried after a network fault: with idempotence on, aiokafka
retries a batch until Kafka takes it. Such a write lands after the next owner's, as
a duplicate or stale event. Closing that takes a fence kept by the broker, Kafka's
transactional producer (an epoch per transactional id), which the embedded broker
lacks; the operations guide says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from aiokafka.protocol.group import JoinGroupRequest

from bridge.errors import BridgeError


class Fenced(BridgeError):
    """The partition is no longer this worker's to write for: the work is handed back."""

    def __init__(self, partition: int) -> None:
        self.partition = partition
        super().__init__(f"inbox partition {partition} is no longer owned here")


class Fence:
    def __init__(self, session_timeout: float) -> None:
        # A margin below the broker's own timeout: a write sent just before it must
        # still land while the session holds.
        self._lease = session_timeout * 0.8
        self._renewed = time.monotonic()
        self._owned: set[int] = set()
        self._changed = asyncio.Event()

    def watch(self, coordinator: Any) -> None:
        """Renews the lease on every heartbeat aiokafka's group coordinator gets answered
        plainly, and ends it when the coordinator forgets this member."""
        heartbeat = coordinator._do_heartbeat

        async def watched() -> bool:
            sent = time.monotonic()
            answered: bool = await heartbeat()
            # aiokafka counts "rebalance in progress" as answered, and asks to rejoin.
            # Apache Kafka says it only to a member of the current generation, but the
            # embedded broker says it to one of an older generation too, whose partitions
            # may be another's by now: so it renews nothing.
            if answered and not coordinator._rejoin_needed_fut.done():
                self.renew(sent)
            elif coordinator.member_id == JoinGroupRequest.UNKNOWN_MEMBER_ID:
                self.lost()
            return answered

        # aiokafka has no heartbeat callback; it looks the method up on every beat.
        coordinator._do_heartbeat = watched

    def lost(self) -> None:
        """The session is gone: nothing is written until the next assignment."""
        self._renewed = float("-inf")
        self._owned.clear()
        self._wake()

    def renew(self, at: float | None = None) -> None:
        """The coordinator answered a heartbeat (or a join) sent at monotonic time `at`."""
        self._renewed = max(self._renewed, time.monotonic() if at is None else at)
        self._wake()

    @property
    def session_alive(self) -> bool:
        return time.monotonic() - self._renewed < self._lease

    def grant(self, partitions: list[int]) -> None:
        self._owned.update(partitions)
        self._wake()

    def revoke(self, partitions: list[int]) -> None:
        self._owned.difference_update(partitions)
        self._wake()

    async def check(self, partition: int) -> None:
        """Returns once `partition` may be written for; `Fenced` when it may not any more."""
        while True:
            if partition not in self._owned:
                raise Fenced(partition)
            if self.session_alive:
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.5)

    def _wake(self) -> None:
        self._changed.set()
