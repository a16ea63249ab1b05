"""A circuit breaker for one provider account: a provider that keeps failing is left alone.

Closed, queries go. After `failures` transient failures in a row it opens: nothing is
sent for `cooldown` seconds. Then it half-opens: one trial query goes while the others
wait; a trial that gets any answer closes it, one that fails opens it again. Queries
wait while it is open; it fails nobody, so a hint's retry budget is all that ever ends
the wait (see `Confirmer.confirm`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Literal

from bridge.errors import ProviderError

log = logging.getLogger(__name__)

State = Literal["closed", "open", "half-open"]


def is_failure(error: BaseException | None) -> bool:
    """Whether a query's outcome counts against the provider: only transient provider
    errors (5xx, timeouts, unreachable, garbage). A refusal, "not found" or an answer
    show a provider that works."""
    return isinstance(error, ProviderError) and error.transient


class CircuitBreaker:
    def __init__(
        self,
        failures: int,
        cooldown: float,
        *,
        name: str = "",
        on_change: Callable[[State], None] | None = None,
    ) -> None:
        if failures < 1 or cooldown < 0:
            raise ValueError("failures must be >= 1 and cooldown >= 0")
        self._threshold = failures
        self._cooldown = cooldown
        self._name = name
        self._on_change = on_change
        self._state: State = "closed"
        self._failures = 0
        self._until = 0.0
        # Set (and replaced) on every change of state: what waiting callers wake on.
        self._changed = asyncio.Event()

    @property
    def state(self) -> State:
        return self._state

    def describe(self) -> str | None:
        """One line for /readyz while not closed; None when closed."""
        if self._state == "closed":
            return None
        left = self._until - time.monotonic()
        if self._state == "open" and left > 0:
            return f"circuit open, queries paused for {math.ceil(left)}s"
        return "circuit half-open, one trial query"

    async def admit(self) -> None:
        """Returns when a query may go: at once while closed. After the cool-down the
        first caller goes as the trial; the others wait for its outcome."""
        while self._state != "closed":
            left = self._until - time.monotonic()
            if self._state == "open" and left <= 0:
                self._move("half-open")
                return
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left if self._state == "open" else None):
                    await changed.wait()

    def record(self, error: BaseException | None) -> None:
        """The outcome of an admitted query: None for an answer, else its error.

        Outcomes of queries sent before the circuit opened count as well: an answer
        closes it, a failure during the trial opens it again.
        """
        if not is_failure(error):
            self._failures = 0
            if self._state != "closed":
                log.warning("%s: circuit closed: the provider answers again", self._name)
                self._move("closed")
            return
        self._failures += 1
        if self._state == "half-open" or (
            self._state == "closed" and self._failures >= self._threshold
        ):
            log.warning(
                "%s: circuit open after %d failed queries in a row (last: %s); no queries for %gs",
                self._name,
                self._failures,
                type(error).__name__,
                self._cooldown,
            )
            self._until = time.monotonic() + self._cooldown
            self._move("open")

    def abandon(self) -> None:
        """An admitted query that was never sent or never finished (cancelled): a trial
        left open is owed, so the next caller gets to make it."""
        if self._state == "half-open":
            self._until = time.monotonic()
            self._move("open")

    def _move(self, state: State) -> None:
        self._state = state
        self._changed.set()
        self._changed = asyncio.Event()
        if self._on_change is not None:
            self._on_change(state)
