"""OpenTelemetry for the bridge: imported only when tracing is on (`bridge.tracing`).

Needs the `otel` extra: `pip install 'order-bridge[otel]'`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

# Scrapes and probes are not worth a trace each. Read when the instrumentation is
# imported, so it is set first; the operator's own setting wins.
os.environ.setdefault("OTEL_PYTHON_STARLETTE_EXCLUDED_URLS", "healthz,readyz,metrics")

import httpx
from opentelemetry import trace
from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.starlette import StarletteInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from starlette.applications import Starlette

from bridge import __version__, tracing


class OpenTelemetry:
    """The bridge's tracer and its instrumentation of Starlette, httpx and aiokafka."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("order-bridge", __version__)
        self._aiokafka = AIOKafkaInstrumentor()

    @classmethod
    def exporting(cls, exporter: str) -> OpenTelemetry:
        """Spans sent by `exporter` (`otlp`: set up by the OTEL_EXPORTER_OTLP_* variables)."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        if exporter != "otlp":
            raise ValueError(f"unknown exporter {exporter!r}")
        # OTEL_SERVICE_NAME, when set, names the service; OTEL_TRACES_SAMPLER samples.
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: "order-bridge"}
        provider = TracerProvider(resource=Resource.create(attributes))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider)

    def instrument(self) -> None:
        # aiokafka's instrumentation patches its classes: every producer and consumer of
        # the process is traced from here on.
        self._aiokafka.instrument(tracer_provider=self._provider)

    def uninstrument(self) -> None:
        self._aiokafka.uninstrument()

    def instrument_app(self, app: Starlette) -> None:
        StarletteInstrumentor.instrument_app(app, tracer_provider=self._provider)

    def instrument_client(self, client: httpx.AsyncClient) -> None:
        HTTPXClientInstrumentor.instrument_client(client, tracer_provider=self._provider)

    def current(self) -> str | None:
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            return None
        flags = int(context.trace_flags)
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"

    @contextlib.contextmanager
    def resumed(
        self, traceparent: str | None, span: str | None, attributes: Mapping[str, str]
    ) -> Iterator[None]:
        parent = _parent(traceparent)
        if span is None:
            with trace.use_span(NonRecordingSpan(parent), end_on_exit=False):
                yield
            return
        context = trace.set_span_in_context(NonRecordingSpan(parent))
        with self._tracer.start_as_current_span(span, context=context, attributes=attributes):
            yield


def _parent(traceparent: str | None) -> SpanContext:
    """The span `traceparent` names (an invalid one, for a new trace, when None)."""
    parsed = tracing.parse(traceparent)
    if parsed is None:
        return trace.INVALID_SPAN_CONTEXT
    _, trace_id, span_id, flags = parsed.split("-")
    return SpanContext(
        int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16))
    )
