"""deploy/grafana/order-bridge.json: every PromQL expression names metrics the bridge exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bridge.metrics import Metrics

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "order-bridge.json"

# Words of PromQL that are neither functions (those are followed by "(") nor metrics.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
_KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan"}
_CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges: [5m], [$__rate_interval]
    expr = _CLAUSE.sub(" ", expr)
    names = set()
    for match in _NAME.finditer(expr):
        name = match.group()
        if expr[match.end() :].lstrip().startswith("(") or name.lower() in _KEYWORDS:
            continue  # a function or an aggregation
        names.add(name)
    return names


def exported() -> set[str]:
    """The sample names the bridge's registry can serve, by family type."""
    names = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        else:
            names.add(family.name)
    return names


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and templating query."""
    found = []
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            found.append((f"{panel['title']} {target['refId']}", target["expr"]))
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            # Grafana's label_values(metric, label): the metric is the PromQL part.
            selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert selector, query
            found.append((f"variable {variable['name']}", selector.group(1)))
    return found


def test_the_parser_finds_metric_names_and_nothing_else() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, provider) (rate(order_bridge_query_seconds_bucket"
        '{job=~"$job", outcome="ok"}[$__rate_interval])))'
        " / on (provider) group_left sum without (account) (up offset 5m) > bool 1e3"
    )
    assert metric_names(expr) == {"order_bridge_query_seconds_bucket", "up"}
    assert metric_names("sum(rate(order_bridge_nope_total[5m]))") == {"order_bridge_nope_total"}
    assert "order_bridge_nope_total" not in exported()
    # A histogram has no series under its bare name, nor a counter without `_total`.
    assert "order_bridge_query_seconds" not in exported()
    assert "order_bridge_callbacks" not in exported()
    assert "order_bridge_callbacks_total" in exported()
    assert "process_cpu_seconds_total" in exported()


@pytest.mark.parametrize(("where", "expr"), expressions())
def test_every_expression_names_only_metrics_the_bridge_exports(where: str, expr: str) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr}"
    assert names <= exported(), f"{where}: {sorted(names - exported())} not exported"


def test_the_dashboard_has_the_panels_an_operator_needs() -> None:
    panels = dashboard()["panels"]
    titles = {panel["title"] for panel in panels}
    for needed in (
        "Ingest rate by outcome",
        "Inbox lag",
        "Query latency",
        "Events by status",
        "Dead letters by reason",
        "Circuit breakers",
    ):
        assert needed in titles
    assert len({panel["id"] for panel in panels}) == len(panels)
    latency = next(p for p in panels if p["title"] == "Query latency")
    assert all("histogram_quantile" in t["expr"] for t in latency["targets"])
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
