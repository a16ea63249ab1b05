"""The one way out to a provider account: rate-limited, callbacks first, batched, bounded.

Every order-detail query to one account goes through its `AccountGateway`. A
single dispatcher task waits for a waiting request, then a token from the
account's bucket, then a free concurrency slot, and only then forms the batch.
While the rate or concurrency limit binds, requests pile up and leave together
in one query, so batching needs no timer and costs no latency when idle.

Each account also has a circuit breaker (`bridge.worker.breaker`): while it is open
the dispatcher waits before forming the next batch, so requests keep piling up and
leave together once it lets a query through.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from bridge import providers, tracing
from bridge.accounts import Account
from bridge.config import WorkerSettings
from bridge.errors import OrderNotFound, ProviderRejected
from bridge.metrics import Metrics, query_outcome
from bridge.orders import OrderSnapshot
from bridge.query import Http, query_orders
from bridge.worker.breaker import CircuitBreaker, State

# One signed query for several order ids; answers the orders the provider knows.
Send = Callable[[Sequence[str]], Awaitable[list[OrderSnapshot]]]

# An order id, the future of its answer, and the trace the query continues.
_Waiter = tuple[str, asyncio.Future[OrderSnapshot], str | None]
# The waiters of one query, by order id: two waiters for one id share its answer.
_Batch = dict[str, list[asyncio.Future[OrderSnapshot]]]


class _TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; starts full."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    async def take(self) -> None:
        self._refill()
        while self._tokens < 1:
            await asyncio.sleep((1 - self._tokens) / self._rate)
            self._refill()
        self._tokens -= 1

    def set_rate(self, rate: float, burst: int) -> None:
        """From now on, `rate` tokens a second and at most `burst` saved up."""
        self._refill()
        self._rate = rate
        self._burst = float(burst)
        self._tokens = min(self._tokens, self._burst)

    @property
    def rate(self) -> float:
        return self._rate

    def refund(self) -> None:
        self._tokens = min(self._burst, self._tokens + 1)

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now


class AccountGateway:
    """Order-detail queries to one provider account, within its limits.

    `rate` queries a second with bursts of `burst`, each carrying up to
    `max_batch` ids, at most `max_concurrent` at once. Urgent requests (callback,
    watch and replay hints) go before polls. `breaker` pauses the queries while the
    provider keeps failing (by default, one with `WorkerSettings`' defaults).
    """

    def __init__(
        self,
        send: Send,
        *,
        rate: float,
        burst: int,
        max_batch: int,
        max_concurrent: int,
        provider: str = "",
        account: str = "",
        name: str = "",
        breaker: CircuitBreaker | None = None,
    ) -> None:
        if rate <= 0 or burst < 1 or max_batch < 1 or max_concurrent < 1:
            raise ValueError("rate must be > 0; burst, max_batch and max_concurrent >= 1")
        self._send = send
        self._rate = rate
        self._burst = burst
        self._bucket = _TokenBucket(rate, burst)
        self._max_batch = max_batch
        self._slots = asyncio.Semaphore(max_concurrent)
        self._provider = provider
        self._account = account
        self._name = name or f"{provider}/{account}"
        if breaker is None:
            defaults = WorkerSettings()
            breaker = CircuitBreaker(
                defaults.breaker_failures, defaults.breaker_cooldown, name=self._name
            )
        self._breaker = breaker
        self._urgent: deque[_Waiter] = deque()
        self._polls: deque[_Waiter] = deque()
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._closed = False

    async def query(self, order_id: str, *, urgent: bool) -> OrderSnapshot:
        """The order as the provider confirms it.

        Raises `OrderNotFound` when the answer leaves the order out, or the error
        the query raised (the same object for every order of that query).
        """
        if self._closed:
            raise RuntimeError(f"gateway {self._name} is closed")
        if self._dispatcher is None:
            self._dispatcher = asyncio.create_task(self._dispatch(), name=f"gateway-{self._name}")
        future: asyncio.Future[OrderSnapshot] = asyncio.get_running_loop().create_future()
        waiter = (order_id, future, tracing.current())
        (self._urgent if urgent else self._polls).append(waiter)
        self._wakeup.set()
        # A waiter cancelled here cancels `future`; the dispatcher then skips it.
        return await future

    @property
    def name(self) -> str:
        return self._name

    def circuit(self) -> str | None:
        """What the circuit breaker is doing, while it is not closed."""
        return self._breaker.describe()

    @property
    def rate(self) -> float:
        """Queries a second this gateway keeps to now (its share of the account's)."""
        return self._bucket.rate

    def share(self, fraction: float) -> None:
        """Keeps to `fraction` (0 to 1) of the account's rate and burst, the share of
        the account's orders this worker has: so that the workers together do not ask
        more than the account allows."""
        self._bucket.set_rate(self._rate * fraction, max(1, round(self._burst * fraction)))

    def hurry(self, order_id: str) -> None:
        """Moves the queued polls of `order_id` to the end of the urgent queue: a hint
        for the order waits behind them (one order's work runs in turn)."""
        hurried = [waiter for waiter in self._polls if waiter[0] == order_id]
        for waiter in hurried:
            self._polls.remove(waiter)
            self._urgent.append(waiter)

    async def aclose(self) -> None:
        """Stops dispatching; waiting and in-flight requests get `CancelledError`."""
        self._closed = True
        tasks = [*self._batches, *([self._dispatcher] if self._dispatcher else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, future, _ in (*self._urgent, *self._polls):
            future.cancel()
        self._urgent.clear()
        self._polls.clear()

    async def _dispatch(self) -> None:
        while True:
            while not self._has_waiter():
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._bucket.take()
            await self._slots.acquire()
            # Last, so that no query starts after the circuit opened while we waited.
            await self._breaker.admit()
            batch, trace = self._take_batch()
            if not batch:
                # Everyone waiting gave up (cancelled) while we waited for the limits.
                self._bucket.refund()
                self._slots.release()
                self._breaker.abandon()
                continue
            task = asyncio.create_task(self._run(batch, trace))
            self._batches.add(task)
            # A callback, not `finally`: a task cancelled before it starts runs no code.
            task.add_done_callback(functools.partial(self._finished, batch))

    def _finished(self, batch: _Batch, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._slots.release()
        # Left pending only when the query was cancelled (aclose).
        for future in _pending(batch):
            future.cancel()

    def _has_waiter(self) -> bool:
        for queue in (self._urgent, self._polls):
            while queue and queue[0][1].done():
                queue.popleft()
            if queue:
                return True
        return False

    def _take_batch(self) -> tuple[_Batch, str | None]:
        """Up to `max_batch` distinct ids, urgent first; waiters for one id share it.
        The query continues the trace of the first waiter that has one."""
        batch: _Batch = {}
        trace = None
        for queue in (self._urgent, self._polls):
            while queue:
                order_id, future, traceparent = queue[0]
                if not future.done():
                    if order_id not in batch and len(batch) >= self._max_batch:
                        return batch, trace
                    batch.setdefault(order_id, []).append(future)
                    trace = trace or traceparent
                queue.popleft()
        return batch, trace

    async def _run(self, batch: _Batch, trace: str | None) -> None:
        """Asks for `batch` (admitted by the breaker) and settles its waiters.

        A refusal of several ids may be one order's fault (an id the provider chokes
        on), so they are asked again in halves, each paid for like any query; only an
        order refused on its own gets the refusal. Transient errors are nobody's
        fault: they go to the whole batch as they are.
        """
        try:
            with tracing.resumed(trace):
                snapshots = await self._send_admitted(list(batch))
        except ProviderRejected as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            for half in _halves(batch):
                if _pending(half):
                    await self._bucket.take()
                    await self._breaker.admit()
                    await self._run(half, trace)
            return
        except Exception as exc:
            # Any failure, a bug included, belongs to the waiters; the dispatcher goes on.
            _fail(batch, exc)
            return
        found = {snapshot.order_id: snapshot for snapshot in snapshots}
        for order_id, futures in batch.items():
            for future in futures:
                if future.done():
                    continue
                if order_id in found:
                    future.set_result(found[order_id])
                else:
                    future.set_exception(self._not_found(order_id))

    async def _send_admitted(self, order_ids: list[str]) -> list[OrderSnapshot]:
        """One query the breaker let through, its outcome told to the breaker."""
        try:
            snapshots = await self._send(order_ids)
        except Exception as exc:
            self._breaker.record(exc)
            raise
        except BaseException:
            self._breaker.abandon()
            raise
        self._breaker.record(None)
        return snapshots

    def _not_found(self, order_id: str) -> OrderNotFound:
        return OrderNotFound(
            self._provider, self._account, order_id, "the provider does not know it"
        )


def _pending(batch: _Batch) -> list[asyncio.Future[OrderSnapshot]]:
    return [future for futures in batch.values() for future in futures if not future.done()]


def _fail(batch: _Batch, error: Exception) -> None:
    for future in _pending(batch):
        future.set_exception(error)


def _halves(batch: _Batch) -> tuple[_Batch, _Batch]:
    items = list(batch.items())
    middle = len(items) // 2
    return dict(items[:middle]), dict(items[middle:])


class Gateways:
    """One `AccountGateway` per account, built when the account is first queried.

    `settings` gives the circuit breakers' thresholds (defaults without it).
    """

    def __init__(
        self,
        http: Http,
        metrics: Metrics,
        settings: WorkerSettings | None = None,
    ) -> None:
        self._http = http
        self._metrics = metrics
        self._settings = settings or WorkerSettings()
        self._gateways: dict[str, AccountGateway] = {}
        self._share = 1.0

    def share(self, owned: int, partitions: int) -> None:
        """Every account's rate (and burst) shared out by inbox partitions: a worker
        owning `owned` of the `partitions` asks at most that share of it. Orders are
        spread over the partitions by the hash of their keys, so the share of the
        rate follows the share of the orders, and N workers never ask N times the
        rate. (While a rebalance goes on, the shares may add up to less than the whole,
        never to more: every member gives its partitions up before any gets new ones.)
        Owning none changes nothing: such a worker asks nothing."""
        if owned <= 0 or partitions <= 0:
            return
        self._share = min(1.0, owned / partitions)
        for gateway in self._gateways.values():
            gateway.share(self._share)

    def for_account(self, account: Account) -> AccountGateway:
        """The account's gateway; `max_batch` is clamped to what its provider allows."""
        gateway = self._gateways.get(account.name)
        if gateway is None:
            most = providers.get(account.provider).max_batch
            gateway = self._gateways[account.name] = AccountGateway(
                self._sender(account),
                rate=account.query_rate,
                burst=account.query_burst,
                max_batch=most if account.max_batch is None else min(account.max_batch, most),
                max_concurrent=account.max_concurrent_queries,
                provider=account.provider,
                account=account.name,
                breaker=self._breaker(account),
            )
            gateway.share(self._share)
        return gateway

    def degraded(self) -> list[str]:
        """One line per account whose circuit is not closed, for /readyz: the bridge
        still works (queries wait), so this is degraded, not failing."""
        return [
            f"{gateway.name}: {circuit}"
            for gateway in self._gateways.values()
            if (circuit := gateway.circuit()) is not None
        ]

    def hurry(self, account: str, order_id: str) -> None:
        """`AccountGateway.hurry` on the account's gateway, if it has one."""
        gateway = self._gateways.get(account)
        if gateway is not None:
            gateway.hurry(order_id)

    async def aclose(self) -> None:
        """Closes every gateway; they stay closed, so a late query fails instead of leaking."""
        await asyncio.gather(*(gateway.aclose() for gateway in self._gateways.values()))

    def _breaker(self, account: Account) -> CircuitBreaker:
        labels = {"provider": account.provider, "account": account.name}

        def show(state: State) -> None:
            self._metrics.set("order_bridge_breaker_open", int(state != "closed"), **labels)

        show("closed")
        return CircuitBreaker(
            self._settings.breaker_failures,
            self._settings.breaker_cooldown,
            name=f"{account.provider}/{account.name}",
            on_change=show,
        )

    def _sender(self, account: Account) -> Send:
        def count(error: Exception | None, started: float) -> None:
            outcome = query_outcome(error)
            self._metrics.inc(
                "order_bridge_queries_total",
                provider=account.provider,
                account=account.name,
                outcome=outcome,
            )
            elapsed = time.perf_counter() - started
            self._metrics.observe(
                "order_bridge_query_seconds", elapsed, provider=account.provider, outcome=outcome
            )

        async def send(order_ids: Sequence[str]) -> list[OrderSnapshot]:
            # Counted once a query, however many ids it carries: that is what the rate limits.
            started = time.perf_counter()
            try:
                snapshots = await query_orders(self._http, account, order_ids)
            except Exception as exc:
                count(exc, started)
                raise
            count(None, started)
            return snapshots

        return send
