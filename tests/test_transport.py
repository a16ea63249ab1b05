"""The providers' transport: connections kept and reused, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest

from bridge.worker.transport import ProviderTransport

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@dataclass
class Server:
    url: str = ""
    # Connections opened, and those the client closed (EOF read).
    opened: int = 0
    closed: int = 0
    # Answers before the server closes a connection itself (0: never).
    answers_per_connection: int = 0
    # Seconds before each answer.
    delay: float = 0.0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


@contextlib.asynccontextmanager
async def http_server(**options: float) -> AsyncIterator[Server]:
    state = Server(**options)  # type: ignore[arg-type]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.opened += 1
        state.writers.append(writer)
        answered = 0
        try:
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    state.closed += 1
                    return
                await asyncio.sleep(state.delay)
                writer.write(OK)
                await writer.drain()
                answered += 1
                if answered == state.answers_per_connection:
                    return
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    async with server:
        yield state
        for writer in state.writers:
            writer.close()


async def get(http: httpx.AsyncClient, url: str) -> str:
    response = await http.post(url, content=b"{}")
    return response.text


async def test_a_connection_is_reused_and_one_is_opened_per_request_in_flight() -> None:
    async with http_server(delay=0.05) as server:
        async with httpx.AsyncClient(transport=ProviderTransport()) as http:
            assert [await get(http, server.url) for _ in range(3)] == ["ok"] * 3
            assert server.opened == 1
            answers = await asyncio.gather(*(get(http, server.url) for _ in range(5)))
            assert answers == ["ok"] * 5
            assert server.opened == 5
            await asyncio.gather(*(get(http, server.url) for _ in range(5)))
            assert server.opened == 5
        # Closing the client closes its idle connections.
        for _ in range(50):
            if server.closed == 5:
                break
            await asyncio.sleep(0.01)
        assert server.closed == 5


async def test_a_connection_the_server_closed_is_replaced() -> None:
    client = httpx.AsyncClient(transport=ProviderTransport())
    async with http_server(answers_per_connection=1) as server, client as http:
        for _ in range(3):
            assert await get(http, server.url) == "ok"
            await asyncio.sleep(0.05)  # the server's close reaches the client
    assert server.opened == 3


async def test_an_expired_connection_is_not_reused() -> None:
    client = httpx.AsyncClient(transport=ProviderTransport(keepalive_expiry=0.05))
    async with http_server() as server, client as http:
        assert await get(http, server.url) == "ok"
        await asyncio.sleep(0.1)
        assert await get(http, server.url) == "ok"
    assert server.opened == 2


async def test_a_request_given_up_drops_its_connection() -> None:
    client = httpx.AsyncClient(transport=ProviderTransport())
    async with http_server(delay=0.5) as server, client as http:
        # httpx's timeout, then a cancellation from outside.
        with pytest.raises(httpx.ReadTimeout):
            await http.post(server.url, content=b"{}", timeout=0.1)
        server.delay = 0
        assert await get(http, server.url) == "ok"
        server.delay = 0.5
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(get(http, server.url), 0.1)
        server.delay = 0
        assert await get(http, server.url) == "ok"
    assert server.opened == 3


async def test_a_body_left_unread_drops_its_connection() -> None:
    client = httpx.AsyncClient(transport=ProviderTransport())
    async with http_server() as server, client as http:
        async with http.stream("POST", server.url, content=b"{}") as response:
            assert response.status_code == 200
        assert await get(http, server.url) == "ok"
    # The body was short enough to arrive with the headers: h11 saw its end either way.
    assert server.opened in (1, 2)


async def test_an_unreachable_server_is_an_httpx_error() -> None:
    async with httpx.AsyncClient(transport=ProviderTransport()) as http:
        with pytest.raises(httpx.ConnectError):
            await http.post("http://127.0.0.1:9/", content=b"{}")
