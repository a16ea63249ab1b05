"""The event loop of the bridge's processes: uvloop's where it is installed.

uvloop (libuv, in C) runs the receiver's I/O at about half the CPU of asyncio's own
loop. It is a dependency everywhere it has wheels (not on Windows); elsewhere the
bridge runs on asyncio's loop, which behaves the same, only slower.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes a new event loop: uvloop's when it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return new_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, on the loop `factory()` makes."""
    with asyncio.Runner(loop_factory=factory()) as runner:
        return runner.run(main)
