"""`Sandbox`: the three providers in one Starlette app, with fault injection and the
`/_sandbox` control routes for people trying things with curl."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge.sandbox import control, kasushou, lemft, lunpay, wire
from bridge.sandbox.base import Encoding, Query, SandboxProvider, Shown
from bridge.sandbox.book import Faults, OrderBook, QueryRecord, SandboxOrder

if TYPE_CHECKING:
    from bridge.accounts import Account

PROVIDERS: dict[str, SandboxProvider] = {
    p.name: p for p in (lemft.PROVIDER, lunpay.PROVIDER, kasushou.PROVIDER)
}
# How long a hanging provider takes: longer than any client waits.
HANG_SECONDS = 3600.0

Endpoint = Callable[[Request], Awaitable[Response]]


class Sandbox:
    """Fake lemft, lunpay and kasushou servers for `accounts`, in one ASGI app (`app`).

    Each provider lives under its name: an account's base_url is `{server}/{provider}`.
    The accounts' credentials are checked exactly as the providers document; their
    base_url is ignored. `seed` makes generated ids and fault draws repeatable.
    """

    def __init__(self, accounts: Sequence[Account], *, seed: int = 0) -> None:
        for account in accounts:
            if account.provider not in PROVIDERS:
                raise ValueError(f"account {account.name!r}: no sandbox for {account.provider!r}")
        self._accounts = {account.name: account for account in accounts}
        # Made-up ids and fault draws, not secrets: a seeded PRNG makes runs repeatable.
        self._rng = random.Random(seed)  # noqa: S311
        self._book = OrderBook()
        self._faults: dict[str, Faults] = {}
        self._hanging: dict[str, set[asyncio.Future[None]]] = {}
        self._watchers: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._failure_turn = itertools.cycle(("server_error", "bad_gateway", "garbage"))
        routes = [
            Route(f"/{p.name}{p.path}", self._query_endpoint(p), methods=["POST"])
            for p in PROVIDERS.values()
        ]
        self.app = Starlette(routes=[*routes, *control.routes(self)])

    # -- orders -------------------------------------------------------------------------

    def create_order(
        self,
        account_name: str,
        *,
        order_id: str | None = None,
        status: int | None = None,
        amount: Decimal | str = Decimal("10.00"),
        currency: str = "USD",
        external_order_id: str = "",
        **fields: Any,
    ) -> SandboxOrder:
        """A new order at the account's provider. Without `order_id` one is made up in the
        provider's style; without `status` it has the provider's just-created status.
        `fields` are provider-specific extras (card_list, card_id, third_a_id, ...) that
        override the generated ones in answers and callbacks."""
        account = self._account(account_name)
        provider = PROVIDERS[account.provider]
        total = _amount(amount)
        if order_id is None:
            order_id = provider.new_order_id(self._rng)
            while (account_name, order_id) in self._book:
                order_id = provider.new_order_id(self._rng)
        elif not order_id or (account_name, order_id) in self._book:
            raise ValueError(f"order id {order_id!r} is empty or taken at {account_name!r}")
        order = SandboxOrder(
            account=account_name,
            provider=account.provider,
            order_id=order_id,
            amount=total,
            currency=currency,
            external_order_id=external_order_id,
            history=[provider.initial_status if status is None else _status(status)],
            fields={**provider.order_defaults(self._rng, total), **fields},
        )
        self._book.add(order)
        return order

    def set_status(
        self, account_name: str, order_id: str, status: int, **fields: Any
    ) -> SandboxOrder:
        """Moves an order to `status` (kept in its history) and updates its extra fields."""
        order = self.order(account_name, order_id)
        if _status(status) != order.status:
            order.history.append(status)
        order.fields.update(fields)
        order.updated_at = datetime.now(UTC)
        return order

    def orders(self) -> list[SandboxOrder]:
        """Every account's orders, oldest first."""
        return self._book.all()

    def order(self, account_name: str, order_id: str) -> SandboxOrder:
        """The account's order; KeyError when there is none."""
        self._account(account_name)
        return self._book.get(account_name, order_id)

    # -- what it saw ----------------------------------------------------------------------

    @property
    def queries(self) -> list[QueryRecord]:
        """Every order-detail query received, in the order their outcome was decided."""
        return list(self._book.queries)

    def query_count(self, account_name: str, order_id: str) -> int:
        """How many queries named this order, alone or in a batch, whatever their outcome."""
        return self._book.query_count(account_name, order_id)

    async def wait_for_queries(
        self, account_name: str, order_id: str | None = None, *, count: int = 1
    ) -> list[QueryRecord]:
        """Waits until `count` queries from the account (naming `order_id`, when given) are
        logged, whatever their outcome; returns those logged so far. Tests synchronize on
        this instead of sleeping; bound it with `asyncio.timeout`."""
        self._account(account_name)

        def matching() -> list[QueryRecord]:
            return [
                q
                for q in self._book.queries
                if q.account == account_name and (order_id is None or order_id in q.order_ids)
            ]

        if len(matching()) < count:
            watcher = (lambda: len(matching()) >= count, asyncio.get_running_loop().create_future())
            self._watchers.append(watcher)
            try:
                await watcher[1]
            finally:
                self._watchers.remove(watcher)
        return matching()

    def _wake_watchers(self) -> None:
        for ready, waiter in self._watchers:
            if not waiter.done() and ready():
                waiter.set_result(None)

    # -- faults ---------------------------------------------------------------------------

    def set_faults(self, account_name: str, faults: Faults) -> None:
        """Makes the account's provider misbehave from its next query on; turning `hang` off
        also lets the queries hanging now be answered."""
        self._account(account_name)
        self._faults[account_name] = faults
        if not faults.hang:
            for waiter in self._hanging.pop(account_name, set()):
                if not waiter.done():
                    waiter.set_result(None)

    def faults(self, account_name: str) -> Faults:
        self._account(account_name)
        return self._faults.get(account_name, Faults())

    # -- callbacks ------------------------------------------------------------------------

    def callback(
        self,
        account_name: str,
        order_id: str,
        *,
        encoding: Encoding = "json",
        status: int | None = None,
        bad_sign: bool = False,
    ) -> tuple[bytes, str]:
        """The body and content type of the callback the provider would post for the order,
        claiming `status` (default: its current one). `bad_sign` spoils kasushou's sign;
        the other providers sign nothing, so for them it is a ValueError."""
        if encoding not in ("json", "form"):
            raise ValueError(f"encoding must be 'json' or 'form', got {encoding!r}")
        account = self._account(account_name)
        order = self._book.get(account_name, order_id)
        claimed = order.status if status is None else _status(status)
        return PROVIDERS[account.provider].callback(account, order, claimed, encoding, bad_sign)

    async def post_callback(
        self,
        url: str,
        account_name: str,
        order_id: str,
        *,
        encoding: Encoding = "json",
        status: int | None = None,
        bad_sign: bool = False,
    ) -> httpx.Response:
        """Posts the callback to `url` as the provider would; the receiver's answer."""
        body, content_type = self.callback(
            account_name, order_id, encoding=encoding, status=status, bad_sign=bad_sign
        )
        async with httpx.AsyncClient(timeout=10.0) as http:
            return await http.post(url, content=body, headers={"content-type": content_type})

    # -- the providers' query routes ------------------------------------------------------

    def _query_endpoint(self, provider: SandboxProvider) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            return await self._answer_query(provider, request)

        return endpoint

    async def _answer_query(self, provider: SandboxProvider, request: Request) -> Response:
        received_at = time.monotonic()
        body = await request.body()
        accounts = [a for a in self._accounts.values() if a.provider == provider.name]
        query = provider.read_query(accounts, body, request.headers, request.path_params)
        name = query.account.name if query.account else None
        recorded = False

        def record(outcome: str) -> None:
            # Once per query: a hang released by set_faults is not logged a second time.
            nonlocal recorded
            if not recorded:
                recorded = True
                self._book.queries.append(
                    QueryRecord(
                        provider.name,
                        name,
                        query.order_ids,
                        received_at,
                        outcome,
                        request.headers.get("user-agent", ""),
                        request.headers.get("traceparent", ""),
                    )
                )
                self._wake_watchers()

        # A provider that is down, hanging or failing does so before it checks anything.
        faults = self._faults.get(name, Faults()) if name else Faults()
        if faults.down:
            record("down")
            return wire.unavailable()
        if name and faults.hang:
            # Logged on arrival, so the log already shows it when the client gives up.
            record("hang")
            if not await self._hang(name, request):
                return wire.unavailable()  # nobody is listening any more
            faults = self._faults.get(name, Faults())
        if faults.latency:
            await asyncio.sleep(faults.latency)
        if faults.error_rate and self._rng.random() < faults.error_rate:
            record("fault")
            return self._failure(provider)
        if query.rejection is not None:
            record(query.outcome)
            return query.rejection
        if set(query.order_ids) & set(faults.refuse_ids):
            record("refused")
            return provider.refusal()
        return self._answer_found(provider, query, faults, record)

    async def _hang(self, account_name: str, request: Request) -> bool:
        """Waits HANG_SECONDS, until the client disconnects (False), or until set_faults
        turns the hang off (True: answer after all)."""

        async def disconnected() -> None:
            # With the body read, the server's next message is the disconnect.
            while (await request.receive())["type"] != "http.disconnect":
                pass

        released = asyncio.get_running_loop().create_future()
        waiters = self._hanging.setdefault(account_name, set())
        waiters.add(released)
        client_gone = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait(
                {released, client_gone}, timeout=HANG_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiters.discard(released)
            client_gone.cancel()
        return released.done() and not client_gone.done()

    def _answer_found(
        self,
        provider: SandboxProvider,
        query: Query,
        faults: Faults,
        record: Callable[[str], None],
    ) -> Response:
        assert query.account is not None
        stale = bool(faults.stale_rate) and self._rng.random() < faults.stale_rate
        found = self._book.find(
            query.account.name, query.order_ids, by_external=query.by_external, days=query.days
        )
        kept = [o for o in found if o.order_id not in faults.missing_ids]
        shown = [Shown(o, o.previous_status if stale else o.status) for o in kept]
        response, outcome = provider.answer(query, shown)
        if len(kept) < len(found):
            outcome = "missing"
        elif any(s.status != s.order.status for s in shown):
            outcome = "stale"
        record(outcome)
        return response

    def _failure(self, provider: SandboxProvider) -> Response:
        kind = next(self._failure_turn)
        if kind == "server_error":
            return provider.server_error()
        if kind == "bad_gateway":
            return wire.bad_gateway()
        return wire.garbage()

    def _account(self, name: str) -> Account:
        try:
            return self._accounts[name]
        except KeyError:
            raise KeyError(f"no sandbox account {name!r}") from None


def _amount(value: Any) -> Decimal:
    try:
        amount = Decimal(value) if isinstance(value, Decimal | str | int) else None
    except InvalidOperation:
        amount = None
    if amount is None or isinstance(value, bool) or not amount.is_finite():
        raise ValueError(f"amount must be a decimal number, got {value!r}")
    return amount


def _status(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"status must be an integer, got {value!r}")
    return value
