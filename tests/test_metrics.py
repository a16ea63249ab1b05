"""/metrics through prometheus-client: histograms and gauges with sane values after a
callback becomes an event, exact large values, and label values from fixed sets only."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge import providers
from bridge.config import KafkaSettings
from bridge.errors import (
    CredentialsRejected,
    InvalidAnswer,
    MismatchedAnswer,
    OrderNotFound,
    ProviderRejected,
    ProviderUnavailable,
)
from bridge.metrics import CONTENT_TYPE, METRICS, QUERY_OUTCOMES, Metrics, query_outcome
from bridge.sandbox import Faults
from tests.bridge_fixtures import RunningBridge
from tests.conftest import RunningSandbox

DEADLINE = 20.0


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    return [
        Sample(s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The sample `name` whose labels include `labels`; None when there is none."""
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"{name} {labels} matches {len(found)} samples"
    return found[0] if found else None


async def scrape_until(
    bridge: RunningBridge, check: Callable[[list[Sample]], bool], what: str
) -> list[Sample]:
    """The /metrics samples, once `check` holds for them."""
    deadline = time.monotonic() + DEADLINE
    while True:
        answer = await bridge.http.get(f"{bridge.url}/metrics")
        samples = parse(answer.text)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what}:\n{answer.text}")
        await asyncio.sleep(0.05)


async def test_a_callback_that_becomes_an_event_shows_in_histograms_and_gauges(
    bridge: RunningBridge,
) -> None:
    latency = 1.5
    account = bridge.sandbox.accounts["kasushou"].name
    order_id, key = bridge.create("kasushou", "processing")
    bridge.sandbox.sandbox.set_faults(account, Faults(latency=latency))
    assert (await bridge.post_callback("kasushou", order_id)).status_code == 200

    # While its query waits at the provider, the hint is in flight, and uncommitted.
    def in_flight(samples: list[Sample]) -> bool:
        lags = [s.value for s in samples if s.name == "order_bridge_inbox_lag"]
        return (
            value(samples, "order_bridge_hints_in_flight") == 1
            and (value(samples, "order_bridge_oldest_hint_age_seconds") or 0) > 0
            and max(lags, default=0) >= 1
        )

    samples = await scrape_until(bridge, in_flight, "a hint in flight")
    assert (value(samples, "order_bridge_oldest_hint_age_seconds") or 0) < latency + 5

    await bridge.events_for(key, 1)
    labels = {"provider": "kasushou"}

    def settled(samples: list[Sample]) -> bool:
        lags = {
            s.labels["partition"]: s.value for s in samples if s.name == "order_bridge_inbox_lag"
        }
        return (
            value(samples, "order_bridge_callback_to_event_seconds_count", **labels) == 1
            and value(samples, "order_bridge_orders_followed") == 1
            and lags == {"0": 0, "1": 0, "2": 0}
        )

    samples = await scrape_until(bridge, settled, "the hint done and committed")
    accepted = {"provider": "kasushou", "outcome": "accepted"}
    assert value(samples, "order_bridge_callback_seconds_count", **accepted) == 1
    assert 0 < (value(samples, "order_bridge_callback_seconds_sum", **accepted) or 0) < 2
    assert (value(samples, "order_bridge_inbox_write_seconds_count", outcome="ok") or 0) >= 1
    ok = {"provider": "kasushou", "outcome": "ok"}
    assert (value(samples, "order_bridge_query_seconds_count", **ok) or 0) >= 1
    assert (value(samples, "order_bridge_query_seconds_sum", **ok) or 0) >= latency
    # From the receiver's clock to the event's ack: the provider's latency at least.
    waited = value(samples, "order_bridge_callback_to_event_seconds_sum", **labels) or 0
    assert latency <= waited < DEADLINE
    # Histogram buckets are cumulative and end in +Inf with the count.
    buckets = [
        s
        for s in samples
        if s.name == "order_bridge_callback_to_event_seconds_bucket"
        and s.labels["provider"] == "kasushou"
    ]
    counts = [s.value for s in sorted(buckets, key=lambda s: float(s.labels["le"]))]
    assert counts == sorted(counts)
    assert counts[-1] == 1
    assert math.isinf(float(buckets[-1].labels["le"]))
    assert value(samples, "order_bridge_hints_in_flight") == 0
    assert value(samples, "order_bridge_oldest_hint_age_seconds") == 0
    assert value(samples, "order_bridge_orders_known") == 1
    assert value(samples, "order_bridge_breaker_open", account=account) == 0
    assert value(samples, "order_bridge_events_published_total", status="processing") == 1
    # The process's own metrics, from prometheus-client's collectors.
    assert (value(samples, "process_resident_memory_bytes") or 0) > 0
    assert value(samples, "process_cpu_seconds_total") is not None
    assert any(s.name == "python_info" for s in samples)

    # A final order is followed no more, though its state is kept until forgotten.
    bridge.sandbox.sandbox.set_faults(account, Faults())
    bridge.move("kasushou", order_id, "succeeded")
    await bridge.post_callback("kasushou", order_id)
    await bridge.events_for(key, 2)
    samples = await scrape_until(
        bridge,
        lambda s: value(s, "order_bridge_callback_to_event_seconds_count", **labels) == 2,
        "the second event observed",
    )
    assert value(samples, "order_bridge_orders_followed") == 0
    assert value(samples, "order_bridge_orders_known") == 1


async def test_metrics_are_served_in_the_text_format_with_its_content_type(
    bridge: RunningBridge,
) -> None:
    answer = await bridge.http.get(f"{bridge.url}/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == CONTENT_TYPE
    assert "# TYPE order_bridge_callback_to_event_seconds histogram" in answer.text
    assert "# TYPE order_bridge_inbox_lag gauge" in answer.text


def test_large_values_render_exactly() -> None:
    metrics = Metrics()
    for count in (1_234_567, 12_345_678_901, 2**53):
        metrics.set("order_bridge_breaker_open", count, provider="lemft", account="a")
        text = metrics.render()
        assert value(parse(text), "order_bridge_breaker_open") == count
        (line,) = [line for line in text.splitlines() if line.startswith("order_bridge_breaker")]
        # Six significant digits (`%g`) would have lost the last ones.
        assert float(line.rsplit(" ", 1)[1]) == count, line
    assert "1.23457e+06" not in Metrics().render()


def test_two_bridges_in_one_process_keep_their_own_registries() -> None:
    first, second = Metrics(), Metrics()
    first.inc("order_bridge_deadletters_total", reason="stale")
    assert first.value("order_bridge_deadletters_total", reason="stale") == 1
    assert second.value("order_bridge_deadletters_total", reason="stale") == 0


def test_every_provider_error_maps_to_a_fixed_query_outcome() -> None:
    errors: list[Exception | None] = [
        None,
        ProviderUnavailable("lemft", "a", ["1"], "down"),
        InvalidAnswer("lemft", "a", ["1"], "garbage"),
        MismatchedAnswer("lemft", "a", ["1"], "other order"),
        CredentialsRejected("lemft", "a", ["1"], "key"),
        ProviderRejected("lemft", "a", ["1"], "no"),
        OrderNotFound("lemft", "a", "1", "unknown"),
        RuntimeError("a bug"),
    ]
    outcomes = [query_outcome(error) for error in errors]
    assert outcomes == [
        "ok",
        "unavailable",
        "invalid_answer",
        "invalid_answer",
        "credentials_rejected",
        "rejected",
        "not_found",
        "error",
    ]
    assert set(outcomes) == set(QUERY_OUTCOMES)


async def test_no_label_value_outside_its_fixed_set(
    bridge: RunningBridge, sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    http, box = bridge.http, sandbox.sandbox
    # Accepted, refused at the door in every way, and for unknown names.
    for provider in ("lemft", "lunpay", "kasushou"):
        order_id, _ = bridge.create(provider)
        assert (await bridge.post_callback(provider, order_id)).status_code == 200
    ksu_order, _ = bridge.create("kasushou")
    assert (await bridge.post_callback("kasushou", ksu_order, bad_sign=True)).status_code == 401
    lemft = bridge.callback_url("lemft")
    assert (await http.post(lemft, content=b"{nope", headers=JSON)).status_code == 400
    assert (await http.post(lemft, content=b"<x/>", headers=XML)).status_code == 415
    assert (await http.post(lemft, content=b"x" * 100_000, headers=JSON)).status_code == 413
    base = bridge.url
    weird = f"{base}/callbacks/%3Cscript%3E%E2%80%AE/ProviderRejected"
    assert (await http.post(weird, content=b"{}", headers=JSON)).status_code == 404
    assert (await http.post(f"{base}/callbacks/lunpay/nope", json={})).status_code == 404
    assert (await http.post(f"{base}/orders/watch", content=b"[")).status_code == 400
    watch = {"provider": "lunpay", "account": "nope", "order_id": "L-1"}
    assert (await http.post(f"{base}/orders/watch", json=watch)).status_code == 404
    # Queries refused (a permanent error) and failing (transient ones).
    refused, _ = bridge.create("kasushou")
    box.set_faults(sandbox.accounts["kasushou"].name, Faults(refuse_ids=(refused,)))
    await bridge.post_callback("kasushou", refused)
    failing, failing_key = bridge.create("lunpay")
    box.set_faults(sandbox.accounts["lunpay"].name, Faults(error_rate=1.0))
    await bridge.post_callback("lunpay", failing)
    await scrape_until(
        bridge,
        lambda s: (
            (value(s, "order_bridge_deadletters_total", reason="rejected") or 0) >= 1
            and sum(
                x.value
                for x in s
                if x.name == "order_bridge_queries_total"
                and x.labels["provider"] == "lunpay"
                and x.labels["outcome"] != "ok"
            )
            >= 2
        ),
        "refused and failed queries counted",
    )
    box.set_faults(sandbox.accounts["lunpay"].name, Faults())
    await bridge.events_for(failing_key, 1)

    samples = parse((await http.get(f"{base}/metrics")).text)
    configured = {
        "provider": {*providers.names(), "unknown"},
        "account": {a.name for a in bridge.bridge.config.accounts} | {"unknown"},
        "partition": {str(p) for p in range(kafka_settings.partitions)},
    }
    seen: set[tuple[str, str]] = set()
    for sample in samples:
        if not sample.name.startswith("order_bridge_"):
            continue
        spec = next(
            spec
            for name, spec in METRICS.items()
            if sample.name in (name, f"{name}_bucket", f"{name}_sum", f"{name}_count")
        )
        for label, given in sample.labels.items():
            if label == "le" and spec.kind == "histogram":
                continue
            assert label in spec.labels, (sample.name, label)
            allowed = set(spec.values.get(label, ())) or configured[label]
            assert given in allowed, (sample.name, label, given)
            seen.add((label, given))
    # The traffic above did reach the labels it is about.
    for label, given in [
        ("outcome", "rejected_400"),
        ("outcome", "rejected_401"),
        ("outcome", "rejected_413"),
        ("outcome", "rejected_415"),
        ("outcome", "unknown_account"),
        ("outcome", "rejected"),
        ("provider", "unknown"),
        ("account", "unknown"),
    ]:
        assert (label, given) in seen, (label, given)
    assert ("outcome", "error") not in seen, "a query error the vocabulary does not name"


JSON = {"content-type": "application/json"}
XML = {"content-type": "application/xml"}


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_metric_has_help_and_sorted_bounded_labels(name: str) -> None:
    spec = METRICS[name]
    assert spec.help
    assert not spec.help.endswith(".")
    assert list(spec.labels) == sorted(spec.labels)
    assert set(spec.values) <= set(spec.labels)
    for label in spec.labels:
        assert label in spec.values or label in ("provider", "account", "partition"), label
