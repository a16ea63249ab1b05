"""bridge.servers: what its protocol does to each connection, over real loopback sockets.

The slow-client deadlines are tested at the receiver (tests/test_hostile_input.py).
"""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from uvicorn.server import ServerState

from bridge.servers import _Protocol, listen


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def test_answers_are_not_held_back_by_nagle() -> None:
    # Head and body go out in two writes: with Nagle on, the body would wait for the
    # client's delayed ack of the head (40 ms).
    config = uvicorn.Config(Starlette(routes=[Route("/", ok)]), log_config=None, lifespan="off")
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
        [served] = made
        connection = served.transport.get_extra_info("socket")
        assert connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
        await writer.wait_closed()
