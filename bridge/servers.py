"""Running an ASGI app on uvicorn inside the current event loop.

Slow clients are cut off. uvicorn bounds only the wait between requests on a
kept-alive connection, so `_Protocol` adds the rest: a connection that never sends a
byte is idle too, and a request's headers must all come within `header_timeout` of
its first byte. The body is the app's to bound (`bridge.receiver.read_body`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from bridge.config import HttpSettings

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The caller owns signals and shutdown: uvicorn must not take them over.
        yield


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines for idle connections and request headers."""

    header_timeout: float = HttpSettings.header_timeout
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn arms the idle timer only after a response: arm it for the first request.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        # Part of a request's head is buffered exactly when h11 still waits for a request
        # and holds bytes; once it has the request, its headers are all in.
        waiting = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        if not waiting or self.transport.is_closing():
            self._stop_header_deadline()
        elif self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            log.info("closed a connection whose request headers took over %gs", self.header_timeout)
            self.transport.write(REQUEST_TIMEOUT)
            self.transport.close()

    def _stop_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None


@contextlib.asynccontextmanager
async def serve(
    app: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    header_timeout: float = HttpSettings.header_timeout,
    idle_timeout: float = HttpSettings.idle_timeout,
) -> AsyncIterator[str]:
    """Serves `app` until the block ends; yields its base URL (port 0 picks a free one).

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
        timeout_keep_alive=idle_timeout,  # type: ignore[arg-type]  # a float works
        log_level="warning",
        # uvicorn's lines go through the bridge's own logging, in its format.
        log_config=None,
        lifespan="off",
        access_log=False,
        # Shutdown waits this long for requests in flight, then cancels them.
        timeout_graceful_shutdown=5,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # re-raises why it could not start (port taken, ...)
            raise RuntimeError(f"server on {host}:{port} stopped before it started")
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        await task
