"""bridge.servers: what its protocol does to each connection, over real loopback sockets,
on asyncio's event loop (the bridge's) and on uvloop's, when installed (the `bench`
extra), as `uvicorn --loop uvloop` would run it.

The receiver's own limits (the body's deadline and size) are tested in
tests/test_hostile_input.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send
from uvicorn.server import ServerState

from bridge.servers import MAX_HEAD_BYTES, _HeadHeld, _Protocol, body_arrived, listen, serve

HEADER_TIMEOUT = 0.4
IDLE_TIMEOUT = 0.4
# Longer than every timeout above, and than the slowest machine needs to notice one.
PATIENCE = 5.0
LOOPS = ["asyncio", "uvloop"]


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def echo(request: Request) -> Response:
    return PlainTextResponse(await request.body())


async def slow(request: Request) -> Response:
    # Longer than the idle timeout: a connection waiting for its answer is not idle.
    await asyncio.sleep(IDLE_TIMEOUT * 1.5)
    return PlainTextResponse("ok")


APP = Starlette(
    routes=[
        Route("/", ok, methods=["GET", "POST"]),
        Route("/echo", echo, methods=["POST"]),
        Route("/slow", slow),
    ]
)


def run_on(name: str, test: Callable[[], Awaitable[None]]) -> None:
    factory = asyncio.new_event_loop
    if name == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(test(), 30))


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def until_closed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[bytes, float]:
    """What the server says until it closes the connection, and how long that took."""
    started = time.monotonic()
    answer = b""
    try:
        async with asyncio.timeout(PATIENCE):
            while chunk := await reader.read(65536):
                answer += chunk
    finally:
        writer.close()
    return answer, time.monotonic() - started


async def dribble(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pieces: list[bytes]
) -> bytes:
    """Sends `pieces` at a tenth of HEADER_TIMEOUT apart, each in time, until the server
    answers; then what it says until it closes the connection."""
    answer = b""
    for piece in pieces:
        writer.write(piece)
        # Stopping at the answer: writing more would reset the connection.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HEADER_TIMEOUT / 10):
                answer = await reader.read(65536)
                break
    rest, _ = await until_closed(reader, writer)
    return answer + rest


def served(test: Callable[[str], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        async with serve(APP, header_timeout=HEADER_TIMEOUT, idle_timeout=IDLE_TIMEOUT) as url:
            await test(url)

    return run


@pytest.mark.parametrize("name", LOOPS)
def test_answers_are_not_held_back_by_nagle(name: str) -> None:
    # An answer can go out in two writes (`no_delay`): with Nagle on, the second would
    # wait for the client's delayed ack of the first (40 ms).
    async def test() -> None:
        config = uvicorn.Config(APP, log_config=None, lifespan="off")
        state = ServerState()
        made: list[_Protocol] = []

        def protocol() -> _Protocol:
            made.append(_Protocol(config, state, {}))
            return made[-1]

        sock = listen("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(protocol, sock=sock)
        async with server:
            reader, writer = await asyncio.open_connection(*sock.getsockname())
            writer.write(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await reader.readexactly(2) == b"ok"
            [one] = made
            connection = one.transport.get_extra_info("socket")
            assert connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            writer.close()
            await writer.wait_closed()

    run_on(name, test)


class Recording:
    """A transport that records what is written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


@dataclass
class Cycle:
    response_started: bool = False
    completed: int = 0

    def on_response(self) -> None:
        self.completed += 1


def test_an_answers_head_goes_out_with_its_body() -> None:
    transport, cycle = Recording(), Cycle()
    held = _HeadHeld(transport, cycle)  # type: ignore[arg-type]
    held.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response: at once
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    cycle.response_started = True
    held.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert len(transport.writes) == 1
    held.write(b"ok")
    assert transport.writes[1:] == [b"HTTP/1.1 200 OK\r\n\r\nok"]
    held.write(b"more")  # a streamed body's next parts: at once
    assert transport.writes[2:] == [b"more"]
    cycle.on_response()  # replaced by _HeadHeld
    assert len(transport.writes) == 3
    assert cycle.completed == 1

    # A response without a body (HEAD) sends its head when complete.
    transport, cycle = Recording(), Cycle(response_started=True)
    _HeadHeld(transport, cycle)  # type: ignore[arg-type]
    cycle.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")  # type: ignore[attr-defined]
    assert transport.writes == []
    cycle.on_response()
    assert (transport.writes, cycle.completed) == ([b"HTTP/1.1 200 OK\r\n\r\n"], 1)

    # One whose body never comes (the app failed) sends it before the close.
    transport, cycle = Recording(), Cycle(response_started=True)
    held = _HeadHeld(transport, cycle)  # type: ignore[arg-type]
    held.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert not held.is_closing()
    held.close()
    assert (transport.writes, transport.closed) == ([b"HTTP/1.1 200 OK\r\n\r\n"], True)
    assert held.is_closing()


@pytest.mark.parametrize("name", LOOPS)
def test_answers_with_an_interim_head_or_no_body_are_whole(name: str) -> None:
    async def test(url: str) -> None:
        reader, writer = await connect(url)
        writer.write(b"HEAD / HTTP/1.1\r\nhost: t\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"content-length: 2\r\n" in head  # and no body: the next answer follows

        writer.write(b"POST /echo HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\n")
        writer.write(b"content-length: 2\r\n\r\n")
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hi")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        assert await reader.readexactly(2) == b"hi"
        writer.close()
        await writer.wait_closed()

    run_on(name, served(test))


@pytest.mark.parametrize("name", LOOPS)
def test_whether_a_body_has_all_arrived_is_known(name: str) -> None:
    seen: list[bool] = []

    async def test() -> None:
        looked = asyncio.Event()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            seen.append(body_arrived(receive))
            looked.set()
            while (await receive()).get("more_body"):
                pass
            seen.append(body_arrived(receive))
            await PlainTextResponse("ok")(scope, receive, send)

        async with serve(app) as url:
            reader, writer = await connect(url)
            writer.write(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n")
            await looked.wait()  # the app runs with the head alone
            writer.write(b"hi")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
            writer.close()
            await writer.wait_closed()

    run_on(name, test)
    assert seen == [False, True]

    async def elsewhere() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    assert not body_arrived(elsewhere)


@pytest.mark.parametrize("name", LOOPS)
def test_idle_connections_are_closed(name: str) -> None:
    async def test(url: str) -> None:
        # One that never says a word.
        reader, writer = await connect(url)
        answer, took = await until_closed(reader, writer)
        assert answer == b""
        assert took >= IDLE_TIMEOUT * 0.8

        # One kept alive after its requests.
        reader, writer = await connect(url)
        for _ in range(3):
            writer.write(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await reader.readexactly(2) == b"ok"
        answer, took = await until_closed(reader, writer)
        assert answer == b""
        assert IDLE_TIMEOUT * 0.8 <= took < PATIENCE

    run_on(name, served(test))


@pytest.mark.parametrize("name", LOOPS)
def test_busy_connections_are_kept(name: str) -> None:
    async def test(url: str) -> None:
        reader, writer = await connect(url)
        started = time.monotonic()
        # Requests a quarter of the idle timeout apart, for over twice its length.
        while time.monotonic() - started < IDLE_TIMEOUT * 2.5:
            writer.write(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
            assert await reader.readexactly(2) == b"ok"
            await asyncio.sleep(IDLE_TIMEOUT / 4)
        writer.write(b"GET /slow HTTP/1.1\r\nhost: test\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        assert await reader.readexactly(2) == b"ok"
        # Then idle: closed after the idle timeout, counted from that last answer.
        answer, took = await until_closed(reader, writer)
        assert answer == b""
        assert IDLE_TIMEOUT * 0.8 <= took < PATIENCE

    run_on(name, served(test))


@pytest.mark.parametrize("name", LOOPS)
def test_request_heads_must_come_in_time(name: str) -> None:
    head = b"POST / HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\r\n"

    async def test(url: str) -> None:
        # Half a head, then nothing.
        reader, writer = await connect(url)
        writer.write(head[:20])
        answer, took = await until_closed(reader, writer)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert took >= HEADER_TIMEOUT * 0.8

        # Trickled a byte at a time, each one in time: the deadline is for all of them.
        reader, writer = await connect(url)
        started = time.monotonic()
        answer = await dribble(reader, writer, [bytes([byte]) for byte in head[:-1]])
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert time.monotonic() - started < HEADER_TIMEOUT + PATIENCE / 2

        # Line breaks between requests are no request either: they keep nothing open.
        reader, writer = await connect(url)
        writer.write(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        await reader.readexactly(2)
        started = time.monotonic()
        answer = await dribble(reader, writer, [b"\r\n"] * 100)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert time.monotonic() - started < HEADER_TIMEOUT + PATIENCE / 2

    run_on(name, served(test))


@pytest.mark.parametrize("name", LOOPS)
def test_a_head_too_large_is_refused(name: str) -> None:
    async def test(url: str) -> None:
        reader, writer = await connect(url)
        writer.write(b"GET / HTTP/1.1\r\nhost: test\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(MAX_HEAD_BYTES // 1000 + 2):
                if reader.at_eof():
                    break
                writer.write(b"x-padding: " + b"x" * 1000 + b"\r\n")
                await writer.drain()
        answer, took = await until_closed(reader, writer)
        assert answer.startswith(b"HTTP/1.1 431 "), answer
        assert took < HEADER_TIMEOUT

        # A head just under the bound, with a body, is served.
        reader, writer = await connect(url)
        padding = b"x-padding: " + b"x" * (MAX_HEAD_BYTES - 200) + b"\r\n"
        body = b"y" * 60_000
        writer.write(
            b"POST / HTTP/1.1\r\nhost: test\r\n"
            + padding
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        writer.close()
        await writer.wait_closed()

    run_on(name, served(test))
