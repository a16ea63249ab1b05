"""HTTP to the providers: httpx, with a connection pool that costs O(1) a request.

httpcore's pool (httpx's default transport) walks all its connections on every request
and every response closed: `has_expired()` on each, which for an idle one asks anyio for
the socket (anyio's `extra()` builds a dict of every socket attribute each time), and
for each idle one a list of all of them, so O(n^2) in the connections. With the ~100
connections the accounts' `max_concurrent_queries` need, that bookkeeping was 40% of a
serve process's CPU and over 80% of a worker's (benchmarks/README.md, "Profile").

Each account's gateway already bounds its queries in flight, so the pool has nothing
to queue or arbitrate: it keeps each origin's idle connections on a stack, and a
request takes the one used last (checked alone) or opens a new one. Everything else
is httpx's and httpcore's: connecting, TLS, HTTP/1.1, timeouts, the exceptions.

An untraced worker's queries skip httpx altogether (`bridge.providers.client` says
why); this transport carries those of a traced worker, whose httpx client is
instrumented, and of any httpx client given it.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterable, AsyncIterator
from types import TracebackType

import httpcore
import httpx

# What httpx keeps an idle connection for by default.
KEEPALIVE_EXPIRY = 5.0

_Origin = tuple[bytes, bytes, int]


class ProviderTransport(httpx.AsyncHTTPTransport):
    """`httpx.AsyncHTTPTransport` on a `ConnectionStack`: HTTP/1.1, no proxy.

    Nothing bounds the connections here: the callers (the gateways) do.
    """

    def __init__(self, keepalive_expiry: float = KEEPALIVE_EXPIRY) -> None:
        context = httpx.create_ssl_context()
        super().__init__(verify=context)
        # httpx's transport only calls its pool's request, enter, exit and close.
        self._pool = ConnectionStack(context, keepalive_expiry)  # type: ignore[assignment]


class ConnectionStack:
    """httpcore connections, the idle ones kept on a stack per origin."""

    def __init__(self, ssl_context: ssl.SSLContext, keepalive_expiry: float) -> None:
        self._ssl_context = ssl_context
        self._keepalive_expiry = keepalive_expiry
        self._idle: dict[_Origin, list[httpcore.AsyncHTTPConnection]] = {}
        self._busy: set[httpcore.AsyncHTTPConnection] = set()
        self._closed = False

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        if self._closed:
            raise RuntimeError("the connection stack is closed")
        url = request.url
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == b"https" else 80))
        connection = await self._take(origin, request.url.origin)
        self._busy.add(connection)
        try:
            response = await connection.handle_async_request(request)
        except BaseException:
            await self.drop(connection)
            raise
        # An HTTP/1.1 connection's body stream, always asynchronous.
        assert isinstance(response.stream, AsyncIterable)
        body = _Body(response.stream, self, origin, connection)
        return httpcore.Response(
            status=response.status,
            headers=response.headers,
            content=body,
            extensions=response.extensions,
        )

    async def _take(self, key: _Origin, origin: httpcore.Origin) -> httpcore.AsyncHTTPConnection:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            # Past its keep-alive, or closed by the server (its socket reads as ready).
            if connection.is_idle() and not connection.has_expired():
                return connection
            await _close(connection)
        return httpcore.AsyncHTTPConnection(
            origin, ssl_context=self._ssl_context, keepalive_expiry=self._keepalive_expiry
        )

    async def drop(self, connection: httpcore.AsyncHTTPConnection) -> None:
        """Closes `connection`, whose request or response failed."""
        self._busy.discard(connection)
        await _close(connection)

    async def release(self, key: _Origin, connection: httpcore.AsyncHTTPConnection) -> None:
        """Keeps `connection` for the next request once its response is closed, if it
        can take one; and closes the oldest idle one if it has expired, so that a
        connection left at the bottom of the stack does not stay open for ever."""
        self._busy.discard(connection)
        if self._closed or not connection.is_idle():
            await _close(connection)
            return
        idle = self._idle.setdefault(key, [])
        idle.append(connection)
        if len(idle) > 1 and idle[0].has_expired():
            await _close(idle.pop(0))

    async def aclose(self) -> None:
        self._closed = True
        connections = [*self._busy, *(c for idle in self._idle.values() for c in idle)]
        self._busy.clear()
        self._idle.clear()
        for connection in connections:
            await _close(connection)

    async def __aenter__(self) -> ConnectionStack:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()


class _Body:
    """A response's body; closing it hands its connection back to the stack."""

    def __init__(
        self,
        stream: AsyncIterable[bytes],
        stack: ConnectionStack,
        key: _Origin,
        connection: httpcore.AsyncHTTPConnection,
    ) -> None:
        self._stream = stream
        self._stack = stack
        self._key = key
        self._connection: httpcore.AsyncHTTPConnection | None = connection

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            closing = getattr(self._stream, "aclose", None)
            if closing is not None:
                await closing()
        except BaseException:
            await self._stack.drop(connection)
            raise
        await self._stack.release(self._key, connection)


async def _close(connection: httpcore.AsyncHTTPConnection) -> None:
    # Closing is a socket's close: an error in it leaves nothing to clean up.
    with contextlib.suppress(Exception):
        await connection.aclose()
