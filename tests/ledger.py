"""The ledger of a fault test: what was sent to the bridge and how it was answered, what
the sandbox providers held, and what the status topic ends up holding; `check()` holds
them to the contract's guarantees and returns every violation found, one line each.

    async with Ledger(sandbox, settings) as ledger:
        key = ledger.track("lunpay", "lunpay-test", order_id)
        await ledger.deliver(http, url, key, body, content_type, claimed=4)
        ...
        await ledger.wait_settled(60)
        ...  # stop the bridge
        await ledger.read_all()
    assert ledger.check() == []

The checks, per order, over its events in their partition's order:
- every order with a callback or watch answered 200/202 has events, and its last event
  is the provider's final state (status and code);
- nothing unconfirmed: every event's code is one the sandbox held for the order at some
  time, and its status is that code's status in the contract's table;
- previous_status chains from null: each event's previous_status is the status of the
  order's event before it (copies of an event aside);
- no rank moves backward, against the highest rank ever published (`unknown` has none);
- a copy of an event (a re-publish) has the same ce_id and the same content, and comes
  right after it; a change published twice with two ce_ids is a violation;
- the CloudEvents headers name the order the record's key names.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx
import orjson

from bridge.config import KafkaSettings
from bridge.kafka import ensure_topics, read_to_end
from bridge.sandbox import Sandbox
from tests.kafka import Record, TopicReader, check_status_event

# The contract's status mapping: provider code -> status. Anything else is `unknown`.
STATUS_TABLES: dict[str, dict[int, str]] = {
    "lemft": {0: "processing", 1: "succeeded", 2: "refunded", 3: "failed", 4: "on_hold"},
    "lunpay": {
        0: "processing",
        1: "pending",
        2: "processing",
        3: "on_hold",
        4: "succeeded",
        5: "cancelled",
        6: "refunded",
        7: "failed",
        8: "pending",
        9: "partially_paid",
    },
    "kasushou": {
        -1: "pending",
        1: "pending",
        2: "processing",
        3: "succeeded",
        4: "cancelled",
        5: "refunded",
    },
}
RANKS = {
    "pending": 0,
    "processing": 1,
    "on_hold": 1,
    "partially_paid": 1,
    "succeeded": 2,
    "failed": 2,
    "cancelled": 2,
    "refunded": 3,
}
# Fields of an event that may differ between copies of it: when it was observed, and
# what made the bridge look (a re-publish after a crash may come from a poll).
_COPY_MAY_DIFFER = frozenset({"observed_at", "trigger"})
# Answers meaning "stored": 200 for a callback, 202 for a watch request.
_ACCEPTED = frozenset({200, 202})


def status_of(provider: str, code: int | str) -> str:
    table = STATUS_TABLES[provider]
    return table.get(code, "unknown") if isinstance(code, int) else "unknown"


def describe(provider: str, code: int | str) -> str:
    return f"{status_of(provider, code)} (code {code})"


@dataclass
class Delivery:
    """One callback or watch request, and every answer it got (0: no answer at all)."""

    key: str
    kind: str  # callback | watch
    # The provider code it claims (a callback's status; None for a watch).
    claimed: int | None
    # Whether it claims a status the provider does not hold.
    forged: bool
    answers: list[int] = field(default_factory=list)
    # When each answer came (time.monotonic()).
    times: list[float] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return any(a in _ACCEPTED for a in self.answers)


@dataclass
class Order:
    provider: str
    account: str
    order_id: str
    deliveries: list[Delivery] = field(default_factory=list)
    # Moves of the provider's state whose callback was never posted.
    lost: int = 0

    @property
    def key(self) -> str:
        return f"{self.provider}/{self.account}/{self.order_id}"

    @property
    def accepted(self) -> int:
        return sum(1 for d in self.deliveries if d.accepted)


@dataclass(frozen=True)
class Event:
    """One record of the status topic, as a consumer reads it."""

    key: str
    partition: int
    offset: int
    headers: dict[str, str]
    value: dict[str, Any]

    @property
    def ce_id(self) -> str:
        return self.headers.get("ce_id", "")

    @property
    def status(self) -> str:
        return str(self.value.get("status"))

    @property
    def previous_status(self) -> str | None:
        previous = self.value.get("previous_status")
        return None if previous is None else str(previous)

    @property
    def code(self) -> int | str:
        code = (self.value.get("provider_status") or {}).get("code")
        return code if isinstance(code, int | str) else repr(code)

    def content(self) -> dict[str, Any]:
        return {k: v for k, v in self.value.items() if k not in _COPY_MAY_DIFFER}

    def describe(self) -> str:
        return f"{self.status} (code {self.code}, ce_id {self.ce_id[:8]})"


class Ledger:
    def __init__(self, sandbox: Sandbox, settings: KafkaSettings) -> None:
        self.sandbox = sandbox
        self.settings = settings
        self.orders: dict[str, Order] = {}
        # The status topic as read at the end (`read_all`), or as followed so far.
        self.events: list[Event] = []
        self.deadletters: list[dict[str, Any]] = []
        self._reader = TopicReader(settings, settings.status_topic)
        self._read_all = False

    async def __aenter__(self) -> Ledger:
        await ensure_topics(self.settings)
        await self._reader.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._reader.stop()

    # -- what was sent ----------------------------------------------------------------

    def track(self, provider: str, account: str, order_id: str) -> str:
        """An order of the test; returns its key."""
        order = Order(provider, account, order_id)
        assert order.key not in self.orders, f"{order.key} tracked twice"
        self.orders[order.key] = order
        return order.key

    def lost(self, key: str) -> None:
        """The provider moved the order and its callback is never posted."""
        self.orders[key].lost += 1

    async def deliver(
        self,
        http: httpx.AsyncClient,
        url: str,
        key: str,
        content: bytes,
        content_type: str,
        *,
        kind: str = "callback",
        claimed: int | None = None,
        forged: bool = False,
        timeout: float = 90.0,
    ) -> Delivery:
        """Posts as a provider does: again after `Retry-After` on a 503 (or after a
        moment when the bridge does not answer at all) until it is stored or `timeout`
        seconds have passed. Every answer is recorded."""
        delivery = Delivery(key, kind, claimed, forged)
        self.orders[key].deliveries.append(delivery)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                answer = await http.post(
                    url, content=content, headers={"content-type": content_type}
                )
            except httpx.HTTPError:
                delivery.answers.append(0)
                delivery.times.append(time.monotonic())
                await asyncio.sleep(0.5)  # a provider's retry delay, not a synchronization
                continue
            delivery.answers.append(answer.status_code)
            delivery.times.append(time.monotonic())
            if answer.status_code != 503:
                return delivery
            await asyncio.sleep(float(answer.headers.get("retry-after", "1")))
        return delivery

    # -- what was published ---------------------------------------------------------

    def _settled(self, records: list[Record]) -> bool:
        last: dict[str, Record] = {}
        for record in records:
            last[record.key] = record
        for key, order in self.orders.items():
            if not order.accepted:
                continue
            latest = last.get(key)
            if latest is None or latest.value is None:
                return False
            code = (latest.value.get("provider_status") or {}).get("code")
            if code != self.current(key):
                return False
        return True

    async def wait_published(self, count: int, timeout: float) -> None:
        """Follows the status topic until it holds `count` events."""
        await self._reader.wait_for(
            lambda records: len(records) >= count, timeout, f"{count} events"
        )

    async def wait_settled(self, timeout: float) -> bool:
        """Follows the status topic until every order with an accepted callback has the
        provider's current state as its last event, or `timeout` seconds have passed
        (then False: `check()` says which orders are behind)."""
        deadline = time.monotonic() + timeout
        await self._reader.wait_for(
            lambda records: self._settled(records) or time.monotonic() > deadline,
            timeout + 30,
            "settled orders",
        )
        return self._settled(self._reader.records)

    async def read_all(self) -> None:
        """Reads the status and dead-letter topics from the beginning to their end, for
        `check()`: call it once the bridge is stopped, so nothing arrives later."""
        events = []
        async for r in read_to_end(self.settings, self.settings.status_topic):
            events.append(
                Event(
                    key=r.key.decode(errors="replace") if r.key else "",
                    partition=r.partition,
                    offset=r.offset,
                    headers={k: v.decode(errors="replace") for k, v in r.headers or ()},
                    value=orjson.loads(r.value) if r.value else {},
                )
            )
        for e in events:
            check_status_event(e.headers, e.value, f"{e.key} at {e.partition}/{e.offset}")
        self.events = sorted(events, key=lambda e: (e.partition, e.offset))
        deadletters = []
        async for r in read_to_end(self.settings, self.settings.deadletter_topic):
            deadletters.append(orjson.loads(r.value) if r.value else {})
        self.deadletters = deadletters
        self._read_all = True

    # -- what the providers held ----------------------------------------------------

    def held(self, key: str) -> list[int]:
        """Every status the sandbox has held for the order, oldest first."""
        order = self.orders[key]
        return list(self.sandbox.order(order.account, order.order_id).history)

    def current(self, key: str) -> int:
        return self.held(key)[-1]

    # -- the checks -----------------------------------------------------------------

    def check(self) -> list[str]:
        """Every violation of the guarantees, one precise line each; [] when none."""
        assert self._read_all, "read_all() first, once the bridge is stopped"
        found: list[str] = []
        by_key: dict[str, list[Event]] = defaultdict(list)
        for event in self.events:
            by_key[event.key].append(event)
        for key in sorted(set(by_key) - set(self.orders)):
            found.append(f"{key}: {len(by_key[key])} events for an order the test never made")
        for key, order in self.orders.items():
            found += self._check_order(order, by_key.get(key, []))
        return found

    def _check_order(self, order: Order, events: list[Event]) -> list[str]:
        key, provider = order.key, order.provider
        held = self.held(key)
        final = held[-1]
        found: list[str] = []
        if not events:
            if order.accepted:
                found.append(
                    f"{key}: no event, though {order.accepted} callback(s) were accepted; "
                    f"the provider holds {describe(provider, final)}"
                )
            return found
        seen: dict[str, tuple[int, Event]] = {}
        # The order's events without their copies: (number, event).
        chain: list[tuple[int, Event]] = []
        highest: tuple[int, int, Event] | None = None  # rank, number, event
        for n, event in enumerate(events, 1):
            label = f"{key}: event {n}"
            found += _check_headers(label, order, event)
            if event.status != status_of(provider, event.code):
                found.append(
                    f"{label} says {event.status} for code {event.code}, "
                    f"which is {status_of(provider, event.code)}"
                )
            if event.code not in held:
                claimed = any(d.claimed == event.code for d in order.deliveries)
                found.append(
                    f"{label} publishes {describe(provider, event.code)}, which the provider "
                    f"never held (it held {_codes(provider, held)})"
                    + ("; a forged callback claimed it" if claimed else "")
                )
            if event.ce_id in seen:
                m, first = seen[event.ce_id]
                if event.content() != first.content():
                    found.append(
                        f"{label} repeats the ce_id of event {m} with other content: "
                        f"{_differences(first.content(), event.content())}"
                    )
                if chain[-1][1].ce_id != event.ce_id:
                    found.append(
                        f"{label} repeats event {m} ({first.describe()}) after event "
                        f"{chain[-1][0]} ({chain[-1][1].describe()})"
                    )
                continue
            seen[event.ce_id] = (n, event)
            if chain:
                m, before = chain[-1]
                if event.previous_status != before.status:
                    found.append(
                        f"{label} previous_status {event.previous_status or 'null'}, "
                        f"expected {before.status}"
                    )
                if (event.status, event.code) == (before.status, before.code):
                    found.append(
                        f"{label} publishes the change of event {m} "
                        f"({describe(provider, event.code)}) again with a new ce_id "
                        f"({before.ce_id[:8]} then {event.ce_id[:8]})"
                    )
            elif event.previous_status is not None:
                found.append(
                    f"{label} previous_status {event.previous_status}, "
                    "expected null (the order's first event)"
                )
            rank = RANKS.get(event.status)
            if rank is not None:
                if highest is not None and rank < highest[0]:
                    found.append(
                        f"{label} moves back to {event.status} (rank {rank}) after "
                        f"{highest[2].status} (rank {highest[0]}) in event {highest[1]}"
                    )
                if highest is None or rank > highest[0]:
                    highest = (rank, n, event)
            chain.append((n, event))
        last = chain[-1][1]
        if last.code != final or last.status != status_of(provider, final):
            found.append(
                f"{key}: last event {last.describe()}, but the provider ends at "
                f"{describe(provider, final)}"
            )
        return found

    def explain(self, key: str) -> str:
        """The order's story, for a violation's reader: what the provider held, what was
        sent, and its events."""
        order = self.orders.get(key)
        provider = key.split("/", 1)[0]
        lines = [f"{key}:"]
        if order is not None:
            lines.append(f"  held {_codes(provider, self.held(key))}; {order.lost} moves lost")
            for d in order.deliveries:
                claim = "" if d.claimed is None else f" claiming {describe(provider, d.claimed)}"
                forged = " (forged)" if d.forged else ""
                lines.append(f"  {d.kind}{claim}{forged}: answered {d.answers}")
        for n, e in enumerate((e for e in self.events if e.key == key), 1):
            lines.append(
                f"  event {n} at {e.partition}/{e.offset}: {e.describe()} previous "
                f"{e.previous_status or 'null'}, {e.value.get('trigger')}, "
                f"observed {e.value.get('observed_at')}"
            )
        return "\n".join(lines)

    # -- figures for the report -----------------------------------------------------

    def summary(self) -> str:
        by_key: dict[str, list[Event]] = defaultdict(list)
        for event in self.events:
            by_key[event.key].append(event)
        changes = sum(len({e.ce_id for e in events}) for events in by_key.values())
        deliveries = [d for o in self.orders.values() for d in o.deliveries]
        answers = Counter(a for d in deliveries for a in d.answers)
        reasons = Counter(str(d.get("reason")) for d in self.deadletters)
        triggers = Counter(str(e.value.get("trigger")) for e in self.events)
        queries = self.sandbox.queries
        outcomes = Counter(q.outcome for q in queries)
        lost = sum(o.lost for o in self.orders.values())
        accepted = sum(d.accepted for d in deliveries)
        forged = sum(d.forged for d in deliveries)
        return (
            f"orders {len(self.orders)} (moves never called back {lost}), "
            f"deliveries {len(deliveries)} (accepted {accepted}, forged {forged}), "
            f"answers {dict(sorted(answers.items()))}; "
            f"events {len(self.events)}, changes {changes}, copies {len(self.events) - changes}, "
            f"triggers {dict(triggers)}; dead letters {dict(reasons)}; "
            f"queries {len(queries)} ({len(queries) / max(1, len(self.orders)):.1f} an order, "
            f"{dict(outcomes)})"
        )


def _check_headers(label: str, order: Order, event: Event) -> list[str]:
    expected = {
        "ce_specversion": "1.0",
        "ce_type": "order.status.changed",
        "ce_source": f"order-bridge/{order.provider}/{order.account}",
        "ce_subject": order.order_id,
        "content-type": "application/json",
    }
    found = [
        f"{label} header {name} is {event.headers.get(name)!r}, expected {value!r}"
        for name, value in expected.items()
        if event.headers.get(name) != value
    ]
    if not event.ce_id:
        found.append(f"{label} has no ce_id")
    named = tuple(event.value.get(k) for k in ("provider", "account", "order_id"))
    if named != (order.provider, order.account, order.order_id):
        found.append(f"{label} names {'/'.join(map(str, named))} in its value")
    return found


def _codes(provider: str, codes: list[int]) -> str:
    return " -> ".join(f"{status_of(provider, c)}/{c}" for c in codes)


def _differences(first: dict[str, Any], second: dict[str, Any]) -> str:
    names = sorted(set(first) | set(second))
    return ", ".join(
        f"{n} {first.get(n)!r} then {second.get(n)!r}"
        for n in names
        if first.get(n) != second.get(n)
    )
