"""Which inbox offset may be committed: the first one not finished yet."""

from __future__ import annotations


class PartitionOffsets:
    """Offsets of one partition taken from the inbox, finished in any order.

    Committing offset n tells Kafka every record before n is done, so the
    committable offset is the smallest unfinished one (or one past the last seen).
    """

    def __init__(self) -> None:
        self._pending: set[int] = set()
        self._next: int | None = None
        self._committed: int | None = None

    def started(self, offset: int) -> None:
        self._pending.add(offset)
        self._next = max(self._next or 0, offset + 1)

    def finished(self, offset: int) -> None:
        self._pending.discard(offset)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def to_commit(self) -> int | None:
        """The offset to commit now, or None when nothing new is committable."""
        if self._next is None:
            return None
        offset = min(self._pending) if self._pending else self._next
        return None if offset == self._committed else offset

    def committed(self, offset: int) -> None:
        self._committed = offset
