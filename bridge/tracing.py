"""One trace from a provider's callback to the status event it led to.

The callback's W3C `traceparent` is kept in its inbox record. The worker carries it to
the order-detail query (an HTTP header) and to the status event (a Kafka header).

Without tracing (the default) the bridge passes the header on unchanged, as W3C Trace
Context asks of a system that does not trace itself. With the `otel` extra and
`[tracing] exporter` set, OpenTelemetry traces the receiver (Starlette), each
confirmation (a span of the bridge's own), its queries (a client span each, the
bridge's own too) and the Kafka writes (aiokafka); each header sent then names the
span that sent it. Nothing of OpenTelemetry is imported unless tracing is turned on
(`bridge.otel` does that).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING

from bridge.config import TracingSettings
from bridge.errors import ConfigError

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from bridge.otel import OpenTelemetry, Send
    from bridge.providers.base import ProviderResponse

HEADER = "traceparent"

# Version 00 only: a later version's extra fields are not ours to pass on.
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")

# The traceparent carried, when the bridge does not trace.
_carried: ContextVar[str | None] = ContextVar("traceparent", default=None)
_otel: OpenTelemetry | None = None


def parse(value: str | None) -> str | None:
    """`value` when it is a valid traceparent, else None (it is then dropped)."""
    if value is None:
        return None
    value = value.strip()
    return value if _TRACEPARENT.fullmatch(value) else None


def setup(settings: TracingSettings) -> None:
    """Turns tracing on for this process as `settings` say; off, it imports nothing."""
    if settings.exporter == "none":
        return
    try:
        from bridge.otel import OpenTelemetry
    except ImportError as exc:
        need = "the otel extra: pip install 'order-bridge[otel]'"
        raise ConfigError("tracing.exporter", f"needs {need} ({exc.name} is missing)") from None
    enable(OpenTelemetry.exporting(settings.exporter))


def enable(otel: OpenTelemetry) -> None:
    """Traces with `otel` from now on (tests give one with an in-memory exporter)."""
    global _otel
    disable()
    otel.instrument()
    _otel = otel


def disable() -> None:
    global _otel
    if _otel is not None:
        _otel.uninstrument()
        _otel = None


def instrument_app(app: Starlette) -> None:
    if _otel is not None:
        _otel.instrument_app(app)


def current() -> str | None:
    """The traceparent of the work running now: its span's, or the one carried."""
    return _otel.current() if _otel is not None else _carried.get()


def for_callback(header: str | None) -> str | None:
    """What a callback's inbox record keeps: the receiver's span when it is traced (the
    callback's trace, continued), else the callback's own header."""
    return current() or parse(header)


def resumed(
    traceparent: str | None, span: str | None = None, attributes: Mapping[str, str] | None = None
) -> contextlib.AbstractContextManager[None]:
    """Runs the block in the trace of `traceparent` (a new trace when None): when traced,
    in a span named `span` with `attributes` (without `span`, as a child of the parent
    itself); else with `traceparent` carried as it is."""
    if _otel is not None:
        return _otel.resumed(traceparent, span, attributes or {})
    return _Carried(traceparent)


class _Carried:
    """`traceparent` carried through a block. A class, not a generator: every hint and
    query enters one, and a generator's context manager costs several times as much."""

    __slots__ = ("_token", "_traceparent")

    def __init__(self, traceparent: str | None) -> None:
        self._traceparent = traceparent

    def __enter__(self) -> None:
        self._token = _carried.set(self._traceparent)

    def __exit__(self, *exc_info: object) -> None:
        _carried.reset(self._token)


async def post(url: str, headers: Mapping[str, str], send: Send) -> ProviderResponse:
    """`send(headers)`, a query's POST to `url`: when traced, in a client span its header
    names; else with the traceparent carried."""
    if _otel is not None:
        return await _otel.post(url, headers, send)
    if carried := _carried.get():
        headers = {**headers, HEADER: carried}
    return await send(headers)


def kafka_headers() -> list[tuple[str, bytes]]:
    """Headers for an outgoing event. When traced, aiokafka's instrumentation adds its own."""
    carried = _carried.get() if _otel is None else None
    return [(HEADER, carried.encode())] if carried else []
