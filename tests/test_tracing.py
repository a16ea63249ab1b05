"""One trace from a callback to its status event: the W3C traceparent carried through
the inbox record, the order-detail query and the event, with OpenTelemetry or without."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from bridge import tracing
from bridge.config import KafkaSettings, TracingSettings
from bridge.errors import ConfigError, ProviderUnavailable
from bridge.otel import OpenTelemetry
from bridge.providers.client import ProviderClient
from bridge.query import query_order
from bridge.sandbox import Faults
from tests.bridge_fixtures import RunningBridge, running_bridge
from tests.conftest import RunningSandbox
from tests.kafka import read_topic

PROVIDERS = ["lemft", "lunpay", "kasushou"]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PROVIDER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PROVIDER_SPAN}-01"


async def post_traced(bridge: RunningBridge, provider: str, traceparent: str) -> str:
    """Posts the order's callback with `traceparent`; returns the order's key."""
    order_id, key = bridge.create(provider, "succeeded")
    account = bridge.sandbox.accounts[provider].name
    body, content_type = bridge.sandbox.sandbox.callback(account, order_id)
    headers = {"content-type": content_type, "traceparent": traceparent}
    answer = await bridge.http.post(bridge.callback_url(provider), content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    return key


def queries_of(bridge: RunningBridge, key: str) -> list[str]:
    """The traceparent of each query the sandbox received for the order."""
    order_id = key.rsplit("/", 1)[1]
    return [q.traceparent for q in bridge.sandbox.sandbox.queries if order_id in q.order_ids]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_without_tracing_the_callbacks_traceparent_reaches_the_query_and_the_event(
    bridge: RunningBridge, kafka_settings: KafkaSettings, provider: str
) -> None:
    key = await post_traced(bridge, provider, TRACEPARENT)

    (event,) = await bridge.events_for(key, 1)
    assert event.headers["traceparent"] == TRACEPARENT
    assert queries_of(bridge, key) == [TRACEPARENT]
    async with read_topic(kafka_settings, kafka_settings.inbox_topic) as inbox:
        (hint,) = await inbox.wait_for(lambda rs: any(r.key == key for r in rs))
    assert hint.value["traceparent"] == TRACEPARENT
    assert hint.value["version"] == 2


@pytest.mark.parametrize(
    "traceparent",
    [
        "not a trace",
        f"00-{'0' * 32}-{PROVIDER_SPAN}-01",  # all-zero ids are invalid
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"ff-{TRACE_ID}-{PROVIDER_SPAN}-01",
        f"00-{TRACE_ID.upper()}-{PROVIDER_SPAN}-01",
        f"00-{TRACE_ID}-{PROVIDER_SPAN}-01\r\nx-evil: 1",
    ],
)
async def test_an_invalid_traceparent_is_dropped_not_refused(
    bridge: RunningBridge, traceparent: str
) -> None:
    key = await post_traced(bridge, "lunpay", traceparent.replace("\r\n", ""))

    (event,) = await bridge.events_for(key, 1)
    assert "traceparent" not in event.headers
    assert queries_of(bridge, key) == [""]


async def test_an_event_a_poll_found_has_no_traceparent(bridge: RunningBridge) -> None:
    order_id, key = bridge.create("lemft", "processing")
    assert (await bridge.watch("lemft", order_id)).status_code == 202
    (event,) = await bridge.events_for(key, 1)
    assert "traceparent" not in event.headers


@contextlib.contextmanager
def traced() -> Iterator[InMemorySpanExporter]:
    """Tracing on, with the SDK's in-memory exporter, for the block only."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(OpenTelemetry(provider))
    try:
        yield exporter
    finally:
        tracing.disable()
        provider.shutdown()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test only."""
    with traced() as exporter:
        yield exporter


@pytest.fixture
async def traced_bridge(
    spans: InMemorySpanExporter, sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> AsyncIterator[RunningBridge]:
    async with running_bridge(sandbox, kafka_settings) as running:
        yield running


def hex_ids(span: ReadableSpan) -> tuple[str, str, str | None]:
    """The span's trace id, its id and its parent's id, as a traceparent writes them."""
    assert span.context is not None
    parent = None if span.parent is None else f"{span.parent.span_id:016x}"
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}", parent


async def test_with_opentelemetry_one_trace_runs_from_the_callback_to_the_event(
    traced_bridge: RunningBridge, spans: InMemorySpanExporter
) -> None:
    bridge = traced_bridge
    key = await post_traced(bridge, "lunpay", TRACEPARENT)
    (event,) = await bridge.events_for(key, 1)
    # The confirmation's span ends after the event: its state record comes next.
    deadline = time.monotonic() + 10
    while not any(s.name == "confirm callback" for s in spans.get_finished_spans()):
        assert time.monotonic() < deadline, "the confirmation's span did not end"
        await asyncio.sleep(0.05)

    trace = [s for s in spans.get_finished_spans() if hex_ids(s)[0] == TRACE_ID]
    by_id = {hex_ids(s)[1]: s for s in trace}

    def chain(span: ReadableSpan) -> list[str]:
        """The span's name and its ancestors' names, up to the provider's span."""
        names = [span.name]
        while (parent := hex_ids(span)[2]) in by_id:
            span = by_id[parent]
            names.append(span.name)
        assert parent == PROVIDER_SPAN, names
        return names

    # The receiver's span continues the provider's trace; the confirmation continues
    # the receiver's; the query and the event's write are the confirmation's.
    (server,) = [s for s in trace if s.kind is SpanKind.SERVER]
    assert hex_ids(server)[2] == PROVIDER_SPAN
    (confirm,) = [s for s in trace if s.name == "confirm callback"]
    assert confirm.attributes is not None
    assert confirm.attributes["order_bridge.order_key"] == key
    assert chain(confirm)[-1] == server.name
    (query,) = [s for s in trace if s.kind is SpanKind.CLIENT]
    assert chain(query)[:2] == [query.name, "confirm callback"]
    status_topic = bridge.bridge.config.kafka.status_topic
    (publish,) = [s for s in trace if s.name == f"{status_topic} send"]
    assert chain(publish)[:2] == [publish.name, "confirm callback"]

    # What the provider and the consumers see names those spans.
    (queried,) = queries_of(bridge, key)
    assert queried == f"00-{TRACE_ID}-{hex_ids(query)[1]}-01"
    assert event.headers["traceparent"] == f"00-{TRACE_ID}-{hex_ids(publish)[1]}-01"
    # No secret reaches a span: the query's body is not recorded, only its URL.
    for span in trace:
        text = orjson.dumps(dict(span.attributes or {})).decode()
        account = bridge.sandbox.accounts["lunpay"]
        assert all(secret not in text for secret in account.secrets())


def client_spans(spans: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.kind is SpanKind.CLIENT]


async def test_a_traced_query_is_a_client_span_and_the_provider_sees_it_as_parent(
    spans: InMemorySpanExporter, sandbox: RunningSandbox
) -> None:
    account = sandbox.accounts["lunpay"]
    order = sandbox.sandbox.create_order(account.name)
    async with ProviderClient("order-bridge/test") as client:
        with tracing.resumed(TRACEPARENT, "confirm callback"):
            await query_order(client, account, order.order_id)

    (query,) = client_spans(spans)
    (confirm,) = [s for s in spans.get_finished_spans() if s.name == "confirm callback"]
    assert query.name == "POST"
    assert hex_ids(query)[::2] == (TRACE_ID, hex_ids(confirm)[1])
    # OpenTelemetry's HTTP conventions, the ones its instrumentations use by default.
    assert dict(query.attributes or {}) == {
        "http.method": "POST",
        "http.url": f"{account.base_url}/api/order/query",
        "http.status_code": 200,
    }
    assert query.status.status_code is StatusCode.UNSET
    (queried,) = sandbox.sandbox.queries
    assert queried.traceparent == f"00-{TRACE_ID}-{hex_ids(query)[1]}-01"


async def test_a_query_answered_5xx_or_failing_has_an_error_span(
    spans: InMemorySpanExporter, sandbox: RunningSandbox
) -> None:
    down = sandbox.accounts["lunpay"]
    sandbox.sandbox.set_faults(down.name, Faults(down=True))
    gone = dataclasses.replace(down, base_url="http://127.0.0.1:9")
    async with ProviderClient("t") as client:
        for account in (down, gone):
            # The span changes nothing of how a failure is told.
            with pytest.raises(ProviderUnavailable):
                await query_order(client, account, "LP-1")

    answered, refused = client_spans(spans)
    assert answered.status.status_code is StatusCode.ERROR
    assert answered.attributes is not None
    assert answered.attributes["http.status_code"] == 503
    assert refused.status.status_code is StatusCode.ERROR
    assert refused.attributes is not None
    assert "http.status_code" not in refused.attributes
    (event,) = refused.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "httpx.ConnectError"


async def test_the_stable_http_conventions_when_opted_in_and_no_url_secret(
    monkeypatch: pytest.MonkeyPatch, sandbox: RunningSandbox
) -> None:
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http/dup")
    url = f"{sandbox.url}/lunpay/api/order/query"
    port = int(sandbox.url.rsplit(":", 1)[1])
    with_secrets = url.replace("http://", "http://user:s3cret@") + "?key=s3cret"
    with traced() as spans:
        async with ProviderClient("t") as client:
            send = functools.partial(
                client.post, with_secrets, content=b"{}", timeout=5, max_bytes=10_000
            )
            answer = await tracing.post(with_secrets, {}, send)

    assert answer.status_code == 200  # the provider's own error, in the body
    (query,) = client_spans(spans)
    assert dict(query.attributes or {}) == {
        "http.method": "POST",
        "http.url": url,
        "http.status_code": 200,
        "http.request.method": "POST",
        "url.full": url,
        "server.address": "127.0.0.1",
        "server.port": port,
        "http.response.status_code": 200,
        "network.protocol.version": "1.1",
    }


def test_nothing_of_opentelemetry_is_imported_unless_tracing_is_on() -> None:
    code = """
import sys
from bridge import cli, receiver, service, tracing, worker
from bridge.config import TracingSettings
tracing.setup(TracingSettings())
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
print(loaded)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_tracing_on_without_the_extra_names_the_extra() -> None:
    code = """
import sys
sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
from bridge import tracing
from bridge.config import TracingSettings
from bridge.errors import ConfigError
try:
    tracing.setup(TracingSettings(exporter="otlp"))
except ConfigError as exc:
    print(exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "order-bridge[otel]" in out
    assert "tracing.exporter" in out


def test_the_tracing_section_is_checked_like_any_other() -> None:
    assert TracingSettings().exporter == "none"
    from bridge.config import parse_config

    with pytest.raises(ConfigError, match=r"tracing\.exporter"):
        parse_config({"tracing": {"exporter": "zipkin"}, "accounts": []})
