"""`order-bridge deadletters`: reading the dead-letter topic, chosen by a `Filter`.

Besides dead letters (`bridge.deadletter`), the topic holds the markers `order-bridge
replay` leaves: a record with the header `replay_of` and the value `{"replay_of":
{"partition", "offset"}, "at"}` says the dead letter at that place was written back
into the inbox. They carry no `reason`, so a reader counting dead letters by reason
skips them; here they only mark their dead letter as replayed.
"""

from __future__ import annotations

import contextlib
import re
import typing
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka.structs import ConsumerRecord

from bridge import providers
from bridge.clock import iso, utc_now
from bridge.config import ACCOUNT_NAME, KafkaSettings
from bridge.deadletter import Reason
from bridge.kafka import read_to_end
from bridge.redact import shown
from bridge.tail import follow_topic, kafka_errors, partitions_of

REASONS: tuple[str, ...] = typing.get_args(Reason)
MARKER_HEADER = "replay_of"
_RELATIVE = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_EPOCH = datetime.min.replace(tzinfo=UTC)

Position = tuple[int, int]  # partition, offset


@dataclass(frozen=True)
class DeadLetter:
    partition: int
    offset: int
    value: dict[str, Any]
    # When it was replayed, if it was (a marker names it).
    replayed_at: str | None = None

    @property
    def position(self) -> Position:
        return self.partition, self.offset

    @property
    def reason(self) -> str:
        return str(self.value.get("reason"))

    @property
    def provider(self) -> str:
        return str(self.value.get("provider") or "?")

    @property
    def account(self) -> str:
        return str(self.value.get("account") or "?")

    @property
    def order_id(self) -> str | None:
        order_id = self.value.get("order_id")
        return None if order_id is None else str(order_id)

    @property
    def key(self) -> str:
        return f"{self.provider}/{self.account}/{self.order_id or '-'}"

    @property
    def at(self) -> datetime:
        try:
            return datetime.fromisoformat(str(self.value.get("at")))
        except ValueError:
            return _EPOCH

    def describe(self) -> str:
        """`at  reason  provider/account/order  attempts N  detail  [replayed at]`, client
        input escaped."""
        replayed = f"  (replayed {self.replayed_at})" if self.replayed_at else ""
        return (
            f"{self.value.get('at')}  {self.reason}  {shown(self.key)}"
            f"  attempts {self.value.get('attempts', 0)}"
            f"  {shown(str(self.value.get('detail', '')), 300)}{replayed}"
        )

    def to_json(self) -> dict[str, Any]:
        """The record as written, with its place in the topic and when it was replayed."""
        where = {"partition": self.partition, "offset": self.offset}
        return {**self.value, "position": where, "replayed_at": self.replayed_at}


@dataclass(frozen=True)
class Filter:
    """Which dead letters a command is about; every criterion given must hold."""

    reasons: frozenset[str] = frozenset()
    provider: str | None = None
    account: str | None = None
    # A key `provider/account/order_id`, or an order id alone.
    order: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, letter: DeadLetter) -> bool:
        if self.reasons and letter.reason not in self.reasons:
            return False
        if self.provider is not None and letter.provider != self.provider:
            return False
        if self.account is not None and letter.account != self.account:
            return False
        if self.order is not None and self.order not in (letter.key, letter.order_id):
            return False
        if self.since is not None and letter.at < self.since:
            return False
        return self.until is None or letter.at < self.until


# Parsers of the filters as given on the command line: ValueError says what is wrong.


def parse_reason(text: str) -> str:
    if text not in REASONS:
        raise ValueError(f"unknown reason {shown(text)!r} (one of: {', '.join(REASONS)})")
    return text


def parse_provider(text: str) -> str:
    if text not in providers.names():
        choices = ", ".join(providers.names())
        raise ValueError(f"unknown provider {shown(text)!r} (one of: {choices})")
    return text


def parse_account(text: str) -> str:
    if not ACCOUNT_NAME.fullmatch(text):
        raise ValueError(f"not an account name: {shown(text)!r} (a-z, 0-9 and '-')")
    return text


def parse_order(text: str) -> str:
    parts = text.split("/")
    if not text.isprintable() or " " in text or len(parts) not in (1, 3) or not all(parts):
        raise ValueError(f"not an order id or provider/account/order_id: {shown(text)!r}")
    return text


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (UTC unless it says otherwise), or a time ago: `30s`, `15m`, `2h`, `7d`."""
    if relative := _RELATIVE.fullmatch(text):
        amount, unit = relative.groups()
        return (now or utc_now()) - timedelta(**{_UNITS[unit]: int(amount)})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"not a time: {shown(text)!r} (ISO 8601 such as 2026-11-22T10:00:00Z, "
            "or a time ago such as 30m, 2h, 7d)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass
class Topic:
    """The dead-letter topic as read to its end: dead letters oldest first, markers apart."""

    letters: list[DeadLetter] = field(default_factory=list)
    replayed: dict[Position, str] = field(default_factory=dict)

    def chosen(self, chosen: Filter) -> list[DeadLetter]:
        """The dead letters `chosen` matches, oldest first, each with its replay time."""
        return [
            DeadLetter(d.partition, d.offset, d.value, self.replayed.get(d.position))
            for d in self.letters
            if chosen.matches(d)
        ]


async def read_topic(settings: KafkaSettings) -> Topic:
    """The whole dead-letter topic as it is now (empty when it does not exist yet)."""
    topic = Topic()
    partitions = await partitions_of(settings, settings.deadletter_topic)
    if not partitions:
        return topic
    with kafka_errors(settings):
        async for record in read_to_end(settings, settings.deadletter_topic, partitions):
            marker = _marker(record)
            if marker is not None:
                topic.replayed[marker[0]] = marker[1]
            elif (letter := _letter(record)) is not None:
                topic.letters.append(letter)
    topic.letters.sort(key=lambda d: (d.at, d.position))
    return topic


@contextlib.asynccontextmanager
async def follow(
    settings: KafkaSettings, chosen: Filter
) -> AsyncIterator[AsyncIterator[DeadLetter]]:
    """Yields, once it reads from the topic's end, an iterator over the dead letters
    `chosen` matches as they are written."""
    async with follow_topic(settings, settings.deadletter_topic, from_beginning=False) as records:

        async def matching() -> AsyncIterator[DeadLetter]:
            with kafka_errors(settings):
                async for record in records:
                    letter = _letter(record)
                    if letter is not None and chosen.matches(letter):
                        yield letter

        yield matching()


def replay_marker(position: Position) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value and headers of the marker saying the dead letter at `position` was replayed."""
    partition, offset = position
    value = {"replay_of": {"partition": partition, "offset": offset}, "at": iso(utc_now())}
    return orjson.dumps(value), [(MARKER_HEADER, f"{partition}:{offset}".encode())]


def _decoded(record: ConsumerRecord) -> dict[str, Any] | None:
    try:
        value = orjson.loads(record.value) if record.value is not None else None
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _letter(record: ConsumerRecord) -> DeadLetter | None:
    value = _decoded(record)
    if value is None or "reason" not in value:
        return None
    return DeadLetter(record.partition, record.offset, value)


def _marker(record: ConsumerRecord) -> tuple[Position, str] | None:
    if not any(name == MARKER_HEADER for name, _ in record.headers):
        return None
    value = _decoded(record) or {}
    of = value.get("replay_of")
    if not isinstance(of, dict):
        return None
    partition, offset = of.get("partition"), of.get("offset")
    if not isinstance(partition, int) or not isinstance(offset, int):
        return None
    return (partition, offset), str(value.get("at"))


def newest_first(letters: Collection[DeadLetter]) -> list[DeadLetter]:
    return sorted(letters, key=lambda d: (d.at, d.position), reverse=True)
