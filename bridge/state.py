"""The worker's per-order memory, kept in the compacted state topic.

Inbox, status and state share keys and partition counts, so the worker that owns
inbox partition p finds all of its orders' memory in state partition p and
restores exactly those partitions when they are assigned to it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import orjson

from bridge.clock import epoch_from_iso, iso_from_epoch
from bridge.config import KafkaSettings
from bridge.kafka import read_to_end
from bridge.orders import Status

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OrderState:
    """What the bridge knows of an order it follows: what it published, when to ask again.

    Times are epoch seconds here (small in memory) and ISO 8601 in the record.
    """

    first_seen: float
    # The last published status; None until the first event.
    status: Status | None = None
    code: int | str | None = None
    event_id: str | None = None
    published_at: float | None = None
    # When to poll next; None once the order is final or no longer followed.
    next_poll: float | None = None
    # Answers in a row that changed nothing: picks the poll interval.
    polls: int = 0
    # "Not found" answers in a row (a watched order whose creation lags).
    misses: int = 0
    # When an order no longer followed is forgotten.
    forget_at: float | None = None

    @property
    def next_due(self) -> float | None:
        """When the worker next acts on the order: a poll, or forgetting it."""
        return self.next_poll if self.next_poll is not None else self.forget_at

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "version": 1,
                "first_seen_at": iso_from_epoch(self.first_seen),
                "status": None if self.status is None else self.status.value,
                "code": self.code,
                "event_id": self.event_id,
                "published_at": iso_from_epoch(self.published_at),
                "next_poll_at": iso_from_epoch(self.next_poll),
                "polls": self.polls,
                "misses": self.misses,
                "forget_at": iso_from_epoch(self.forget_at),
            }
        )

    @classmethod
    def decode(cls, value: bytes) -> OrderState:
        data = orjson.loads(value)
        first_seen = epoch_from_iso(data["first_seen_at"])
        assert first_seen is not None
        return cls(
            first_seen=first_seen,
            status=None if data["status"] is None else Status(data["status"]),
            code=data["code"],
            event_id=data["event_id"],
            published_at=epoch_from_iso(data["published_at"]),
            next_poll=epoch_from_iso(data["next_poll_at"]),
            polls=data["polls"],
            misses=data["misses"],
            forget_at=epoch_from_iso(data.get("forget_at")),
        )


class StateStore:
    """The states of the orders in the partitions this worker owns."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._partitions: dict[int, dict[str, OrderState]] = {}

    def get(self, partition: int, key: str) -> OrderState | None:
        return self._partitions.get(partition, {}).get(key)

    def put(self, partition: int, key: str, state: OrderState) -> None:
        """Remembers a state already written to the state topic."""
        self._partitions.setdefault(partition, {})[key] = state

    def remove(self, partition: int, key: str) -> None:
        self._partitions.get(partition, {}).pop(key, None)

    def forget(self, partitions: list[int]) -> None:
        for partition in partitions:
            self._partitions.pop(partition, None)

    def __len__(self) -> int:
        return sum(len(orders) for orders in self._partitions.values())

    def items(self, partition: int) -> list[tuple[str, OrderState]]:
        return list(self._partitions.get(partition, {}).items())

    async def restore(self, partitions: list[int]) -> None:
        """Reads `partitions` of the state topic from the beginning: last record per key wins."""
        started = time.monotonic()
        topic = self._settings.state_topic
        restored: dict[int, dict[str, OrderState]] = {p: {} for p in partitions}
        async for record in read_to_end(self._settings, topic, partitions):
            orders = restored[record.partition]
            key = record.key.decode()
            if record.value is None:
                orders.pop(key, None)
            else:
                orders[key] = OrderState.decode(record.value)
        self._partitions.update(restored)
        count = sum(len(orders) for orders in restored.values())
        log.info(
            "restored %d orders from %s partitions %s in %.2fs",
            count,
            topic,
            partitions,
            time.monotonic() - started,
        )
