"""The worker's queries to the providers: HTTP/1.1 POSTs on asyncio and httptools.

Why not httpx here: even on a pool of O(1) a request (httpcore's own walks every
connection on each one), httpx and httpcore were still 43% of a worker's CPU draining
a backlog (benchmarks/README.md), more than the bridge's own work on an order. A
query went through httpx's request and response models, header normalisation,
cookies, auth and redirect flows, the transport's conversion to httpcore's models,
httpcore's connection and h11's pure Python parser, each with its async context
managers. A query needs none of that:
one POST of a body a few hundred bytes long to a URL fixed per account, and one
answer read whole. So `ProviderClient` writes the request itself and parses the
answer with httptools (llhttp, in C; the receiver's parser too).

What it keeps of httpx: TLS with httpx's default context (certificates verified,
the host name checked); connections kept alive and reused, the one used last
first, with httpx's 5 s keep-alive; a timeout on the whole exchange, connecting
included; answers delimited by content-length, chunked, or the connection's end;
the errors, which are httpx's exception types (`httpx.ConnectError`,
`httpx.ReadError`, `httpx.RemoteProtocolError`; `TimeoutError` for the timeout),
so `bridge.query` maps both the same way; and httpx's proxies from the environment
(`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`, read as Python's urllib reads
them): an https query goes through an http:// proxy's CONNECT tunnel, TLS end to end
with the provider, and an http one is forwarded by it; credentials in the proxy's URL
become its Proxy-Authorization. What it leaves out, as the providers' APIs need none
of it: redirects (httpx does not follow them by default either), cookies, compression
(it asks for none: `accept-encoding: identity`), proxies other than http:// (a
ConfigError at start).

Traced or not, the worker's queries all go through it: with tracing on, each gets
its OpenTelemetry client span around `post()` (`bridge.tracing.post`).
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import unquote, urlsplit

import httptools
import httpx

from bridge.deadlines import Deadlines
from bridge.errors import ConfigError
from bridge.providers.base import ProviderResponse

# What httpx keeps an idle connection for by default.
KEEPALIVE_EXPIRY = 5.0
# The most a proxy's answer to CONNECT may take, head and all.
MAX_TUNNEL_ANSWER = 16_384


@dataclass(frozen=True)
class Proxy:
    """An http:// proxy, and the Proxy-Authorization its URL's credentials make."""

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str, variable: str) -> Proxy:
        """The proxy a `*_PROXY` variable names; ConfigError naming the variable (not
        its value, which may hold a password) when it is not an http:// URL."""
        try:
            parts = urlsplit(url if "://" in url else f"http://{url}")
            port = parts.port or 80
        except ValueError:
            raise ConfigError(variable, "not a proxy URL") from None
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(
                variable, f"{parts.scheme}:// proxies are not supported, only http:// ones"
            )
        authorization = None
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
        return cls(parts.hostname, port, authorization)


# scheme, host, port: where the request goes; and the proxy it goes through, if any.
_Origin = tuple[str, str, int, Proxy | None]


class AnswerTooLarge(Exception):
    """An answer's body grew past the `max_bytes` of the query; its connection is closed."""


class ProviderClient:
    """POSTs to the providers' HTTPS (or HTTP) endpoints, connections kept per origin.

    Nothing bounds the connections here: the callers (the gateways) do.
    """

    def __init__(
        self,
        user_agent: str,
        *,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
        ssl_context: ssl.SSLContext | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> None:
        """`proxies`: as `urllib.request.getproxies_environment()` gives them (keys
        `http`, `https`, `all` and `no`); by default, the environment's."""
        self._user_agent = _checked(user_agent)
        self._keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        if proxies is None:
            proxies = urllib.request.getproxies_environment()
        names = (name.strip().lower().lstrip(".") for name in proxies.get("no", "").split(","))
        self._no_proxy = [name for name in names if name]
        self._proxies = {
            scheme: Proxy.from_url(proxies[scheme], f"{scheme.upper()}_PROXY")
            for scheme in ("http", "https", "all")
            if proxies.get(scheme)
        }
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        # Per URL: its origin and the request head up to the headers that vary.
        self._targets: dict[str, tuple[_Origin, bytes]] = {}
        self._closed = False
        self._deadlines = Deadlines()

    async def post(
        self,
        url: str,
        headers: Mapping[str, str],
        content: bytes,
        *,
        timeout: float,
        max_bytes: int,
    ) -> ProviderResponse:
        """POSTs `content` to `url` and reads the answer whole, all within `timeout`
        seconds (`TimeoutError` past it). `AnswerTooLarge` for a body over `max_bytes`."""
        if self._closed:
            raise RuntimeError("the provider client is closed")
        origin, head = self._target(url)
        parts = [head]
        for name, value in headers.items():
            parts.append(_checked(name).encode() + b": " + _checked(value).encode() + b"\r\n")
        parts.append(b"content-length: %d\r\n\r\n" % len(content))
        parts.append(content)
        return await self._deadlines.within(
            timeout, self._exchange(origin, b"".join(parts), max_bytes)
        )

    async def _exchange(self, origin: _Origin, request: bytes, max_bytes: int) -> ProviderResponse:
        connection = await self._take(origin)
        self._busy.add(connection)
        try:
            answer = await connection.exchange(request, max_bytes)
        except BaseException:
            # Given up (timeout, cancelled) or failed: what is left on it is unknown.
            self._busy.discard(connection)
            connection.close()
            raise
        self._release(origin, connection)
        return answer

    def _target(self, url: str) -> tuple[_Origin, bytes]:
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = self._parse(url)
        return target

    def _parse(self, url: str) -> tuple[_Origin, bytes]:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise httpx.UnsupportedProtocol(f"malformed URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise httpx.UnsupportedProtocol(f"not an http or https URL: {parts.scheme}://")
        default = 443 if parts.scheme == "https" else 80
        proxy = self._proxy_for(parts.scheme, parts.hostname)
        origin = (parts.scheme, parts.hostname, port or default, proxy)
        host = parts.netloc.rpartition("@")[2]
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        proxy_header = ""
        if proxy is not None and parts.scheme == "http":
            # A proxy forwarding plain HTTP is asked for the absolute URL.
            path = f"http://{host}{path}"
            if proxy.authorization:
                proxy_header = f"proxy-authorization: {proxy.authorization}\r\n"
        head = (
            f"POST {_checked(path)} HTTP/1.1\r\nhost: {_checked(host)}\r\n"
            f"accept: */*\r\naccept-encoding: identity\r\nconnection: keep-alive\r\n"
            f"user-agent: {self._user_agent}\r\n{proxy_header}"
        )
        return origin, head.encode("ascii", "strict")

    def _proxy_for(self, scheme: str, host: str) -> Proxy | None:
        """The proxy for `host`, unless NO_PROXY names it, a domain above it, or `*`."""
        host = host.lower()
        for name in self._no_proxy:
            if name == "*" or host == name or host.endswith("." + name):
                return None
        return self._proxies.get(scheme) or self._proxies.get("all")

    async def _take(self, origin: _Origin) -> _Connection:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            # Closed by the server meanwhile (its end was read), or past its keep-alive.
            if connection.reusable(self._keepalive_expiry):
                return connection
            connection.close()
        return await self._connect(origin)

    async def _connect(self, origin: _Origin) -> _Connection:
        scheme, host, port, proxy = origin
        context = None
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = httpx.create_ssl_context()
            context = self._ssl_context
        loop = asyncio.get_running_loop()
        tls_host = host if context else None
        try:
            # asyncio sets TCP_NODELAY on the TCP sockets it connects.
            if proxy is None:
                _, connection = await loop.create_connection(
                    _Connection, host, port, ssl=context, server_hostname=tls_host
                )
            elif scheme == "http":
                _, connection = await loop.create_connection(_Connection, proxy.host, proxy.port)
            else:
                tunnel = await _tunnel(proxy, host, port)
                _, connection = await loop.create_connection(
                    _Connection, sock=tunnel, ssl=context, server_hostname=tls_host
                )
        except OSError as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError)
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}") from None
        return connection

    def _release(self, origin: _Origin, connection: _Connection) -> None:
        """Keeps `connection` for the next request if it can take one; and closes the
        oldest idle one if it has expired, so that a connection left at the bottom of
        the stack does not stay open for ever."""
        self._busy.discard(connection)
        if self._closed or not connection.reusable(self._keepalive_expiry):
            connection.close()
            return
        idle = self._idle.setdefault(origin, [])
        idle.append(connection)
        if len(idle) > 1 and not idle[0].reusable(self._keepalive_expiry):
            idle.pop(0).close()

    async def aclose(self) -> None:
        """Closes every connection; requests in flight fail with an `httpx.HTTPError`."""
        self._closed = True
        connections = [*self._busy, *(c for idle in self._idle.values() for c in idle)]
        self._busy.clear()
        self._idle.clear()
        for connection in connections:
            connection.close()

    async def __aenter__(self) -> ProviderClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def _tunnel(proxy: Proxy, host: str, port: int) -> socket.socket:
    """A socket connected to `host:port` through `proxy`'s CONNECT tunnel."""
    loop = asyncio.get_running_loop()
    family, kind, proto, _, address = (
        await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
        await _ask_for_tunnel(sock, proxy, host, port)
    except BaseException:
        sock.close()
        raise
    return sock


async def _ask_for_tunnel(sock: socket.socket, proxy: Proxy, host: str, port: int) -> None:
    """Sends CONNECT and reads the proxy's answer: `httpx.ProxyError` unless a 2xx. The
    error names the proxy and its status line, never its credentials."""
    loop = asyncio.get_running_loop()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # IPv6 in brackets
    request = f"CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n"
    if proxy.authorization:
        request += f"proxy-authorization: {proxy.authorization}\r\n"
    await loop.sock_sendall(sock, request.encode("ascii") + b"\r\n")
    # Nothing follows the proxy's head until the TLS handshake starts.
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk or len(answer) + len(chunk) > MAX_TUNNEL_ANSWER:
            raise httpx.ProxyError(
                f"proxy {proxy.host}:{proxy.port}: no whole answer to CONNECT {authority}"
            )
        answer += chunk
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    status = status_line.split(" ", 2)[1:2]
    if not status or len(status[0]) != 3 or not status[0].startswith("2"):
        raise httpx.ProxyError(
            f"proxy {proxy.host}:{proxy.port} refused CONNECT {authority}: {status_line[:80]!r}"
        )


def _checked(text: str) -> str:
    """`text`, refused if it could end a header line or the request line early."""
    if "\r" in text or "\n" in text or "\0" in text:
        raise httpx.LocalProtocolError("a header or the URL holds a line break or NUL")
    return text


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one exchange at a time, its answer parsed by httptools."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future[ProviderResponse] | None = None
        self._max_bytes = 0
        self._status = 0
        self._content_type = b""
        self._body = bytearray()
        self._headers_done = False
        # The body ends with the connection (neither content-length nor chunked).
        self._until_close = True
        self._keep_alive = False
        self._lost = False
        self._idle_since = time.monotonic()

    def reusable(self, keepalive_expiry: float) -> bool:
        """Open, kept alive by the server, and idle for less than `keepalive_expiry`."""
        return (
            not self._lost
            and self._keep_alive
            and self._answer is None
            and time.monotonic() - self._idle_since < keepalive_expiry
        )

    async def exchange(self, request: bytes, max_bytes: int) -> ProviderResponse:
        assert self._transport is not None
        assert self._answer is None
        self._answer = asyncio.get_running_loop().create_future()
        self._max_bytes = max_bytes
        self._keep_alive = False
        # Small: written whole to the socket, or buffered by asyncio if it is full.
        self._transport.write(request)
        try:
            return await self._answer
        finally:
            self._answer = None
            self._idle_since = time.monotonic()

    def close(self) -> None:
        self._keep_alive = False
        if self._transport is not None:
            self._transport.close()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not asserted as an asyncio.Transport: uvloop's transports are not subclasses.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._answer is None or self._answer.done():
            # Nothing was asked: the connection is out of step; never reuse it.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._answer is None or self._answer.done():
            return
        if self._headers_done and self._until_close:
            self._finish()
        elif exc is not None:
            self._fail(httpx.ReadError(f"{type(exc).__name__}: {exc}"))
        elif self._headers_done:
            self._fail(httpx.RemoteProtocolError("the server closed the connection mid-answer"))
        else:
            self._fail(httpx.RemoteProtocolError("the server closed the connection, no answer"))

    # httptools' callbacks

    def on_message_begin(self) -> None:
        if self._answer is None or self._answer.done():
            # An answer after the one asked for: out of step, never reused.
            self.close()
        self._status = 0
        self._content_type = b""
        self._body = bytearray()
        self._headers_done = False
        self._until_close = True

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self._content_type = value
        elif name == b"content-length" or (
            name == b"transfer-encoding" and value.lower().endswith(b"chunked")
        ):
            self._until_close = False

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body += body
        if len(self._body) > self._max_bytes:
            self._fail(AnswerTooLarge(f"answer over {self._max_bytes} bytes"))

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:
            return  # an interim answer (100 Continue): the real one follows
        self._keep_alive = self._parser.should_keep_alive()
        self._until_close = False
        self._finish()

    def _finish(self) -> None:
        answer = self._answer
        if answer is not None and not answer.done():
            content_type = self._content_type.decode("latin-1")
            answer.set_result(ProviderResponse(self._status, content_type, bytes(self._body)))

    def _fail(self, error: Exception) -> None:
        self.close()
        answer = self._answer
        if answer is not None and not answer.done():
            answer.set_exception(error)
