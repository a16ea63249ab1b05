"""The worker's per-order memory, kept in the compacted state topic.

Inbox, status and state share keys and partition counts, so the worker that owns
inbox partition p finds all of its orders' memory in state partition p and
restores exactly those partitions when they are assigned to it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from bridge.config import KafkaSettings
from bridge.kafka import client_options
from bridge.orders import Status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OrderState:
    """What the bridge last published about an order."""

    status: Status
    code: int | str
    event_id: str
    published_at: str

    def encode(self) -> bytes:
        return orjson.dumps({"version": 1, **asdict(self)})

    @classmethod
    def decode(cls, value: bytes) -> OrderState:
        data = orjson.loads(value)
        return cls(
            status=Status(data["status"]),
            code=data["code"],
            event_id=data["event_id"],
            published_at=data["published_at"],
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

    def forget(self, partitions: list[int]) -> None:
        for partition in partitions:
            self._partitions.pop(partition, None)

    def __len__(self) -> int:
        return sum(len(orders) for orders in self._partitions.values())

    async def restore(self, partitions: list[int]) -> None:
        """Reads `partitions` of the state topic from the beginning: last record per key wins."""
        started = time.monotonic()
        topic = self._settings.state_topic
        consumer = AIOKafkaConsumer(
            **client_options(self._settings), enable_auto_commit=False, fetch_max_wait_ms=50
        )
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in partitions]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            restored: dict[int, dict[str, OrderState]] = {p: {} for p in partitions}
            pending = {tp for tp in tps if ends[tp] > 0}
            while pending:
                batches = await consumer.getmany(*pending, timeout_ms=200)
                for tp, records in batches.items():
                    for record in records:
                        key = record.key.decode()
                        if record.value is None:
                            restored[tp.partition].pop(key, None)
                        else:
                            restored[tp.partition][key] = OrderState.decode(record.value)
                for tp in list(pending):
                    # Some brokers under-report end_offsets after a batched write: the
                    # high-water mark of a fetch is the end that counts.
                    end = max(ends[tp], consumer.highwater(tp) or 0)
                    if await consumer.position(tp) >= end:
                        pending.discard(tp)
        finally:
            await consumer.stop()
        self._partitions.update(restored)
        count = sum(len(orders) for orders in restored.values())
        log.info(
            "restored %d orders from %s partitions %s in %.2fs",
            count,
            topic,
            partitions,
            time.monotonic() - started,
        )
