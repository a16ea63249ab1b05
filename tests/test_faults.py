"""Fault tests with exact ledgers: `order-bridge receiver` and two `order-bridge worker`
processes against a real broker and sandbox providers, a few hundred orders moving
through 2 to 4 states, their callbacks lost, repeated and forged; then worker SIGKILLs,
a 20 s broker cut, failing and slow providers, and crashes at each write step. Each test
ends with `assert ledger.check() == []` (tests/ledger.py says what it checks).

The load is drawn from a seeded PRNG: FAULT_SEED=<n> replays a run's plan (its timing
still varies). Every run prints its seed, figures and violations; process logs are kept
in the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.broker import EmbeddedBroker
from bridge.config import KafkaSettings, PollSettings
from bridge.sandbox import Faults, Sandbox
from bridge.servers import serve
from tests.bridge_fixtures import bridge_config
from tests.conftest import CutOffBroker, RunningSandbox, kafka_settings_for
from tests.helpers import make_accounts
from tests.ledger import STATUS_TABLES, Ledger, status_of
from tests.procs import BridgeProcess, Supervisor, write_config

# Each order moves through one of these (provider codes; ranks never go down). Codes
# missing from the contract's table (lemft 9, lunpay 11, kasushou 7) are `unknown`.
CHAINS: dict[str, list[list[int]]] = {
    "lemft": [[0, 1], [0, 4, 1], [0, 1, 2], [0, 4, 1, 2], [0, 3], [0, 9, 1]],
    "lunpay": [[1, 2, 4], [1, 2, 4, 6], [1, 5], [2, 9, 4], [1, 3, 7], [8, 0, 4, 6], [1, 11, 4]],
    "kasushou": [[1, 2, 3], [-1, 2, 3, 5], [1, 4], [2, 3], [1, 2, 7, 3]],
}
# Fast enough for hundreds of orders in seconds; answers past 3 s time out.
ACCOUNT_CHANGES = {
    "query_rate": 200.0,
    "query_burst": 50,
    "max_concurrent_queries": 8,
    "query_timeout": 3.0,
}
# Short polls: lost callbacks are found within seconds.
POLLING = PollSettings(intervals=(1.0, 2.0, 3.0))
WORKERS = 2
FINAL = frozenset({"succeeded", "failed", "cancelled", "refunded"})


def seeded() -> random.Random:
    seed = int(os.environ.get("FAULT_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"FAULT_SEED={seed}")
    return random.Random(seed)  # a test's plan, not a secret


# -- providers that answer slowly or not at all ---------------------------------------


class Flaky:
    """In front of the sandbox: delays some provider queries by `slow_seconds`, and holds
    some until the client gives up (past its query timeout). The sandbox itself does the
    failing answers (`Faults.error_rate`)."""

    def __init__(self, app: ASGIApp, rng: random.Random) -> None:
        self.app = app
        self.rng = rng
        self.slow_rate = 0.0
        self.slow_seconds = 2.0
        self.hang_rate = 0.0
        self.hang_seconds = 10.0
        self.slowed = 0
        self.hung = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A worker killed mid-query is expected here: not worth a traceback.
        with contextlib.suppress(ClientDisconnect):
            await self._call(scope, receive, send)

    async def _call(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/_sandbox"):
            await self.app(scope, receive, send)
            return
        draw = self.rng.random()
        if draw < self.hang_rate:
            self.hung += 1
            await self._hang(receive, send)
            return
        if draw < self.hang_rate + self.slow_rate:
            self.slowed += 1
            await asyncio.sleep(self.slow_seconds)  # the fault: a slow provider
        await self.app(scope, receive, send)

    async def _hang(self, receive: Receive, send: Send) -> None:
        message: Message = {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
        with contextlib.suppress(TimeoutError):
            # With the body read, the next message is the client's disconnect.
            await asyncio.wait_for(receive(), self.hang_seconds)
            return
        await send({"type": "http.response.start", "status": 504, "headers": []})
        await send({"type": "http.response.body", "body": b"gateway timeout"})


@dataclass
class FlakySandbox:
    running: RunningSandbox
    flaky: Flaky


@pytest.fixture
async def flaky_sandbox() -> AsyncIterator[FlakySandbox]:
    accounts = make_accounts()
    box = Sandbox(list(accounts.values()), seed=random.randrange(1 << 32))
    flaky = Flaky(box.app, random.Random(7))
    async with serve(flaky) as url:
        pointed = {
            provider: dataclasses.replace(account, base_url=f"{url}/{provider}")
            for provider, account in accounts.items()
        }
        yield FlakySandbox(RunningSandbox(box, url, pointed), flaky)


# -- the load ---------------------------------------------------------------------------


@dataclass
class Plan:
    """One order's life: its states, when it moves, and what happens to its callbacks."""

    provider: str
    codes: list[int]
    # Seconds after the load starts that the order is created, and before each move.
    start: float
    gaps: list[float]
    # Made known by POST /orders/watch instead of its first callback.
    watch_first: bool
    # Per state: its callback is never posted (never the first state's, nor one after a
    # final state's).
    lost: list[bool]
    # Per state: copies of its callback, each posted after a random delay (so a copy
    # may come after the next move, claiming an older state).
    copies: list[int]
    # Per state: a forged callback claiming this code (one the order never holds).
    forged: list[int | None]


def make_plans(
    rng: random.Random,
    count: int,
    spread: float,
    *,
    lost: float = 0.25,
    repeated: float = 0.15,
    forged: float = 0.1,
    watched: float = 0.1,
    gap: tuple[float, float] = (0.3, 3.0),
    lagging: frozenset[str] = frozenset(),
) -> list[Plan]:
    """`count` orders created within `spread` seconds. Orders of `lagging` providers
    (answering from a lagging replica) stop at their first final status: a callback for
    a move out of it, confirmed by a replica that still shows the final status, is no
    news to the bridge, and the order is no longer polled. Nor do they take `unknown`
    codes."""
    providers = sorted(CHAINS)
    plans = []
    for i in range(count):
        provider = providers[i % len(providers)]
        chains = CHAINS[provider]
        if provider in lagging:
            # A lagging replica showing an `unknown` code after the final status is
            # published (unknown always is): the order reopens until the next poll.
            chains = [c for c in chains if all(status_of(provider, x) != "unknown" for x in c)]
        codes = rng.choice(chains)
        if provider in lagging:
            final = [n for n, code in enumerate(codes) if status_of(provider, code) in FINAL]
            codes = codes[: final[0] + 1]
        never_held = sorted(set(STATUS_TABLES[provider]) - set(codes))
        plans.append(
            Plan(
                provider=provider,
                codes=codes,
                start=rng.uniform(0, spread),
                gaps=[rng.uniform(*gap) for _ in codes[1:]],
                watch_first=rng.random() < watched,
                # Only polls can find a lost callback, and an order is polled until its
                # status is final: a move out of a final status is always called back.
                lost=[False]
                + [
                    rng.random() < lost and status_of(provider, before) not in FINAL
                    for before in codes[:-1]
                ],
                copies=[rng.randint(1, 2) if rng.random() < repeated else 0 for _ in codes],
                forged=[rng.choice(never_held) if rng.random() < forged else None for _ in codes],
            )
        )
    return plans


@dataclass
class Rig:
    """The bridge's processes, the sandbox behind them and the ledger of the test."""

    sandbox: FlakySandbox
    settings: KafkaSettings
    receiver: BridgeProcess
    workers: Supervisor
    ledger: Ledger
    http: httpx.AsyncClient
    rng: random.Random

    @property
    def box(self) -> Sandbox:
        return self.sandbox.running.sandbox

    def account(self, provider: str) -> str:
        return self.sandbox.running.accounts[provider].name

    def _order(self, key: str) -> tuple[str, str, str]:
        provider, account, order_id = key.split("/", 2)
        return provider, account, order_id

    async def callback(self, key: str, *, claimed: int | None = None, forged: bool = False) -> None:
        provider, account, order_id = self._order(key)
        code = self.box.order(account, order_id).status if claimed is None else claimed
        body, content_type = self.box.callback(account, order_id, status=code)
        url = f"{self.receiver.url}/callbacks/{provider}/{account}"
        await self.ledger.deliver(
            self.http, url, key, body, content_type, claimed=code, forged=forged
        )

    async def watch(self, key: str) -> None:
        provider, account, order_id = self._order(key)
        body = f'{{"provider":"{provider}","account":"{account}","order_id":"{order_id}"}}'
        url = f"{self.receiver.url}/orders/watch"
        await self.ledger.deliver(
            self.http, url, key, body.encode(), "application/json", kind="watch"
        )

    async def run_load(self, plans: list[Plan]) -> None:
        """Plays every plan; returns once every callback was stored (or given up)."""
        started = time.monotonic()
        copies: list[asyncio.Task[None]] = []
        await asyncio.gather(*(self._play(plan, started, copies) for plan in plans))
        await asyncio.gather(*copies)

    async def _play(self, plan: Plan, started: float, copies: list[asyncio.Task[None]]) -> None:
        # The plan's schedule: when the provider creates and moves the order.
        await asyncio.sleep(max(0.0, started + plan.start - time.monotonic()))
        account = self.account(plan.provider)
        order = self.box.create_order(account, status=plan.codes[0], amount=Decimal("37.50"))
        key = self.ledger.track(plan.provider, account, order.order_id)
        for step, code in enumerate(plan.codes):
            if step > 0:
                await asyncio.sleep(plan.gaps[step - 1])
                self.box.set_status(account, order.order_id, code)
            if step == 0 and plan.watch_first:
                await self.watch(key)
            elif plan.lost[step]:
                self.ledger.lost(key)
            else:
                await self.callback(key)
                for _ in range(plan.copies[step]):
                    copies.append(asyncio.create_task(self._copy(key, code)))
            if (claim := plan.forged[step]) is not None:
                await self.callback(key, claimed=claim, forged=True)

    async def _copy(self, key: str, code: int) -> None:
        await asyncio.sleep(self.rng.uniform(0.0, 3.0))  # a provider's repeat, late
        await self.callback(key, claimed=code)

    async def finish(self, settle_timeout: float = 45.0) -> list[str]:
        """Waits for the orders to settle, stops the bridge (SIGTERM), reads the topics
        and prints the figures and violations; returns the process problems found."""
        started = time.monotonic()
        settled = await self.ledger.wait_settled(settle_timeout)
        took = time.monotonic() - started
        codes = await self.workers.stop()
        codes[self.receiver.name] = await self.receiver.terminate()
        await self.ledger.read_all()
        # An incarnation started just before the stop that never got running (2 full-suite
        # runs in 8 saw one write nothing for 30 s: an open problem, see the README) is
        # reported, with its stacks in its log, but is not a violation of the guarantees.
        hung = {p.name: p.hung for p in [*self.workers.processes, self.receiver] if p.hung}
        for name, log in hung.items():
            print(f"warning: {name} hung while starting; its stacks are in {log}")
        problems = [
            f"{name} exited with {code} on SIGTERM"
            for name, code in codes.items()
            if code and name not in hung
        ]
        problems += [f"{exit} on its own" for exit in self.workers.unexpected]
        violations = self.ledger.check()
        print(f"settled: {settled} ({took:.1f}s after the load)")
        print(f"figures: {self.ledger.summary()}")
        print(
            f"workers: {self.workers.count('killed')} killed, "
            f"{len(self.workers.unexpected)} ended on their own "
            f"({self.workers.count('unexpected', 86)} at the crash hook); "
            f"provider queries slowed {self.sandbox.flaky.slowed}, held {self.sandbox.flaky.hung}"
        )
        print(f"process problems ({len(problems)}):", *problems, sep="\n  ")
        print(f"violations ({len(violations)}):", *violations, sep="\n  ")
        # The stories of the first ten orders in trouble.
        for key in list(dict.fromkeys(v.split(":", 1)[0] for v in violations))[:10]:
            print(self.ledger.explain(key))
        return problems


@contextlib.asynccontextmanager
async def running_rig(
    sandbox: FlakySandbox,
    settings: KafkaSettings,
    tmp_path: Path,
    rng: random.Random,
    *,
    worker: Mapping[str, object] | None = None,
    crash_env: Callable[[BridgeProcess], Mapping[str, str]] | None = None,
) -> AsyncIterator[Rig]:
    """A receiver and two workers as processes, for this test's topics and sandbox."""
    accounts = {provider: ACCOUNT_CHANGES for provider in CHAINS}
    config = bridge_config(
        sandbox.running, settings, worker=worker, polling=POLLING, accounts=accounts
    )
    config_file = tmp_path / "bridge.toml"
    env = write_config(config, config_file)
    receiver = BridgeProcess("receiver", "receiver", config_file, env, tmp_path)
    workers = Supervisor("worker", WORKERS, config_file, env, tmp_path, crash_env=crash_env)
    print(f"logs in {tmp_path}")
    try:
        await receiver.start()
        await receiver.wait_running()
        await workers.start()
        async with (
            httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=200)) as http,
            Ledger(sandbox.running.sandbox, settings) as ledger,
        ):
            yield Rig(sandbox, settings, receiver, workers, ledger, http, rng)
    finally:
        # Nothing outlives the test, whatever happened.
        await workers.stop(timeout=10)
        if receiver.alive:
            await receiver.terminate(timeout=10)


async def wait_until(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# Providers answering 15% of queries from a lagging replica (the order's previous status).
LAGGING = frozenset({"lunpay", "kasushou"})


def set_faults(
    sandbox: FlakySandbox, faults: Faults, providers: frozenset[str] = frozenset(CHAINS)
) -> None:
    for provider in providers:
        sandbox.running.sandbox.set_faults(sandbox.running.accounts[provider].name, faults)


# -- the tests --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_ten_worker_kills_under_load(
    flaky_sandbox: FlakySandbox, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """300 orders over 35 s; lunpay and kasushou answer 15% of queries from a lagging
    replica; 10 SIGKILLs, each of a worker that holds partitions, at a random moment
    (0.2 to 2 s after it restored them), each restarted at once."""
    rng = seeded()
    settings = kafka_settings_for(broker.bootstrap_servers, partitions=6)
    set_faults(flaky_sandbox, Faults(stale_rate=0.15), LAGGING)
    plans = make_plans(rng, 300, spread=35.0, lagging=LAGGING)
    async with running_rig(flaky_sandbox, settings, tmp_path, rng) as rig:
        load = asyncio.create_task(rig.run_load(plans))
        kills = 0
        while kills < 10:
            # A worker at work: one that holds partitions (it restored their state)...
            target = rig.workers.processes[rng.randrange(WORKERS)]
            await target.wait_log("restored", timeout=15)
            # ...killed at a random moment.
            await asyncio.sleep(rng.uniform(0.2, 2.0))
            kills += await rig.workers.kill(rig.workers.processes.index(target))
        assert not load.done(), "the kills should all land under load"
        await load
        problems = await rig.finish()
    assert rig.ledger.check() == []
    assert problems == []


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_broker_cut_off_for_20s_under_load(
    flaky_sandbox: FlakySandbox,
    cut_off_broker: CutOffBroker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """200 orders over 30 s; the broker unreachable for 20 s from the moment 40 events
    are out: callbacks answered 503 and posted again, everything published after."""
    # The ledger's own reader logs every failed reconnect while the broker is away.
    caplog.set_level(logging.CRITICAL, logger="aiokafka")
    rng = seeded()
    settings = cut_off_broker.settings
    plans = make_plans(rng, 200, spread=30.0)
    async with running_rig(flaky_sandbox, settings, tmp_path, rng) as rig:
        load = asyncio.create_task(rig.run_load(plans))
        await rig.ledger.wait_published(40, timeout=60)
        cut_off_broker.proxy.cut()
        cut_at = time.monotonic()

        def answered_in_cut(status: int) -> int:
            return sum(
                1
                for o in rig.ledger.orders.values()
                for d in o.deliveries
                for at, s in zip(d.times, d.answers, strict=True)
                # Allow for the receiver's inbox_timeout: answers still in flight.
                if cut_at + 2.5 < at and s == status
            )

        await wait_until(lambda: answered_in_cut(503) > 0, 15, "a 503 during the cut")
        await asyncio.sleep(max(0.0, cut_at + 20.0 - time.monotonic()))  # the cut's length
        stored_in_cut = answered_in_cut(200) + answered_in_cut(202)
        await cut_off_broker.proxy.start()
        print(f"cut for {time.monotonic() - cut_at:.1f}s: {answered_in_cut(503)} answers 503")
        assert not load.done(), "the cut should end under load"
        await load
        problems = await rig.finish(settle_timeout=90)
    assert rig.ledger.check() == []
    assert problems == []
    assert stored_in_cut == 0, "callbacks answered as stored while Kafka was away"


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_providers_failing_slow_and_hanging_under_load(
    flaky_sandbox: FlakySandbox, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """200 orders over 15 s; every provider answers 30% of queries with a failure (HTTP
    500 envelope, 502 page, 200 garbage by turns), 10% after 2 s and 5% never (past the
    3 s query timeout)."""
    rng = seeded()
    settings = kafka_settings_for(broker.bootstrap_servers, partitions=6)
    set_faults(flaky_sandbox, Faults(error_rate=0.3))
    flaky_sandbox.flaky.slow_rate = 0.10
    flaky_sandbox.flaky.hang_rate = 0.05
    plans = make_plans(rng, 200, spread=15.0)
    patient = {"retry_budget": 30.0, "retry_max": 2.0}
    async with running_rig(flaky_sandbox, settings, tmp_path, rng, worker=patient) as rig:
        await rig.run_load(plans)
        problems = await rig.finish(settle_timeout=90)
    assert rig.ledger.check() == []
    assert problems == []


CRASH_STEPS = ["event_sent", "event_acked", "state_sent", "state_acked"]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("step", CRASH_STEPS)
async def test_a_worker_ending_at_each_step_of_its_write_sequence(
    step: str, flaky_sandbox: FlakySandbox, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """30 orders over 6 s; each worker's first three incarnations end (os._exit via
    ORDER_BRIDGE_CRASH_AT) the n-th time they reach `step` (n random, 2 to 8) and are
    started again; lunpay and kasushou answer 15% of queries from a lagging replica."""
    rng = seeded()
    settings = kafka_settings_for(broker.bootstrap_servers, partitions=4)
    set_faults(flaky_sandbox, Faults(stale_rate=0.15), LAGGING)

    def crash_env(process: BridgeProcess) -> dict[str, str]:
        if process.incarnation >= 3:
            return {}
        return {"ORDER_BRIDGE_CRASH_AT": f"{step}:{rng.randint(2, 8)}"}

    plans = make_plans(rng, 30, spread=6.0, lagging=LAGGING)
    async with running_rig(flaky_sandbox, settings, tmp_path, rng, crash_env=crash_env) as rig:
        await rig.run_load(plans)
        problems = await rig.finish()
    crashes = rig.workers.count("unexpected", 86)
    assert rig.ledger.check() == []
    assert crashes > 0, f"no worker ended at {step}: ORDER_BRIDGE_CRASH_AT is not wired"
    assert [p for p in problems if "with 86 " not in p] == []
