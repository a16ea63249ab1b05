"""Running an ASGI app on uvicorn inside the current event loop.

HTTP is parsed by httptools (llhttp, in C): at the receiver's rates h11, in pure
Python, took a third of the process's CPU. Slow clients are cut off. uvicorn bounds
only the wait between requests on a kept-alive connection, so `_Protocol` adds the
rest: a connection that never sends a byte is idle too, and a request's head must all
come within `header_timeout` of its first byte, and fit in `MAX_HEAD_BYTES`. The body
is the app's to bound (`bridge.receiver.read_body`), which `body_arrived` spares a
deadline when there is nothing left to wait for.

The socket is bound here, not by uvicorn: uvicorn answers a port in use with
`sys.exit(3)` from inside its task, which escapes as a traceback after the rest of
the process has wound down. Here it is one `StartupError` line, at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator

import uvicorn
from starlette.types import ASGIApp, Receive
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from bridge.config import HttpSettings
from bridge.errors import ConfigError, StartupError

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
    b"connection: close\r\n\r\n"
)
# A request line and headers longer than this are refused: the parser would buffer
# them whole. The bound h11 had (uvicorn's default), far above any provider's head.
MAX_HEAD_BYTES = 16 * 1024


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The caller owns signals and shutdown: uvicorn must not take them over.
        yield


class _Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines for idle connections and request
    heads, and a bound on a head's size."""

    header_timeout: float = HttpSettings.header_timeout
    _header_deadline: asyncio.TimerHandle | None = None
    # Between a request's first byte and the end of its headers.
    _reading_head = False
    # Bytes received while a head was awaited or read, until it is complete.
    _head_bytes = 0
    # Since when (loop time) the connection has been idle: nothing received since it was
    # made or its last answer went out. None while it is not.
    _idle_since: float | None = None
    # The connection's one idle timer. uvicorn arms and cancels one for every answer
    # (3% of a callback's CPU); this one, when due, looks at `_idle_since` and
    # closes the connection or comes back when it could next be due.
    _idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        no_delay(transport)
        # Idle from the start: a connection that never sends a byte is closed too.
        self._idle_since = self.loop.time()
        self._idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_deadline()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        super().connection_lost(exc)

    def _unset_keepalive_if_required(self) -> None:
        # uvicorn calls this when bytes come and when an answer is complete.
        self._idle_since = None
        super()._unset_keepalive_if_required()

    def on_response_complete(self) -> None:
        # uvicorn's (0.55), with the connection marked idle instead of a timer armed.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._idle_since = self.loop.time()

    def _idle_check(self) -> None:
        now = self.loop.time()
        since = self._idle_since
        if since is not None and now - since >= self.timeout_keep_alive:
            self._idle_timer = None
            self.timeout_keep_alive_handler()
            return
        wait = self.timeout_keep_alive if since is None else since + self.timeout_keep_alive - now
        self._idle_timer = self.loop.call_later(wait, self._idle_check)

    def data_received(self, data: bytes) -> None:
        # Bytes that come while no request is in progress start the next head (or are
        # noise between requests, which must not keep a connection open either).
        if self._awaiting_head():
            self._head_bytes += len(data)
        super().data_received(data)
        if self.transport.is_closing() or not self._awaiting_head():
            self._stop_header_deadline()
            self._head_bytes = 0
        elif self._head_bytes > MAX_HEAD_BYTES:
            log.info("closed a connection whose request head was over %d bytes", MAX_HEAD_BYTES)
            self._refuse(HEAD_TOO_LARGE)
        elif self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head = True

    def on_headers_complete(self) -> None:
        self._reading_head = False
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not before:
            _HeadHeld(self.transport, self.cycle)

    def _awaiting_head(self) -> bool:
        """Whether the connection waits for a request head: one is being read, or no
        request is in progress."""
        cycle = self.cycle
        return self._reading_head or cycle is None or cycle.response_complete

    def _headers_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            log.info("closed a connection whose request headers took over %gs", self.header_timeout)
            self._refuse(REQUEST_TIMEOUT)

    def _refuse(self, answer: bytes) -> None:
        self._stop_header_deadline()
        self.transport.write(answer)
        self.transport.close()

    def _stop_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None


class _HeadHeld:
    """What a response cycle writes to: its answer's head is held until the body's first
    part, and both go out in one write.

    uvicorn writes a head and then its body: two send calls, two segments, two wake-ups
    of the client. At the receiver's rates the second call was a tenth of its CPU. The
    head is the first write once the response has started (an interim `100 Continue`
    comes before it, and goes out at once). It is held no longer than the response:
    a body-less one (HEAD) sends it when complete, a failing app when it closes.
    """

    __slots__ = ("_cycle", "_head_seen", "_held", "_on_response", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self._transport = transport
        self._cycle = cycle
        self._on_response = cycle.on_response
        self._held: bytes | None = None
        self._head_seen = False
        cycle.transport = self  # type: ignore[assignment]
        cycle.on_response = self._response_complete

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data = self._held + data
            self._held = None
        elif not self._head_seen and self._cycle.response_started:
            self._head_seen = True
            self._held = data
            return
        self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def _response_complete(self) -> None:
        self._flush()
        self._on_response()

    def _flush(self) -> None:
        if self._held is not None:
            self._transport.write(self._held)
            self._held = None


def body_arrived(receive: Receive) -> bool:
    """Whether all of a request's body is in, so that reading it waits for nothing.

    Known for requests served by `serve` (`receive` is uvicorn's cycle's); for others,
    False.
    """
    cycle = getattr(receive, "__self__", None)
    return isinstance(cycle, RequestResponseCycle) and not cycle.more_body


def no_delay(transport: asyncio.BaseTransport) -> None:
    """Sets TCP_NODELAY on `transport`'s socket, when it is a TCP one.

    An answer can go out in more than one write (an interim `100 Continue`, a body in
    parts; before `_HeadHeld`, every head and body). With Nagle's algorithm on, a write
    waits for the client to ack the one before, and clients delay that ack by 40 ms:
    every callback was answered 48 ms late, at 5% of a core. asyncio sets the option
    only on sockets made with `proto=IPPROTO_TCP`, which `listen()`'s are not (nor those
    a supervisor hands over), so it is set here, on every connection.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def check_port(port: int, setting: str = "http.port") -> None:
    """ConfigError naming `setting` unless `port` is 0 (any free one) to 65535."""
    if not 0 <= port <= 65535:
        raise ConfigError(setting, f"is {port}: a port is 0 to 65535 (0 picks a free one)")


def listen(host: str, port: int, setting: str = "http.port") -> socket.socket:
    """A socket listening on `host`:`port`; one line saying why when it cannot."""
    check_port(port, setting)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        problem = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        raise StartupError(f"cannot listen on {host}:{port} ({setting}): {problem}") from None


@contextlib.asynccontextmanager
async def serve(
    app: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    header_timeout: float = HttpSettings.header_timeout,
    idle_timeout: float = HttpSettings.idle_timeout,
    setting: str = "http.port",
) -> AsyncIterator[str]:
    """Serves `app` until the block ends; yields its base URL (port 0 picks a free one).

    A port out of range is a ConfigError naming `setting`; one taken, a StartupError.
    A connection is closed when it sends nothing for `idle_timeout` seconds between
    requests, or takes over `header_timeout` seconds to send a request's headers (408).
    """

    class Protocol(_Protocol):
        pass

    Protocol.header_timeout = header_timeout
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=Protocol,
        # Callbacks are plain HTTP: no websocket library is looked for.
        ws="none",
        timeout_keep_alive=idle_timeout,  # type: ignore[arg-type]  # a float works
        log_level="warning",
        # uvicorn's lines go through the bridge's own logging, in its format.
        log_config=None,
        lifespan="off",
        access_log=False,
        # Shutdown waits this long for requests in flight, then cancels them.
        timeout_graceful_shutdown=5,
    )
    sock = listen(host, port, setting)
    bound = sock.getsockname()[1]
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise StartupError(f"the server on {host}:{bound} stopped before it started")
            await asyncio.sleep(0.01)
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        try:
            await task
        finally:
            sock.close()
