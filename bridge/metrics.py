"""Counters and gauges, rendered in the Prometheus text format. Labels never hold secrets."""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

Kind = Literal["counter", "gauge"]

# Every metric the bridge exports: name -> (kind, help).
METRICS: dict[str, tuple[Kind, str]] = {
    "order_bridge_callbacks_total": (
        "counter",
        "Callbacks received, by provider, account, outcome",
    ),
    "order_bridge_watch_requests_total": ("counter", "Watch requests received, by outcome"),
    "order_bridge_inbox_writes_total": ("counter", "Inbox writes, by outcome (ok, timeout, error)"),
    "order_bridge_hints_total": ("counter", "Hints the worker finished, by provider, outcome"),
    "order_bridge_queries_total": ("counter", "Order-detail queries, by provider, outcome"),
    "order_bridge_events_published_total": ("counter", "Status events published, by status"),
    "order_bridge_stale_answers_total": (
        "counter",
        "Confirmed statuses older than the one published (not published)",
    ),
    "order_bridge_deadletters_total": ("counter", "Dead-letter records written, by reason"),
    "order_bridge_hints_coalesced_total": (
        "counter",
        "Hints that waited for their order together and were answered by one query",
    ),
    "order_bridge_breaker_open": (
        "gauge",
        "1 while an account's circuit breaker is open or half-open, by provider, account",
    ),
    "order_bridge_hints_in_flight": ("gauge", "Hints taken from the inbox and not finished"),
    "order_bridge_orders_known": ("gauge", "Orders whose state the worker holds"),
    "order_bridge_orders_followed": ("gauge", "Orders not final yet, with a poll scheduled"),
}

Labels = tuple[tuple[str, str], ...]


class Metrics:
    def __init__(self) -> None:
        self._values: dict[str, dict[Labels, float]] = defaultdict(dict)

    def inc(self, name: str, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._values[self._known(name)]
        series[key] = series.get(key, 0) + 1

    def set(self, name: str, value: float, **labels: str) -> None:
        self._values[self._known(name)][tuple(sorted(labels.items()))] = value

    def value(self, name: str, **labels: str) -> float:
        return self._values[self._known(name)].get(tuple(sorted(labels.items())), 0)

    def total(self, name: str) -> float:
        """The sum over every label set of `name`."""
        return sum(self._values[self._known(name)].values())

    def render(self) -> str:
        lines = []
        for name, (kind, help_text) in METRICS.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for labels, value in sorted(self._values.get(name, {}).items()):
                lines.append(f"{name}{_labels(labels)} {value:g}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _known(name: str) -> str:
        if name not in METRICS:
            raise KeyError(f"unknown metric {name}")
        return name


def _labels(labels: Labels) -> str:
    if not labels:
        return ""

    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels) + "}"
