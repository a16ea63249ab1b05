"""When each followed order is asked again: the polls of the partitions a worker owns."""

from __future__ import annotations

import heapq


class PollSchedule:
    """Due times of the orders of each owned partition.

    An order rescheduled leaves its old entry behind; `due()` skips entries that no
    longer match the order's latest time, so rescheduling is one push, never a search.
    """

    def __init__(self) -> None:
        self._heaps: dict[int, list[tuple[float, str]]] = {}
        self._latest: dict[int, dict[str, float]] = {}

    def own(self, partition: int) -> None:
        """Starts keeping the polls of `partition`."""
        self._heaps.setdefault(partition, [])
        self._latest.setdefault(partition, {})

    def set(self, partition: int, key: str, when: float | None) -> None:
        """Polls `key` at `when` (epoch seconds); None stops polling it.

        Ignored for a partition not owned: work finishing after its partition was
        handed over must not poll on behind the new owner's back.
        """
        latest = self._latest.get(partition)
        if latest is None:
            return
        if when is None:
            latest.pop(key, None)
            return
        latest[key] = when
        heapq.heappush(self._heaps[partition], (when, key))

    def forget(self, partitions: list[int]) -> None:
        for partition in partitions:
            self._heaps.pop(partition, None)
            self._latest.pop(partition, None)

    def due(self, now: float, limit: int) -> list[tuple[int, str]]:
        """Takes up to `limit` orders due by `now`, earliest first across partitions.

        A taken order is not due again until `set()` schedules it anew.
        """
        taken: list[tuple[int, str]] = []
        while len(taken) < limit:
            partition = self._earliest_partition()
            if partition is None:
                break
            heap = self._heaps[partition]
            when, key = heap[0]
            if when > now:
                break
            heapq.heappop(heap)
            latest = self._latest[partition]
            if latest.get(key) == when:
                del latest[key]
                taken.append((partition, key))
        return taken

    def next_due(self) -> float | None:
        partition = self._earliest_partition()
        return None if partition is None else self._heaps[partition][0][0]

    def __len__(self) -> int:
        """The number of orders with a poll scheduled."""
        return sum(len(latest) for latest in self._latest.values())

    def _earliest_partition(self) -> int | None:
        heads = [(heap[0][0], p) for p, heap in self._heaps.items() if heap]
        return min(heads)[1] if heads else None
