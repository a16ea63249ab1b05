"""A consumer of order-bridge's status events, with aiokafka and the CloudEvents SDK.

    pip install aiokafka cloudevents cryptography
    ORDER_BRIDGE_CARD_KEY=... python examples/consumer.py --bootstrap-servers HOST:9092

It reads the status topic from its beginning and prints one line an event:

- `new` for a change it had not seen, with the order's status before and after;
- `duplicate` for a change seen before (same `ce_id`): delivery is at least once, so
  a change published again after a crash comes twice and is handled once;
- `gap` for an event whose `previous_status` is not the status this consumer last saw
  for the order: an event it missed (it started mid-stream, or the topic's retention
  dropped it). It carries on from the new status.

With the account's `card_key` in ORDER_BRIDGE_CARD_KEY, sealed card secrets are opened;
only the last four characters of a card number are printed.

A production consumer keeps the same memory (each order's last status and its events'
ids) in its own database, updated with its own effects, and reads with a consumer
group whose offsets it commits after them. See docs/events.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary_event
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

EVENT_TYPE = "order.status.changed"
SEALED = "sealed:v1:"


def unseal(card_key: str, field: str, value: str) -> str:
    """A sealed card secret, opened: AES-256-GCM, the field's name as associated data."""
    raw = base64.urlsafe_b64decode(value.removeprefix(SEALED))
    aead = AESGCM(base64.b64decode(card_key))
    return aead.decrypt(raw[:12], raw[12:], field.encode()).decode()


def sealed_values(details: Any, field: str = "") -> Iterator[tuple[str, str]]:
    """Every (field, sealed value) in an event's `details`, however deep."""
    if isinstance(details, dict):
        for name, value in details.items():
            yield from sealed_values(value, name)
    elif isinstance(details, list):
        for item in details:
            yield from sealed_values(item, field)
    elif isinstance(details, str) and details.startswith(SEALED):
        yield field, details


@dataclass
class Order:
    status: str | None = None
    event_ids: set[str] = field(default_factory=set)


class Orders:
    """What the consumer remembers of each order (by its key, provider/account/order_id)."""

    def __init__(self) -> None:
        self._orders: dict[str, Order] = {}

    def take(self, key: str, event_id: str, status: str, previous: str | None) -> str:
        """`new`, `duplicate` or `gap`: what the event is to this consumer."""
        order = self._orders.setdefault(key, Order())
        if event_id in order.event_ids:
            return "duplicate"
        verdict = "new" if previous == order.status else "gap"
        order.status = status
        order.event_ids.add(event_id)
        return verdict


async def consume(
    bootstrap_servers: str, topic: str, card_key: str | None, until_end: bool
) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions) if until_end else {}
        orders = Orders()
        counts: Counter[str] = Counter()
        while True:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    message = KafkaMessage(dict(record.headers), record.key, record.value)
                    event = from_binary_event(message)
                    if event.get_type() != EVENT_TYPE:
                        continue
                    data = event.get_data()
                    assert isinstance(data, dict), "a status event's data is a JSON object"
                    key = record.key.decode()
                    verdict = orders.take(
                        key, event.get_id(), data["status"], data["previous_status"]
                    )
                    counts[verdict] += 1
                    print(describe(verdict, key, event.get_id(), data))
                    if verdict != "duplicate":
                        for line in open_cards(data["details"], card_key):
                            print(f"    {line}")
            if until_end and all([await at_end(consumer, tp, ends[tp]) for tp in partitions]):
                break
        print(
            f"{sum(counts.values())} events: "
            + ", ".join(f"{counts[v]} {v}" for v in ("new", "duplicate", "gap"))
        )
    finally:
        await consumer.stop()


async def at_end(consumer: AIOKafkaConsumer, tp: TopicPartition, end: int) -> bool:
    # Some brokers report a short end offset after a batched write: the high-water
    # mark of a fetch is the end that counts, once a fetch for the partition answered.
    highwater = consumer.highwater(tp)
    return highwater is not None and await consumer.position(tp) >= max(end, highwater)


def describe(verdict: str, key: str, event_id: str, data: dict[str, Any]) -> str:
    change = f"{data['previous_status'] or 'null'} -> {data['status']}"
    return f"{verdict:<9} {key} {change} ({data['trigger']}) {event_id}"


def open_cards(details: Any, card_key: str | None) -> Iterator[str]:
    for name, value in sealed_values(details):
        if card_key is None:
            yield f"{name} sealed (no card key)"
        elif name in ("card_no", "card_number"):
            yield f"{name} ...{unseal(card_key, name, value)[-4:]}"
        else:
            unseal(card_key, name, value)
            yield f"{name} opened"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="order-status.v1")
    parser.add_argument(
        "--until-end", action="store_true", help="stop at the end of the topic as it is now"
    )
    args = parser.parse_args()
    card_key = os.environ.get("ORDER_BRIDGE_CARD_KEY")
    try:
        asyncio.run(consume(args.bootstrap_servers, args.topic, card_key, args.until_end))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
