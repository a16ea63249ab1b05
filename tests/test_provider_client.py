"""The worker's own HTTP/1.1 client, against real servers on loopback (plain and TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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


async def test_tls_is_verified(certificate: tuple[Path, Path]) -> None:
    cert_path, key_path = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_path, key_path)
    async with http_server(tls=server_context) as server:
        # httpx's default context does not trust a self-signed certificate.
        async with ProviderClient("t") as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await post(client, server.url)
        trusting = httpx.create_ssl_context(verify=ssl.create_default_context(cafile=cert_path))
        async with ProviderClient("t", ssl_context=trusting) as client:
            assert [await post(client, server.url) for _ in range(2)] == [b"ok"] * 2
    # The refused handshake never reached the handler; the trusted one was reused.
    assert server.opened == 1
