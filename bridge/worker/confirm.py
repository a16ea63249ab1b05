"""Confirming an order: the signed query, retried with backoff while errors are transient."""

from __future__ import annotations

import asyncio
import logging
import random
import time

import httpx

from bridge.config import Account, WorkerSettings
from bridge.errors import ProviderError
from bridge.metrics import Metrics
from bridge.orders import OrderSnapshot
from bridge.query import query_order

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
    def __init__(self, http: httpx.AsyncClient, settings: WorkerSettings, metrics: Metrics) -> None:
        self._http = http
        self._settings = settings
        self._metrics = metrics
        self._limits: dict[str, asyncio.Semaphore] = {}

    async def confirm(self, account: Account, order_id: str) -> OrderSnapshot:
        """The order as the provider confirms it.

        Raises the `ProviderError` at once when it is permanent, and `Unconfirmed`
        when transient errors outlast the retry budget.
        """
        s = self._settings
        deadline = time.monotonic() + s.retry_budget
        attempt = 0
        while True:
            attempt += 1
            try:
                snapshot = await self.query(account, order_id)
            except ProviderError as exc:
                if not exc.transient:
                    raise
                delay = backoff(attempt, s.retry_initial, s.retry_max)
                if time.monotonic() + delay > deadline:
                    raise Unconfirmed(exc, attempt) from exc
                log.warning("%s; attempt %d, again in %.1fs", exc, attempt, delay)
                await asyncio.sleep(delay)
            else:
                return snapshot

    async def query(self, account: Account, order_id: str) -> OrderSnapshot:
        """One signed query, within the account's limit on concurrent queries."""
        limit = self._limits.get(account.name)
        if limit is None:
            limit = self._limits[account.name] = asyncio.Semaphore(account.max_concurrent_queries)
        labels = {"provider": account.provider, "account": account.name}
        async with limit:
            try:
                snapshot = await query_order(self._http, account, order_id)
            except ProviderError as exc:
                self._metrics.inc(
                    "order_bridge_queries_total", outcome=type(exc).__name__, **labels
                )
                raise
        self._metrics.inc("order_bridge_queries_total", outcome="ok", **labels)
        return snapshot
