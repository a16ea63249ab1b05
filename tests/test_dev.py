"""`order-bridge dev` as a newcomer runs it: the story plays to its end, Ctrl-C stops it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time


async def test_dev_plays_its_story_and_stops_on_ctrl_c() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "dev",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    try:
        while "demo story done" not in lines:
            line = await asyncio.wait_for(process.stdout.readline(), deadline - time.monotonic())
            assert line, "dev exited early:\n" + "\n".join(lines)
            lines.append(line.decode().rstrip("\n"))
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(process.communicate(), 30)
    output = "\n".join(lines)
    events = [line for line in lines if line.startswith("  event ")]
    assert len(events) == 5, output
    assert "new -> processing" in events[0]
    assert "processing -> succeeded" in events[1]
    assert "no event: the provider confirms nothing changed" in output
    assert "lunpay" in events[2]
    assert "new -> pending" in events[2]  # the forged "completed" is not believed
    assert "succeeded -> refunded" in events[4]
    assert "HTTP 401" in output
    assert "curl" in output
    assert process.returncode == 0, rest.decode()
