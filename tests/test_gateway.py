"""The account gateway: batching, limits and priorities, with a fake `send` as the provider."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence

import httpx
import pytest

from bridge.errors import InvalidAnswer, OrderNotFound, ProviderRejected, ProviderUnavailable
from bridge.metrics import Metrics
from bridge.orders import OrderSnapshot, ProviderStatus, Status
from bridge.sandbox import Faults
from bridge.worker.gateway import AccountGateway, Gateways
from tests.conftest import RunningSandbox


def snapshot(order_id: str) -> OrderSnapshot:
    return OrderSnapshot(
        provider="kasushou",
        account="ksu-test",
        order_id=order_id,
        external_order_id="",
        status=Status.PROCESSING,
        provider_status=ProviderStatus(2, "processing"),
        amount=None,
        currency="USD",
    )


class FakeProvider:
    """A `send` that records its calls and answers every id it is asked, but `missing`."""

    def __init__(self, *, delay: float = 0.0, missing: Sequence[str] = ()) -> None:
        self.delay = delay
        self.missing = set(missing)
        # Raised by the next calls, one each.
        self.errors: list[Exception] = []
        # While cleared, every call waits: the provider is "slow".
        self.gate = asyncio.Event()
        self.gate.set()
        self.calls: list[list[str]] = []
        self.called = asyncio.Event()
        self.times: list[float] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def __call__(self, order_ids: Sequence[str]) -> list[OrderSnapshot]:
        self.calls.append(list(order_ids))
        self.called.set()
        self.times.append(time.monotonic())
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            await asyncio.sleep(self.delay)
            if self.errors:
                raise self.errors.pop(0)
        finally:
            self.in_flight -= 1
        return [snapshot(i) for i in order_ids if i not in self.missing]

    async def wait_for_calls(self, count: int) -> None:
        while len(self.calls) < count:
            self.called.clear()
            await self.called.wait()


MakeGateway = Callable[..., AccountGateway]


@pytest.fixture
async def make_gateway() -> AsyncIterator[MakeGateway]:
    """Builds gateways (fast and roomy unless told otherwise) and closes them after the test."""
    made: list[AccountGateway] = []

    def make(send: FakeProvider, **limits: float) -> AccountGateway:
        settings = {"rate": 1000.0, "burst": 10, "max_batch": 20, "max_concurrent": 4, **limits}
        gateway = AccountGateway(
            send,
            rate=float(settings["rate"]),
            burst=int(settings["burst"]),
            max_batch=int(settings["max_batch"]),
            max_concurrent=int(settings["max_concurrent"]),
            provider="kasushou",
            account="ksu-test",
        )
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        await gateway.aclose()


async def test_concurrent_polls_go_out_in_full_batches(make_gateway: MakeGateway) -> None:
    fake = FakeProvider()
    gateway = make_gateway(fake, max_batch=20)
    ids = [f"D{i:03}" for i in range(45)]
    answers = await asyncio.gather(*(gateway.query(i, urgent=False) for i in ids))
    assert [a.order_id for a in answers] == ids
    assert [len(call) for call in fake.calls] == [20, 20, 5]
    assert sorted(i for call in fake.calls for i in call) == ids


async def test_waiters_for_one_order_share_one_id(make_gateway: MakeGateway) -> None:
    fake = FakeProvider()
    gateway = make_gateway(fake, max_batch=2)
    answers = await asyncio.gather(
        gateway.query("A", urgent=False),
        gateway.query("A", urgent=True),
        gateway.query("B", urgent=False),
        gateway.query("A", urgent=False),
    )
    assert [a.order_id for a in answers] == ["A", "A", "B", "A"]
    assert fake.calls == [["A", "B"]]


async def test_an_order_left_out_of_the_answer_is_not_found(make_gateway: MakeGateway) -> None:
    fake = FakeProvider(missing=["B"])
    gateway = make_gateway(fake)
    a, b, c = await asyncio.gather(
        *(gateway.query(i, urgent=False) for i in "ABC"), return_exceptions=True
    )
    assert isinstance(a, OrderSnapshot)
    assert isinstance(c, OrderSnapshot)
    assert isinstance(b, OrderNotFound)
    assert (b.provider, b.account, b.order_ids) == ("kasushou", "ksu-test", ["B"])
    assert fake.calls == [["A", "B", "C"]]


@pytest.mark.parametrize(
    "error",
    [
        ProviderUnavailable("kasushou", "ksu-test", ["A", "B", "C"], "HTTP 503"),
        # A bug in `send` reaches the waiters too, and the dispatcher survives it.
        RuntimeError("bug"),
    ],
)
async def test_a_failed_query_fails_its_whole_batch_only(
    make_gateway: MakeGateway, error: Exception
) -> None:
    fake = FakeProvider()
    fake.errors.append(error)
    gateway = make_gateway(fake)
    results = await asyncio.gather(
        *(gateway.query(i, urgent=False) for i in "ABC"), return_exceptions=True
    )
    assert all(result is error for result in results)
    assert (await gateway.query("D", urgent=True)).order_id == "D"
    assert fake.calls == [["A", "B", "C"], ["D"]]


async def test_queries_keep_to_the_token_bucket(make_gateway: MakeGateway) -> None:
    rate, burst = 20.0, 2
    start = time.monotonic()
    fake = FakeProvider()
    gateway = make_gateway(fake, rate=rate, burst=burst, max_batch=1)
    await asyncio.gather(*(gateway.query(f"D{i}", urgent=True) for i in range(10)))
    elapsed = time.monotonic() - start
    times = fake.times
    assert len(times) == 10
    # In any window, at most `burst` queries plus what the rate refills in it.
    for i in range(len(times)):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + rate * (times[j] - times[i]) + 0.1
    assert (10 - burst) / rate - 0.01 <= elapsed < (10 - burst) / rate + 0.25


async def test_a_share_of_the_rate_is_kept_to(make_gateway: MakeGateway) -> None:
    rate, burst = 40.0, 2
    fake = FakeProvider()
    gateway = make_gateway(fake, rate=rate, burst=burst, max_batch=1)
    gateway.share(0.5)
    assert gateway.rate == 20.0
    start = time.monotonic()
    await asyncio.gather(*(gateway.query(f"D{i}", urgent=True) for i in range(10)))
    elapsed = time.monotonic() - start
    # Half the burst (one saved), then half the rate.
    assert 9 / 20.0 - 0.01 <= elapsed < 9 / 20.0 + 0.25


async def test_gateways_share_every_accounts_rate_by_the_partitions_owned(
    sandbox: RunningSandbox,
) -> None:
    lemft = dataclasses.replace(sandbox.accounts["lemft"], query_rate=12.0)
    lunpay = dataclasses.replace(sandbox.accounts["lunpay"], query_rate=24.0)
    async with httpx.AsyncClient() as http:
        gateways = Gateways(http, Metrics())
        assert gateways.for_account(lemft).rate == 12.0
        gateways.share(3, 12)
        assert gateways.for_account(lemft).rate == 3.0
        # A gateway built later gets the share too.
        assert gateways.for_account(lunpay).rate == 6.0
        # Owning nothing, a worker asks nothing: the share stays.
        gateways.share(0, 12)
        assert gateways.for_account(lunpay).rate == 6.0
        gateways.share(12, 12)
        assert gateways.for_account(lemft).rate == 12.0
        await gateways.aclose()


async def test_urgent_requests_go_before_polls_queued_earlier(make_gateway: MakeGateway) -> None:
    fake = FakeProvider()
    gateway = make_gateway(fake, max_concurrent=1, max_batch=1)
    fake.gate.clear()
    blocked = asyncio.create_task(gateway.query("BLOCKER", urgent=False))
    await fake.wait_for_calls(1)
    polls = [asyncio.create_task(gateway.query(f"P{i}", urgent=False)) for i in range(5)]
    await asyncio.sleep(0.01)
    urgent = asyncio.create_task(gateway.query("U", urgent=True))
    await asyncio.sleep(0.01)
    fake.gate.set()
    await asyncio.gather(blocked, urgent, *polls)
    assert fake.calls == [["BLOCKER"], ["U"], ["P0"], ["P1"], ["P2"], ["P3"], ["P4"]]


async def test_a_hurried_poll_goes_with_the_urgent_requests(make_gateway: MakeGateway) -> None:
    fake = FakeProvider()
    gateway = make_gateway(fake, max_concurrent=1, max_batch=1)
    fake.gate.clear()
    blocked = asyncio.create_task(gateway.query("BLOCKER", urgent=False))
    await fake.wait_for_calls(1)
    poll = asyncio.create_task(gateway.query("P", urgent=False))
    early = [asyncio.create_task(gateway.query(f"U{i}", urgent=True)) for i in range(2)]
    await asyncio.sleep(0.01)
    gateway.hurry("P")  # a hint for P waits behind this poll
    late = [asyncio.create_task(gateway.query(f"V{i}", urgent=True)) for i in range(2)]
    await asyncio.sleep(0.01)
    fake.gate.set()
    await asyncio.gather(blocked, poll, *early, *late)
    assert fake.calls == [["BLOCKER"], ["U0"], ["U1"], ["P"], ["V0"], ["V1"]]


async def test_a_cancelled_waiter_is_not_asked_for(make_gateway: MakeGateway) -> None:
    fake = FakeProvider()
    gateway = make_gateway(fake, max_concurrent=1)
    fake.gate.clear()
    blocked = asyncio.create_task(gateway.query("BLOCKER", urgent=False))
    await fake.wait_for_calls(1)
    a, b, c = (asyncio.create_task(gateway.query(i, urgent=False)) for i in "ABC")
    await asyncio.sleep(0.01)
    b.cancel()
    fake.gate.set()
    assert [s.order_id for s in await asyncio.gather(blocked, a, c)] == ["BLOCKER", "A", "C"]
    assert b.cancelled()
    assert fake.calls == [["BLOCKER"], ["A", "C"]]


async def test_a_batch_whose_waiters_all_left_is_not_sent(make_gateway: MakeGateway) -> None:
    fake = FakeProvider()
    gateway = make_gateway(fake, max_concurrent=1, burst=1, rate=50)
    fake.gate.clear()
    blocked = asyncio.create_task(gateway.query("BLOCKER", urgent=False))
    await fake.wait_for_calls(1)
    gone = asyncio.create_task(gateway.query("GONE", urgent=True))
    await asyncio.sleep(0.03)
    gone.cancel()
    fake.gate.set()
    await blocked
    assert (await gateway.query("NEXT", urgent=True)).order_id == "NEXT"
    assert fake.calls == [["BLOCKER"], ["NEXT"]]


async def test_no_more_than_max_concurrent_queries_at_once(make_gateway: MakeGateway) -> None:
    fake = FakeProvider(delay=0.02)
    gateway = make_gateway(fake, max_concurrent=2, max_batch=1)
    await asyncio.gather(*(gateway.query(f"D{i}", urgent=i % 2 == 0) for i in range(8)))
    assert fake.most_in_flight == 2
    assert len(fake.calls) == 8


async def test_aclose_cancels_waiters_and_leaves_no_task(make_gateway: MakeGateway) -> None:
    fake = FakeProvider()
    gateway = make_gateway(fake, max_concurrent=1)
    fake.gate.clear()
    in_flight = asyncio.create_task(gateway.query("A", urgent=False))
    await fake.wait_for_calls(1)
    queued = asyncio.create_task(gateway.query("B", urgent=True))
    await asyncio.sleep(0.01)
    await gateway.aclose()
    for waiter in (in_flight, queued):
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert asyncio.all_tasks() == {asyncio.current_task()}
    with pytest.raises(RuntimeError, match="closed"):
        await gateway.query("C", urgent=True)
    await gateway.aclose()


async def test_gateways_batch_real_queries_and_count_them(sandbox: RunningSandbox) -> None:
    kasushou = sandbox.accounts["kasushou"]
    # More than the provider allows, and a rate that makes the queries pile up.
    kasushou = dataclasses.replace(kasushou, max_batch=50, query_rate=20.0, query_burst=1)
    ids = [sandbox.sandbox.create_order(kasushou.name).order_id for _ in range(25)]
    metrics = Metrics()
    async with httpx.AsyncClient() as http:
        gateways = Gateways(http, metrics)
        gateway = gateways.for_account(kasushou)
        assert gateways.for_account(kasushou) is gateway
        answers = await asyncio.gather(*(gateway.query(i, urgent=False) for i in ids))
        with pytest.raises(OrderNotFound):
            await gateway.query("D-UNKNOWN", urgent=True)
        await gateways.aclose()
    assert [a.order_id for a in answers] == ids
    # 20 is kasushou's most: the 25 orders take two queries, the unknown one a third.
    assert [len(q.order_ids) for q in sandbox.sandbox.queries] == [20, 5, 1]
    labels = {"provider": "kasushou", "account": kasushou.name}
    assert metrics.value("order_bridge_queries_total", outcome="ok", **labels) == 3


async def test_a_refused_batch_is_split_until_the_order_at_fault_is_alone(
    sandbox: RunningSandbox,
) -> None:
    box = sandbox.sandbox
    kasushou = dataclasses.replace(sandbox.accounts["kasushou"], query_rate=1000.0)
    ids = [box.create_order(kasushou.name).order_id for _ in range(20)]
    metrics = Metrics()
    async with httpx.AsyncClient() as http:
        gateways = Gateways(http, metrics)
        gateway = gateways.for_account(kasushou)

        # A transient error is nobody's fault: the whole batch gets it, unsplit.
        box.set_faults(kasushou.name, Faults(error_rate=1.0))
        failed = await asyncio.gather(
            *(gateway.query(i, urgent=False) for i in ids[:4]), return_exceptions=True
        )
        assert all(isinstance(f, ProviderUnavailable) for f in failed)
        assert [len(q.order_ids) for q in box.queries] == [4]

        # A refusal may be one order's: halves are asked until it is alone.
        box.set_faults(kasushou.name, Faults(refuse_ids=(ids[13],)))
        answers = await asyncio.gather(
            *(gateway.query(i, urgent=False) for i in ids), return_exceptions=True
        )
        await gateways.aclose()

    refused = answers.pop(13)
    assert isinstance(refused, ProviderRejected)
    assert refused.order_ids == [ids[13]]
    assert "code 400" in str(refused)
    assert [a.order_id for a in answers if isinstance(a, OrderSnapshot)] == ids[:13] + ids[14:]
    split = box.queries[1:]
    assert [len(q.order_ids) for q in split] == [20, 10, 10, 5, 2, 3, 1, 2, 1, 1, 5]
    assert [q.outcome == "refused" for q in split] == [ids[13] in q.order_ids for q in split]
    labels = {"provider": "kasushou", "account": kasushou.name}
    assert metrics.value("order_bridge_queries_total", outcome="rejected", **labels) == 6
    assert metrics.value("order_bridge_queries_total", outcome="ok", **labels) == 5


async def test_each_order_refused_alone_gets_the_refusal(make_gateway: MakeGateway) -> None:
    fake = FakeProvider()
    gateway = make_gateway(fake)
    refusal = ProviderRejected("kasushou", "ksu-test", list("ABCD"), "code 400: bad id")
    # The whole batch, its halves, and both orders of the second half alone.
    fake.errors += [refusal, InvalidAnswer("kasushou", "ksu-test", ["A", "B"], "garbage")]
    fake.errors += [refusal, refusal, refusal]
    a, b, c, d = await asyncio.gather(
        *(gateway.query(i, urgent=False) for i in "ABCD"), return_exceptions=True
    )
    assert isinstance(a, InvalidAnswer)
    assert a is b  # a transient error on a half is not split further
    assert c is refusal
    assert d is refusal
    assert fake.calls == [["A", "B", "C", "D"], ["A", "B"], ["C", "D"], ["C"], ["D"]]
