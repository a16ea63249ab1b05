"""The bridge's Prometheus metrics, kept by prometheus-client. Labels never hold secrets.

Every metric is declared once, in `METRICS`, with its labels. Each label takes values
from a bounded set: a fixed vocabulary declared here (`Spec.values`), or a configured
one (`provider`: a provider's name or `unknown`; `account`: a configured account or
`unknown`; `partition`: an inbox partition number). Each `Metrics` has its own
registry, so several bridges can run in one process (the tests do).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar, get_args

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from bridge.deadletter import Reason
from bridge.errors import (
    CredentialsRejected,
    InvalidAnswer,
    MismatchedAnswer,
    OrderNotFound,
    ProviderRejected,
    ProviderUnavailable,
)
from bridge.orders import Status

# `_created` series double what is scraped and tell an operator nothing a counter's
# reset does not (process-wide: prometheus-client has no per-registry switch).
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

# What `generate_latest` writes, as prometheus-client's own server labels it for a
# scraper that asks for nothing newer.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Kind = Literal["counter", "gauge", "histogram"]

CALLBACK_OUTCOMES = (
    "accepted",
    "unavailable",
    "unknown_account",
    "rejected_400",
    "rejected_401",
    "rejected_413",
    "rejected_415",
)
WATCH_OUTCOMES = ("accepted", "unavailable", "unknown_account", "rejected_400", "rejected_413")
INBOX_OUTCOMES = ("ok", "timeout", "error")
HINT_OUTCOMES = (
    "publish",
    "unchanged",
    "stale",
    "deferred",
    "failed",
    "not_found",
    "not_found_glitch",
    "unconfirmed",
    "query_failed",
    "rejected",
)
QUERY_OUTCOMES = (
    "ok",
    "unavailable",
    "invalid_answer",
    "credentials_rejected",
    "rejected",
    "not_found",
    "error",
)
STATUSES = tuple(s.value for s in Status)
REASONS: tuple[str, ...] = get_args(Reason)

# Seconds. Answers and queries: prometheus-client's defaults (5 ms to 10 s).
_FAST = Histogram.DEFAULT_BUCKETS
# From a callback's arrival to its event: retries and open circuits take minutes.
_SLOW = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclass(frozen=True)
class Spec:
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    # The fixed vocabulary of a label; labels not here take configured values.
    values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    buckets: tuple[float, ...] = _FAST


# Every metric the bridge exports, by name. Labels in alphabetical order, as rendered.
METRICS: dict[str, Spec] = {
    "order_bridge_callbacks_total": Spec(
        "counter",
        "Callbacks received, by provider, account and outcome",
        ("account", "outcome", "provider"),
        {"outcome": CALLBACK_OUTCOMES},
    ),
    "order_bridge_callback_seconds": Spec(
        "histogram",
        "Time from a callback's request to its answer, by provider and outcome",
        ("outcome", "provider"),
        {"outcome": CALLBACK_OUTCOMES},
    ),
    "order_bridge_watch_requests_total": Spec(
        "counter", "Watch requests received, by outcome", ("outcome",), {"outcome": WATCH_OUTCOMES}
    ),
    "order_bridge_inbox_writes_total": Spec(
        "counter",
        "Inbox writes, by outcome (ok, timeout, error)",
        ("outcome",),
        {"outcome": INBOX_OUTCOMES},
    ),
    "order_bridge_inbox_write_seconds": Spec(
        "histogram",
        "Time for Kafka to ack an inbox write (or give up), by outcome",
        ("outcome",),
        {"outcome": INBOX_OUTCOMES},
    ),
    "order_bridge_hints_total": Spec(
        "counter",
        "Hints and polls the worker finished, by provider and outcome",
        ("outcome", "provider"),
        {"outcome": HINT_OUTCOMES},
    ),
    "order_bridge_queries_total": Spec(
        "counter",
        "Order-detail queries sent, by provider, account and outcome",
        ("account", "outcome", "provider"),
        {"outcome": QUERY_OUTCOMES},
    ),
    "order_bridge_query_seconds": Spec(
        "histogram",
        "Time an order-detail query took, by provider and outcome",
        ("outcome", "provider"),
        {"outcome": QUERY_OUTCOMES},
    ),
    "order_bridge_callback_to_event_seconds": Spec(
        "histogram",
        "Time from a callback's arrival at the receiver to its status event's ack, by provider"
        " (callbacks that brought a change only)",
        ("provider",),
        buckets=_SLOW,
    ),
    "order_bridge_events_published_total": Spec(
        "counter", "Status events published, by status", ("status",), {"status": STATUSES}
    ),
    "order_bridge_stale_answers_total": Spec(
        "counter",
        "Confirmed statuses older than the one published (not published), by provider",
        ("provider",),
    ),
    "order_bridge_deadletters_total": Spec(
        "counter", "Dead-letter records written, by reason", ("reason",), {"reason": REASONS}
    ),
    "order_bridge_hints_coalesced_total": Spec(
        "counter",
        "Hints that waited for their order together and were answered by one query",
        ("provider",),
    ),
    "order_bridge_breaker_open": Spec(
        "gauge",
        "1 while an account's circuit breaker is open or half-open (its queries wait), else 0",
        ("account", "provider"),
    ),
    "order_bridge_hints_in_flight": Spec(
        "gauge", "Hints taken from the inbox by this worker and not finished"
    ),
    "order_bridge_oldest_hint_age_seconds": Spec(
        "gauge",
        "Age of the oldest hint taken from the inbox and not finished, since it was written"
        " to the inbox; 0 when none is",
    ),
    "order_bridge_inbox_lag": Spec(
        "gauge",
        "Inbox records of a partition this worker owns that are not committed yet:"
        " the partition's high watermark minus the committed offset, by partition",
        ("partition",),
    ),
    "order_bridge_orders_known": Spec(
        "gauge", "Orders whose state this worker holds (followed or kept until forgotten)"
    ),
    "order_bridge_orders_followed": Spec(
        "gauge",
        "Orders this worker polls until their status is final (a next poll is scheduled);"
        " not those only kept until forgotten",
    ),
}

_Metric = Counter | Gauge | Histogram
_M = TypeVar("_M", Counter, Gauge, Histogram)


def query_outcome(error: Exception | None) -> str:
    """The `outcome` label of a query that ended with `error` (None: answered)."""
    if error is None:
        return "ok"
    if isinstance(error, ProviderUnavailable):
        return "unavailable"
    if isinstance(error, InvalidAnswer | MismatchedAnswer):
        return "invalid_answer"
    if isinstance(error, CredentialsRejected):
        return "credentials_rejected"
    if isinstance(error, OrderNotFound):
        return "not_found"
    if isinstance(error, ProviderRejected):
        return "rejected"
    return "error"


class Metrics:
    """The bridge's metrics in a registry of their own, with the process's."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._metrics: dict[str, _Metric] = {
            name: _build(name, spec, self.registry) for name, spec in METRICS.items()
        }
        # The series of counters and histograms met so far, by name and labels: looking
        # one up with `labels()` each time was a twentieth of a callback's CPU. Labels take
        # values from bounded sets (above), and only gauges' series are ever dropped, so
        # these stay small and never go stale.
        self._counters: dict[tuple[object, ...], Counter] = {}
        self._histograms: dict[tuple[object, ...], Histogram] = {}

    def inc(self, name: str, **labels: str) -> None:
        self.counter(name, **labels).inc()

    def counter(self, name: str, **labels: str) -> Counter:
        """The series of the counter `name` with `labels`, to keep and count on."""
        # Labels in the caller's order: another order gets an entry of its own, same series.
        key = (name, *labels.items())
        series = self._counters.get(key)
        if series is None:
            series = self._counters[key] = _series(self._get(name, Counter), labels)
        return series

    def set(self, name: str, value: float, **labels: str) -> None:
        metric = self._get(name, Gauge)
        (metric.labels(**labels) if labels else metric).set(value)

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        self.histogram(name, **labels).observe(seconds)

    def histogram(self, name: str, **labels: str) -> Histogram:
        """The series of the histogram `name` with `labels`, to keep and observe on."""
        key = (name, *labels.items())
        series = self._histograms.get(key)
        if series is None:
            series = self._histograms[key] = _series(self._get(name, Histogram), labels)
        return series

    def sample(self, name: str, value: Callable[[], float]) -> None:
        """Makes the unlabelled gauge `name` call `value` whenever it is scraped."""
        self._get(name, Gauge).set_function(value)

    def forget(self, name: str, **labels: str) -> None:
        """Drops one series of the gauge `name`, such as a partition's once handed over."""
        self._get(name, Gauge).remove(*(labels[label] for label in METRICS[name].labels))

    def value(self, name: str, **labels: str) -> float:
        """The sample `name` with exactly `labels`; 0 when there is none. For a histogram,
        `name` may end in `_count` or `_sum`."""
        for sample in self._samples(name):
            if sample.name == name and sample.labels == labels:
                return sample.value
        return 0.0

    def total(self, name: str) -> float:
        """The sum of `name`'s samples over every label set."""
        return sum(s.value for s in self._samples(name) if s.name == name)

    def render(self) -> str:
        """Every metric in the Prometheus text format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry).decode()

    def _samples(self, name: str) -> list[prometheus_client.samples.Sample]:
        base = name.removesuffix("_count").removesuffix("_sum")
        metric = self._metrics[self._known(base if base in METRICS else name)]
        return [sample for family in metric.collect() for sample in family.samples]

    def _get(self, name: str, kind: type[_M]) -> _M:
        metric = self._metrics[self._known(name)]
        if not isinstance(metric, kind):
            raise TypeError(f"{name} is a {METRICS[name].kind}")
        return metric

    @staticmethod
    def _known(name: str) -> str:
        if name not in METRICS:
            raise KeyError(f"unknown metric {name}")
        return name


def _series(metric: _M, labels: Mapping[str, str]) -> _M:
    return metric.labels(**labels) if labels else metric


def _build(name: str, spec: Spec, registry: CollectorRegistry) -> _Metric:
    if spec.kind == "counter":
        return Counter(name, spec.help, spec.labels, registry=registry)
    if spec.kind == "gauge":
        return Gauge(name, spec.help, spec.labels, registry=registry)
    return Histogram(name, spec.help, spec.labels, registry=registry, buckets=spec.buckets)
