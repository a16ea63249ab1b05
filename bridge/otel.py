"""OpenTelemetry for the bridge: imported only when tracing is on (`bridge.tracing`).

Needs the `otel` extra: `pip install 'order-bridge[otel]'`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping
from urllib.parse import urlsplit

# Scrapes and probes are not worth a trace each. Read when the instrumentation is
# imported, so it is set first; the operator's own setting wins.
os.environ.setdefault("OTEL_PYTHON_STARLETTE_EXCLUDED_URLS", "healthz,readyz,metrics")

from opentelemetry import propagate, trace
from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor
from opentelemetry.instrumentation.starlette import StarletteInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue
from starlette.applications import Starlette

from bridge import __version__, tracing
from bridge.providers.base import ProviderResponse

# A query's POST, given the headers to send.
Send = Callable[[Mapping[str, str]], Awaitable[ProviderResponse]]


class OpenTelemetry:
    """The bridge's tracer, its instrumentation of Starlette and aiokafka, and the client
    spans of its queries."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("order-bridge", __version__)
        self._aiokafka = AIOKafkaInstrumentor()
        self._old_semconv, self._new_semconv = _http_semconv()

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

    async def post(self, url: str, headers: Mapping[str, str], send: Send) -> ProviderResponse:
        """`send(headers)`, a POST to `url`, in a CLIENT span named and described by
        OpenTelemetry's HTTP semantic conventions as its httpx instrumentation has them;
        the traceparent sent names that span. Neither body nor headers are recorded."""
        old, new = self._old_semconv, self._new_semconv
        attributes = _request_attributes(url, old, new)
        with self._tracer.start_as_current_span(
            "POST", kind=SpanKind.CLIENT, attributes=attributes
        ) as span:
            sent = dict(headers)
            propagate.inject(sent)
            try:
                answer = await send(sent)
            except Exception as exc:
                # The span records it too (an event, and its status an error).
                if new:
                    span.set_attribute("error.type", type(exc).__qualname__)
                raise
            status = answer.status_code
            if old:
                span.set_attribute("http.status_code", status)
            if new:
                span.set_attribute("http.response.status_code", status)
                span.set_attribute("network.protocol.version", "1.1")
            # A client's span: 4xx is an error too (the server's would leave it unset).
            if not 100 <= status < 400:
                span.set_status(StatusCode.ERROR)
                if new:
                    span.set_attribute("error.type", str(status))
        return answer

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


def _http_semconv() -> tuple[bool, bool]:
    """Which of HTTP's semantic conventions the query spans follow, (old, stable), read
    from OTEL_SEMCONV_STABILITY_OPT_IN as the instrumentations (Starlette's) read it:
    `http` the stable ones, `http/dup` both, else the old ones."""
    setting = os.environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "")
    opt_in = {part.strip() for part in setting.split(",")}
    if "http/dup" in opt_in:
        return True, True
    return "http" not in opt_in, "http" in opt_in


@functools.lru_cache(maxsize=1024)
def _request_attributes(url: str, old: bool, new: bool) -> Mapping[str, AttributeValue]:
    """A query's attributes. Its URL loses any user info and query string: the providers'
    keys travel in bodies, but a `base_url` could still carry a secret in either."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # malformed: the client refuses it, in the span
        return {}
    full = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    attributes: dict[str, AttributeValue] = {}
    if old:
        attributes |= {"http.method": "POST", "http.url": full}
    if new:
        attributes |= {
            "http.request.method": "POST",
            "url.full": full,
            "server.address": parts.hostname or "",
            "server.port": port,
        }
    return attributes


def _parent(traceparent: str | None) -> SpanContext:
    """The span `traceparent` names (an invalid one, for a new trace, when None)."""
    parsed = tracing.parse(traceparent)
    if parsed is None:
        return trace.INVALID_SPAN_CONTEXT
    _, trace_id, span_id, flags = parsed.split("-")
    return SpanContext(
        int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16))
    )
