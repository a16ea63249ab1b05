"""The sandbox's memory: orders with their status history, the queries it saw, fault settings."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from bridge.sandbox import wire


@dataclass(frozen=True)
class Faults:
    """How badly one account's provider behaves; the defaults are a healthy provider."""

    # Seconds added before each query is answered.
    latency: float = 0.0
    # Fraction of queries answered with a failure, by turns: HTTP 500 with the provider's
    # error envelope, HTTP 502 with a proxy's HTML page, HTTP 200 with text that is not JSON.
    error_rate: float = 0.0
    # Never answer in time (an hour, or until the client gives up): its timeout must fire.
    hang: bool = False
    # Answer 503 with a proxy's HTML page at once.
    down: bool = False
    # Fraction of queries answered by a lagging replica: each order's previous status.
    stale_rate: float = 0.0
    # Order ids the provider chokes on: a query naming any of them is refused as a whole
    # with the provider's error envelope (kasushou: code 400), the others with it too.
    refuse_ids: tuple[str, ...] = ()
    # Order ids the provider answers "not found" for, although it has them (a glitch of
    # its database or cache): each provider's own not-found answer, as for an unknown id
    # (lemft: empty data; lunpay: code 403 "order not found"; kasushou: left out).
    missing_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.hang, bool) or not isinstance(self.down, bool):
            raise TypeError("hang and down must be true or false")
        for name in ("refuse_ids", "missing_ids"):
            ids = getattr(self, name)
            if isinstance(ids, str) or not all(isinstance(i, str) for i in ids):
                raise TypeError(f"{name} must be a list of order ids")
            # JSON gives a list; a tuple keeps Faults hashable and comparable.
            object.__setattr__(self, name, tuple(ids))
        if not self.latency >= 0.0:
            raise ValueError(f"latency must be >= 0, got {self.latency!r}")
        for name in ("error_rate", "stale_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {rate!r}")


@dataclass
class SandboxOrder:
    """One order at a sandbox provider; `history` holds every status it has had, oldest first."""

    account: str
    provider: str
    order_id: str
    amount: Decimal
    currency: str
    external_order_id: str
    history: list[int]
    # Provider-specific fields (card_list, card_id, third_a_id, ...): generated defaults
    # overridden by what the test asked for. They win over computed values in answers.
    fields: dict[str, Any]
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def status(self) -> int:
        return self.history[-1]

    @property
    def previous_status(self) -> int:
        """The status before the current one (the current one when it never changed)."""
        return self.history[-2] if len(self.history) > 1 else self.history[-1]

    def to_json(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "provider": self.provider,
            "order_id": self.order_id,
            "external_order_id": self.external_order_id,
            "status": self.status,
            "status_history": list(self.history),
            "amount": str(self.amount),
            "currency": self.currency,
            "fields": wire.jsonable(self.fields),
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True)
class QueryRecord:
    """One order-detail query the sandbox received."""

    provider: str
    # The account its non-secret ids name (even when its key or sign was wrong);
    # None when they name no account.
    account: str | None
    order_ids: tuple[str, ...]
    # time.monotonic() when the request arrived.
    received_at: float
    # ok, not_found, stale, bad_sign, unknown_account, malformed, bad_path, fault, down, hang,
    # refused, missing (Faults.missing_ids hid an order it has)
    outcome: str
    # The caller's User-Agent: tells apart bridge instances querying one account.
    client: str = ""
    # The W3C trace context the query carried, as a provider's log would keep it.
    traceparent: str = ""


class OrderBook:
    """Every account's orders, and the log of queries."""

    def __init__(self) -> None:
        self._orders: dict[tuple[str, str], SandboxOrder] = {}
        self.queries: list[QueryRecord] = []

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._orders

    def add(self, order: SandboxOrder) -> None:
        self._orders[order.account, order.order_id] = order

    def get(self, account: str, order_id: str) -> SandboxOrder:
        try:
            return self._orders[account, order_id]
        except KeyError:
            raise KeyError(f"no order {order_id!r} at sandbox account {account!r}") from None

    def all(self) -> list[SandboxOrder]:
        return list(self._orders.values())

    def find(
        self, account: str, ids: Iterable[str], *, by_external: bool = False, days: int = 0
    ) -> list[SandboxOrder]:
        """The account's orders named by `ids`, once each, in the order asked; `days` > 0
        keeps only orders created within that many days, as kasushou's `day` does."""
        since = datetime.now(UTC) - timedelta(days=days) if days > 0 else None
        found: dict[str, SandboxOrder] = {}
        for wanted in ids:
            if not wanted:
                continue
            if by_external:
                matches = [
                    order
                    for order in self._orders.values()
                    if order.account == account and order.external_order_id == wanted
                ]
            else:
                # Looked up, not searched: a scan of every order for each id asked was
                # two thirds of the benchmarks' driver CPU (benchmarks/README.md).
                order = self._orders.get((account, wanted))
                matches = [order] if order is not None else []
            for order in matches:
                if since is None or order.created_at >= since:
                    found.setdefault(order.order_id, order)
        return list(found.values())

    def query_count(self, account: str, order_id: str) -> int:
        return sum(1 for q in self.queries if q.account == account and order_id in q.order_ids)
