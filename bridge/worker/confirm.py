"""Confirming an order: the signed query, retried with backoff while errors are transient."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from bridge.accounts import Account
from bridge.config import WorkerSettings
from bridge.deadlines import Deadlines
from bridge.errors import ProviderError, ProviderUnavailable
from bridge.orders import OrderSnapshot
from bridge.worker.gateway import Gateways

log = logging.getLogger(__name__)


class Unconfirmed(Exception):
    """The retry budget ran out on transient errors; `last` is the latest of them."""

    def __init__(self, last: ProviderError, attempts: int) -> None:
        self.last = last
        self.attempts = attempts
        super().__init__(f"{last} (after {attempts} attempts)")


def backoff(attempt: int, initial: float, maximum: float) -> float:
    """Seconds to wait before attempt `attempt + 1`: doubling, capped, half of it jittered."""
    ceiling = min(maximum, initial * 2.0 ** (attempt - 1))
    # Jitter spreads retries of many orders that failed together.
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311


class Confirmer:
    """Asks providers about orders through each account's gateway (rate limit, batches)."""

    def __init__(self, gateways: Gateways, settings: WorkerSettings) -> None:
        self._gateways = gateways
        self._settings = settings
        self._deadlines = Deadlines()

    async def confirm(self, account: Account, order_id: str) -> OrderSnapshot:
        """The order as the provider confirms it, for a hint: urgent, retried.

        Raises the `ProviderError` at once when it is permanent, and `Unconfirmed`
        when transient errors outlast the retry budget. Waiting for the account's
        turn (its rate limit, its open circuit) fails nothing, but the budget bounds it.
        """
        s = self._settings
        deadline = time.monotonic() + s.retry_budget
        attempt = 0
        last: ProviderError | None = None
        while True:
            attempt += 1
            try:
                asked = self.query(account, order_id, urgent=True)
                return await self._deadlines.within(deadline - time.monotonic(), asked)
            except TimeoutError:
                # Raised by the timeout only: query timeouts are ProviderUnavailable.
                if last is None:
                    waiting = self._gateways.for_account(account).circuit() or "queued"
                    last = ProviderUnavailable(
                        account.provider, account.name, order_id, f"not asked in time: {waiting}"
                    )
                raise Unconfirmed(last, attempt) from None
            except ProviderError as exc:
                last = exc
                if not exc.transient:
                    raise
                delay = backoff(attempt, s.retry_initial, s.retry_max)
                if time.monotonic() + delay > deadline:
                    raise Unconfirmed(exc, attempt) from exc
                log.warning("%s; attempt %d, again in %.1fs", exc, attempt, delay)
                await asyncio.sleep(delay)

    async def query(self, account: Account, order_id: str, *, urgent: bool) -> OrderSnapshot:
        """One query; polls (`urgent=False`) wait behind hints for the account's rate."""
        return await self._gateways.for_account(account).query(order_id, urgent=urgent)
