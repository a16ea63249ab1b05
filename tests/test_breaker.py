"""The circuit breaker of each account, against the sandbox providers over real HTTP.

Time is only ever read, never slept on: a pause shows as the gap between the arrival
times of the queries the sandbox logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from bridge.accounts import Account
from bridge.config import WorkerSettings
from bridge.errors import InvalidAnswer, OrderNotFound, ProviderError, ProviderUnavailable
from bridge.metrics import Metrics
from bridge.orders import OrderSnapshot
from bridge.sandbox import Faults
from bridge.worker.confirm import Confirmer, Unconfirmed
from bridge.worker.gateway import Gateways
from tests.conftest import RunningSandbox
from tests.helpers import SECRETS

COOLDOWN = 0.2
# Generous: these tests wait on the sandbox's log of queries, never on a clock.
DEADLINE = 10.0


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def fast(account: Account) -> Account:
    return dataclasses.replace(account, query_rate=1000.0, query_burst=100)


def gateways_for(http: httpx.AsyncClient, metrics: Metrics, failures: int) -> Gateways:
    settings = WorkerSettings(breaker_failures=failures, breaker_cooldown=COOLDOWN)
    return Gateways(http, metrics, settings)


def gauge(metrics: Metrics, account: Account) -> str:
    """The value in the breaker's line of the /metrics text."""
    labels = f'account="{account.name}",provider="{account.provider}"'
    prefix = f"order_bridge_breaker_open{{{labels}}} "
    (line,) = [line for line in metrics.render().splitlines() if line.startswith(prefix)]
    return line.removeprefix(prefix).removesuffix(".0")


async def test_failures_in_a_row_open_the_circuit_and_an_answer_closes_it(
    sandbox: RunningSandbox,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    box = sandbox.sandbox
    account = fast(sandbox.accounts["kasushou"])
    order = box.create_order(account.name).order_id
    metrics = Metrics()
    gateways = gateways_for(http, metrics, failures=3)
    gateway = gateways.for_account(account)
    assert gauge(metrics, account) == "0"

    async def ask() -> OrderSnapshot | BaseException:
        try:
            return await gateway.query(order, urgent=True)
        except ProviderError as exc:
            return exc

    # A 500, then "not found" and a refusal: the provider is there, the count starts over.
    box.set_faults(account.name, Faults(error_rate=1.0))
    assert isinstance(await ask(), ProviderUnavailable)
    box.set_faults(account.name, Faults())
    with pytest.raises(OrderNotFound):
        await gateway.query("D-NOBODY-KNOWS", urgent=True)
    box.set_faults(account.name, Faults(refuse_ids=(order,)))
    await ask()
    assert gateways.degraded() == []
    # Three in a row (502 page, garbage, 500) open it: nothing is sent for the cool-down.
    box.set_faults(account.name, Faults(error_rate=1.0))
    failed = [await ask() for _ in range(3)]
    assert [type(f) for f in failed] == [ProviderUnavailable, InvalidAnswer, ProviderUnavailable]
    assert gauge(metrics, account) == "1"
    (line,) = gateways.degraded()
    assert line == "kasushou/kasushou-test: circuit open, queries paused for 1s"

    box.set_faults(account.name, Faults())
    async with asyncio.timeout(DEADLINE):
        answer = await ask()
    assert isinstance(answer, OrderSnapshot)
    *_, last_failure, trial = box.queries
    assert (last_failure.outcome, trial.outcome) == ("fault", "ok")
    assert trial.received_at - last_failure.received_at >= COOLDOWN
    assert gauge(metrics, account) == "0"
    assert gateways.degraded() == []

    lines = [r.getMessage() for r in caplog.records if "circuit" in r.getMessage()]
    assert lines == [
        "kasushou/kasushou-test: circuit open after 3 failed queries in a row "
        "(last: ProviderUnavailable); no queries for 0.2s",
        "kasushou/kasushou-test: circuit closed: the provider answers again",
    ]
    assert not any(secret in caplog.text for secret in SECRETS)
    await gateways.aclose()


async def test_one_trial_at_a_time_and_a_failed_trial_opens_it_again(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    box = sandbox.sandbox
    account = fast(sandbox.accounts["lemft"])  # one order a query: one waiter a trial
    ids = [box.create_order(account.name).order_id for _ in range(4)]
    metrics = Metrics()
    gateways = gateways_for(http, metrics, failures=1)
    gateway = gateways.for_account(account)
    box.set_faults(account.name, Faults(down=True))
    with pytest.raises(ProviderUnavailable):
        await gateway.query(ids[0], urgent=True)

    # Hints and polls wait while it is open; the first trial fails its one waiter only.
    waiters = [
        asyncio.create_task(gateway.query(order_id, urgent=urgent))
        for order_id, urgent in zip(ids[1:], (True, True, False), strict=True)
    ]
    async with asyncio.timeout(DEADLINE):
        await box.wait_for_queries(account.name, count=2)
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    assert done == {waiters[0]}
    assert isinstance(waiters[0].exception(), ProviderUnavailable)
    # Its successor goes a cool-down later, so the others are still waiting, not failed.
    assert not any(w.done() for w in waiters[1:])
    assert gauge(metrics, account) == "1"

    box.set_faults(account.name, Faults())
    async with asyncio.timeout(DEADLINE):
        answers = await asyncio.gather(*waiters[1:])
    assert [a.order_id for a in answers] == ids[2:]
    queries = box.queries
    assert [q.order_ids for q in queries] == [(i,) for i in ids]
    assert [q.outcome for q in queries] == ["down", "down", "ok", "ok"]
    first, trial, second_trial, _ = (q.received_at for q in queries)
    assert trial - first >= COOLDOWN
    assert second_trial - trial >= COOLDOWN
    assert gauge(metrics, account) == "0"
    await gateways.aclose()


async def test_requests_waiting_on_the_circuit_leave_in_one_trial_batch(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    box = sandbox.sandbox
    account = fast(sandbox.accounts["kasushou"])
    ids = [box.create_order(account.name).order_id for _ in range(5)]
    gateways = gateways_for(http, Metrics(), failures=1)
    gateway = gateways.for_account(account)
    box.set_faults(account.name, Faults(down=True))
    with pytest.raises(ProviderUnavailable):
        await gateway.query(ids[0], urgent=False)
    box.set_faults(account.name, Faults())
    async with asyncio.timeout(DEADLINE):
        answers = await asyncio.gather(
            *(gateway.query(i, urgent=n % 2 == 0) for n, i in enumerate(ids))
        )
    assert [a.order_id for a in answers] == ids
    failed, trial = box.queries
    assert (len(failed.order_ids), len(trial.order_ids)) == (1, 5)
    assert trial.received_at - failed.received_at >= COOLDOWN
    await gateways.aclose()


async def test_a_hint_waits_on_an_open_circuit_until_its_retry_budget_ends(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    box = sandbox.sandbox
    account = fast(sandbox.accounts["lunpay"])
    polled, hinted = (box.create_order(account.name).order_id for _ in range(2))
    budget = 0.5
    settings = WorkerSettings(
        retry_budget=budget,
        retry_initial=0.01,
        retry_max=0.01,
        breaker_failures=2,
        breaker_cooldown=30.0,  # longer than the budget
    )
    gateways = Gateways(http, Metrics(), settings)
    confirmer = Confirmer(gateways, settings)
    box.set_faults(account.name, Faults(down=True))
    for _ in range(2):  # polls open the circuit
        with pytest.raises(ProviderUnavailable):
            await confirmer.query(account, polled, urgent=False)

    started = time.monotonic()
    with pytest.raises(Unconfirmed) as caught:
        async with asyncio.timeout(DEADLINE):
            await confirmer.confirm(account, hinted)
    elapsed = time.monotonic() - started

    # Not failed by the breaker: it waited out its whole budget, and was never sent.
    assert budget - 0.05 <= elapsed < budget + 1.0
    assert box.query_count(account.name, hinted) == 0
    assert "circuit open, queries paused for 30s" in str(caught.value)
    assert caught.value.last.order_ids == [hinted]
    await gateways.aclose()
