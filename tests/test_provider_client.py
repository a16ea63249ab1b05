"""The worker's own HTTP/1.1 client, against real servers on loopback (plain and TLS)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bridge.errors import ConfigError
from bridge.providers.client import AnswerTooLarge, ProviderClient

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\nok"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
)
UNTIL_CLOSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nto the end"
TIMEOUT = 5.0


@dataclass
class Server:
    url: str = ""
    answer: bytes = OK
    # Connections opened, and those the client closed (EOF read).
    opened: int = 0
    closed: int = 0
    # Answers before the server closes a connection itself (0: never).
    answers_per_connection: int = 0
    delay: float = 0.0
    requests: list[bytes] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


@contextlib.asynccontextmanager
async def http_server(
    tls: ssl.SSLContext | None = None, **options: float | bytes
) -> AsyncIterator[Server]:
    state = Server(**options)  # type: ignore[arg-type]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.opened += 1
        state.writers.append(writer)
        answered = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    state.closed += 1
                    return
                length = [
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                state.requests.append(head + await reader.readexactly(sum(length)))
                await asyncio.sleep(state.delay)
                writer.write(state.answer)
                await writer.drain()
                answered += 1
                if answered == state.answers_per_connection or state.answer == UNTIL_CLOSE:
                    return
        except (OSError, asyncio.CancelledError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    scheme = "https" if tls else "http"
    state.url = f"{scheme}://127.0.0.1:{server.sockets[0].getsockname()[1]}/api/order/query"
    async with server:
        yield state
        for writer in state.writers:
            writer.close()


async def post(client: ProviderClient, url: str, **headers: str) -> bytes:
    answer = await client.post(url, headers, b"{}", timeout=TIMEOUT, max_bytes=1000)
    assert answer.status_code == 200
    return answer.content


async def test_the_request_is_a_plain_http11_post() -> None:
    async with http_server() as server, ProviderClient("order-bridge/test") as client:
        url = server.url + "?v=1"
        answer = await client.post(
            url, {"Content-Type": "application/json"}, b'{"a":1}', timeout=TIMEOUT, max_bytes=99
        )
    assert (answer.status_code, answer.content_type, answer.content) == (
        200,
        "application/json",
        b"ok",
    )
    (request,) = server.requests
    head, _, body = request.partition(b"\r\n\r\n")
    line, *headers = head.decode().split("\r\n")
    assert line == "POST /api/order/query?v=1 HTTP/1.1"
    fields = dict(h.split(": ", 1) for h in headers)
    assert fields["host"] == url.split("/")[2]
    assert fields["user-agent"] == "order-bridge/test"
    assert fields["Content-Type"] == "application/json"
    assert fields["content-length"] == "7"
    assert fields["accept-encoding"] == "identity"
    assert body == b'{"a":1}'


@pytest.mark.parametrize(
    ("answer", "content"), [(OK, b"ok"), (CHUNKED, b"abcdefg"), (UNTIL_CLOSE, b"to the end")]
)
async def test_every_way_an_answer_can_end_is_read(answer: bytes, content: bytes) -> None:
    async with http_server(answer=answer) as server, ProviderClient("test") as client:
        for _ in range(2):
            assert await post(client, server.url) == content
    # Only an answer ended by the connection's close takes the connection with it.
    assert server.opened == (2 if answer == UNTIL_CLOSE else 1)


def test_it_runs_on_uvloop_too() -> None:
    """uvloop's transports are not asyncio.Transport subclasses (the `bench` extra)."""
    uvloop = pytest.importorskip("uvloop")

    async def exchange() -> None:
        async with http_server(answer=CHUNKED) as server, ProviderClient("test") as client:
            for _ in range(2):
                assert await post(client, server.url) == b"abcdefg"
        assert server.opened == 1

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(exchange(), 30))


async def test_a_connection_is_reused_and_one_is_opened_per_request_in_flight() -> None:
    async with http_server(delay=0.05) as server:
        async with ProviderClient("test") as client:
            assert [await post(client, server.url) for _ in range(3)] == [b"ok"] * 3
            assert server.opened == 1
            answers = await asyncio.gather(*(post(client, server.url) for _ in range(5)))
            assert answers == [b"ok"] * 5
            assert server.opened == 5
            await asyncio.gather(*(post(client, server.url) for _ in range(5)))
            assert server.opened == 5
        # Closing the client closes its idle connections.
        for _ in range(50):
            if server.closed == 5:
                break
            await asyncio.sleep(0.01)
        assert server.closed == 5


async def test_a_connection_the_server_closed_is_replaced() -> None:
    async with http_server(answers_per_connection=1) as server, ProviderClient("t") as client:
        for _ in range(3):
            assert await post(client, server.url) == b"ok"
            await asyncio.sleep(0.05)  # the server's close reaches the client
    assert server.opened == 3


async def test_a_connection_closed_by_its_answer_is_not_reused() -> None:
    close = OK.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
    async with http_server(answer=close) as server, ProviderClient("t") as client:
        for _ in range(2):
            assert await post(client, server.url) == b"ok"
    assert server.opened == 2


async def test_an_expired_connection_is_not_reused() -> None:
    async with http_server() as server, ProviderClient("t", keepalive_expiry=0.05) as client:
        assert await post(client, server.url) == b"ok"
        await asyncio.sleep(0.1)
        assert await post(client, server.url) == b"ok"
    assert server.opened == 2


async def test_an_idle_connection_left_under_a_busy_one_is_closed_once_expired() -> None:
    async with (
        http_server(delay=0.05) as server,
        ProviderClient("t", keepalive_expiry=0.5) as client,
    ):
        await asyncio.gather(post(client, server.url), post(client, server.url))
        server.delay = 0
        # One query at a time: each takes the connection used last, so the other one
        # stays idle under it, and is closed once past its keep-alive.
        for _ in range(16):
            assert await post(client, server.url) == b"ok"
            await asyncio.sleep(0.05)
        assert (server.opened, server.closed) == (2, 1)


async def test_a_request_given_up_drops_its_connection() -> None:
    async with http_server(delay=0.5) as server, ProviderClient("t") as client:
        # Its own timeout, then a cancellation from outside.
        with pytest.raises(TimeoutError):
            await client.post(server.url, {}, b"{}", timeout=0.1, max_bytes=99)
        server.delay = 0
        assert await post(client, server.url) == b"ok"
        server.delay = 0.5
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(post(client, server.url), 0.1)
        server.delay = 0
        assert await post(client, server.url) == b"ok"
    assert server.opened == 3


async def test_an_answer_over_its_size_fails_and_drops_its_connection() -> None:
    async with http_server() as server, ProviderClient("t") as client:
        with pytest.raises(AnswerTooLarge, match="answer over 1 bytes"):
            await client.post(server.url, {}, b"{}", timeout=TIMEOUT, max_bytes=1)
        assert await post(client, server.url) == b"ok"
    assert server.opened == 2


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"", httpx.RemoteProtocolError),  # closed before answering
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", httpx.RemoteProtocolError),
        (b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n", httpx.RemoteProtocolError),
        (b"not http at all\r\n\r\n", httpx.RemoteProtocolError),
    ],
)
async def test_a_broken_answer_is_an_httpx_error(
    answer: bytes, error: type[httpx.HTTPError]
) -> None:
    async with (
        http_server(answer=answer, answers_per_connection=1) as server,
        ProviderClient("t") as client,
    ):
        with pytest.raises(error):
            await post(client, server.url)


async def test_an_unreachable_server_is_an_httpx_error() -> None:
    async with ProviderClient("t") as client:
        with pytest.raises(httpx.ConnectError, match="ConnectionRefusedError"):
            await post(client, "http://127.0.0.1:9/")


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("ftp://127.0.0.1/", {}),
        ("http://127.0.0.1:99999/", {}),
        ("http://127.0.0.1:9/", {"x-a": "one\r\nx-b: two"}),
    ],
)
async def test_what_cannot_be_sent_is_an_httpx_error(url: str, headers: dict[str, str]) -> None:
    async with ProviderClient("t") as client:
        with pytest.raises(httpx.HTTPError):
            await post(client, url, **headers)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls(certificate: tuple[Path, Path]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server's context with the certificate, and a client's (httpx's) trusting it."""
    cert_path, key_path = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_path, key_path)
    trusting = httpx.create_ssl_context(verify=ssl.create_default_context(cafile=cert_path))
    return server_context, trusting


async def test_tls_is_verified(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, trusting = tls
    async with http_server(tls=server_context) as server:
        # httpx's default context does not trust a self-signed certificate.
        async with ProviderClient("t") as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await post(client, server.url)
        async with ProviderClient("t", ssl_context=trusting) as client:
            assert [await post(client, server.url) for _ in range(2)] == [b"ok"] * 2
    # The refused handshake never reached the handler; the trusted one was reused.
    assert server.opened == 1


# -- through an HTTP proxy -------------------------------------------------------------


@dataclass
class ProxyServer:
    url: str = ""
    # An answer to CONNECT instead of the tunnel.
    refuse: bytes = b""
    # The head of each request a client sent it, and every byte relayed after one.
    heads: list[bytes] = field(default_factory=list)
    relayed: bytearray = field(default_factory=bytearray)


@contextlib.asynccontextmanager
async def proxy_server(refuse: bytes = b"") -> AsyncIterator[ProxyServer]:
    """A proxy as squid is one: CONNECT tunnels, and plain HTTP forwarded from an
    absolute URL, on one upstream connection a client connection."""
    state = ProxyServer(refuse=refuse)

    async def pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: bytearray | None
    ) -> None:
        try:
            while data := await reader.read(65536):
                if seen is not None:
                    seen += data
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError):
            writer.close()
            return
        state.heads.append(head)
        method, target, _ = head.split(b"\r\n", 1)[0].split(b" ")
        if method == b"CONNECT":
            if state.refuse:
                writer.write(state.refuse)
                writer.close()
                return
            host, _, port = target.decode().rpartition(":")
            upstream = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            url = urlsplit(target.decode())
            upstream = await asyncio.open_connection(url.hostname, url.port)
            upstream[1].write(head.replace(target, url.path.encode(), 1))
        await asyncio.gather(
            pipe(reader, upstream[1], state.relayed), pipe(upstream[0], writer, None)
        )

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield state


def with_credentials(url: str, credentials: str) -> str:
    return url.replace("http://", f"http://{credentials}@", 1)


async def test_an_https_query_goes_through_the_proxys_tunnel(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_context, trusting = tls
    async with http_server(tls=server_context) as server, proxy_server() as proxy:
        proxies = {"https": with_credentials(proxy.url, "ops:p%40ss")}
        async with ProviderClient("t", ssl_context=trusting, proxies=proxies) as client:
            answers = [await post(client, server.url, x_card="4111111111111111") for _ in range(2)]
    assert answers == [b"ok"] * 2
    port = urlsplit(server.url).port
    assert port is not None
    authorization = b"Basic " + base64.b64encode(b"ops:p@ss")
    assert proxy.heads == [
        b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n"
        b"proxy-authorization: %s\r\n\r\n" % (port, port, authorization)
    ]  # one tunnel, kept alive for the second query
    assert server.opened == 1
    assert len(server.requests) == 2
    # TLS runs end to end with the provider: the proxy relayed ciphertext only.
    assert proxy.relayed
    assert b"4111111111111111" not in proxy.relayed


async def test_an_http_query_is_forwarded_by_the_proxy() -> None:
    async with http_server() as server, proxy_server() as proxy:
        proxies = {"http": with_credentials(proxy.url, "ops:pw")}
        async with ProviderClient("t", proxies=proxies) as client:
            assert await post(client, server.url) == b"ok"
    assert proxy.heads[0].startswith(f"POST {server.url} HTTP/1.1\r\n".encode())
    assert b"proxy-authorization: Basic " + base64.b64encode(b"ops:pw") in proxy.heads[0]
    assert len(server.requests) == 1


async def test_a_refused_tunnel_is_an_httpx_error_without_the_credentials() -> None:
    refusal = b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n"
    async with proxy_server(refuse=refusal) as proxy:
        proxies = {"all": with_credentials(proxy.url, "ops:s3cret")}
        async with ProviderClient("t", proxies=proxies) as client:
            with pytest.raises(httpx.ProxyError, match=r"refused CONNECT 127\.0\.0\.1:9: .*407"):
                await post(client, "https://127.0.0.1:9/api/order/query")
            with pytest.raises(httpx.ProxyError) as caught:
                await post(client, "https://127.0.0.1:9/api/order/query")
    message = str(caught.value)
    assert "s3cret" not in message
    assert base64.b64encode(b"ops:s3cret").decode() not in message


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "*", "example.com, 127.0.0.1"])
async def test_no_proxy_names_the_hosts_asked_directly(no_proxy: str) -> None:
    async with http_server() as server, proxy_server() as proxy:
        proxies = {"all": proxy.url, "no": no_proxy}
        async with ProviderClient("t", proxies=proxies) as client:
            assert await post(client, server.url) == b"ok"
    assert proxy.heads == []


async def test_the_environments_proxy_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    async with http_server() as server, proxy_server() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        async with ProviderClient("t") as client:
            assert await post(client, server.url) == b"ok"
    assert len(proxy.heads) == 1


@pytest.mark.parametrize("url", ["socks5://ops:pw@127.0.0.1:1080", "https://ops:pw@proxy:3128"])
def test_only_http_proxies_are_taken(url: str) -> None:
    with pytest.raises(ConfigError, match=r"HTTPS_PROXY: .* only http:// ones") as caught:
        ProviderClient("t", proxies={"https": url})
    assert "pw" not in str(caught.value)
