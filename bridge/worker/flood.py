"""The flood guard: unverified callbacks cannot buy an account's queries without bound.

lemft and lunpay callbacks carry no signature anyone can check, so anybody can post
them. Each hint costs a query of the account's rate; past a number a minute, an
unverified hint no longer gets a query of its own: its order is polled soon instead,
and polls wait behind the hints of real orders.
"""

from __future__ import annotations

import time


class HintBudget:
    """At most `per_minute` unverified hints an account, in windows of a minute."""

    def __init__(self, per_minute: int) -> None:
        self._per_minute = per_minute
        self._windows: dict[str, tuple[float, int]] = {}

    def take(self, account: str, now: float | None = None) -> bool:
        """Whether one more unverified hint of `account` gets a query of its own."""
        now = time.monotonic() if now is None else now
        start, used = self._windows.get(account, (now, 0))
        if now - start >= 60.0:
            start, used = now, 0
        if used >= self._per_minute:
            return False
        self._windows[account] = (start, used + 1)
        return True
