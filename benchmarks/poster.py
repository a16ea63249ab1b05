"""Posts callbacks, each once, from a process of its own, on raw keep-alive connections.

pipeline.py's driver: with httpx, the clients took about half of the driver's ~3 ms of
CPU an order, on the same 2 cores as the bridge. Here each request is rendered once,
before the clock starts, and an answer is read as far as its status and its body's
length, which costs a few tens of microseconds. Being a process of its own, its CPU is
counted apart from the sandbox's.

    python benchmarks/poster.py HOST PORT --concurrency C [--rate R] < requests > answers

It reads JSON `[[path, content_type, body], ...]` (the body's bytes as latin-1) and
writes JSON `[[sent, answered, status], ...]`, one answer per request in their order,
times from `time.monotonic()` (one clock for every process of the machine, on Linux),
status 0 for no answer. With `--rate`, request i is due at start + i/R and
`sent` is when it was due, not when a connection was free, so that a bridge falling
behind shows in the latencies (no coordinated omission).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence

TIMEOUT = 30.0

Request = tuple[str, str, bytes]
Answer = tuple[float, float, int]


def render(host: str, port: int, path: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class Connection:
    """One keep-alive connection, opened again after the server closes it or an error."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def send(self, raw: bytes) -> int:
        """The answer's status, or 0 when there was none."""
        try:
            async with asyncio.timeout(TIMEOUT):
                return await self._exchange(raw)
        except (OSError, EOFError, ValueError, TimeoutError, asyncio.LimitOverrunError):
            self.close()
            return 0

    async def _exchange(self, raw: bytes) -> int:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        writer.write(raw)
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        status = int(head[9:12])
        start = head.find(b"\r\ncontent-length:")
        if start < 0:
            raise ValueError("an answer without content-length")
        end = head.index(b"\r\n", start + 2)
        await reader.readexactly(int(head[start + 17 : end]))
        if b"\r\nconnection: close" in head:
            self.close()
        return status

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def post(
    host: str, port: int, requests: Sequence[Request], concurrency: int, rate: float
) -> list[Answer]:
    raws = [render(host, port, *request) for request in requests]
    answers: list[Answer] = [(0.0, 0.0, 0)] * len(raws)
    due: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()

    async def client() -> None:
        connection = Connection(host, port)
        while (turn := await due.get()) is not None:
            i, sent = turn
            sent = sent or time.monotonic()
            status = await connection.send(raws[i])
            answers[i] = (sent, time.monotonic(), status)
        connection.close()

    clients = [asyncio.create_task(client()) for _ in range(concurrency)]
    start = time.monotonic()
    for i in range(len(raws)):
        if rate:
            when = start + i / rate
            if (wait := when - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            due.put_nowait((i, when))
        else:
            due.put_nowait((i, 0.0))
    for _ in clients:
        due.put_nowait(None)
    await asyncio.gather(*clients)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=0.0, help="requests a second (0: at once)")
    args = parser.parse_args()
    requests = [
        (path, content_type, body.encode("latin-1"))
        for path, content_type, body in json.load(sys.stdin)
    ]
    answers = asyncio.run(post(args.host, args.port, requests, args.concurrency, args.rate))
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
