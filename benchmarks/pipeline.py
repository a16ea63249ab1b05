"""The bridge end to end on loopback: callbacks in through the receiver, status events out.

    .venv/bin/python benchmarks/pipeline.py [--orders 3000] [--concurrency 32] [--save-baseline]

It starts the embedded broker, the sandbox providers (in this process) and a bridge
(receiver and worker, `Bridge` in an interpreter of its own: this script, `--phase
bridge`), so that the load and the providers do not share the bridge's event loop.
The accounts' query limits are set far above what the run needs: the provider's rate
limits are not what is measured.

N orders are created in the sandbox, a third per provider, all succeeded. After a
warm-up (one order per provider, through the whole pipeline, not counted), their
correctly signed callbacks are posted by C concurrent HTTP clients, each with one
keep-alive connection, while a reader follows the status topic. The run fails (exit 1,
`FAILED: ...`) if a callback is not answered 200, if not all N events arrive within
EVENT_TIMEOUT seconds of the last answer, or if an order gets more than one event
(watched for GRACE seconds more) or one that is not `succeeded`.

The figures are printed beside those of `benchmarks/pipeline_baseline.json`, if saved.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import httpx
from baseline_report import MIB, Figure, load_baseline, report, rss_bytes, save_baseline
from followed_orders import PARTITIONS, settings_for

from bridge.broker import embedded_broker
from bridge.config import Config, HttpSettings, WorkerSettings
from bridge.dev import demo_accounts
from bridge.errors import StartupError
from bridge.sandbox import Sandbox
from bridge.servers import serve
from bridge.service import Bridge, stop_on_signals
from bridge.tail import Event, each_event

SCRIPT = Path(__file__).resolve()
BASELINE = SCRIPT.with_name("pipeline_baseline.json")
# Each provider's code for "succeeded" in the sandbox.
SUCCEEDED = {"lemft": 1, "lunpay": 4, "kasushou": 3}
PROVIDERS = ("kasushou", "lemft", "lunpay")
# Far above what a run needs: the provider's limits are not what is measured.
QUERY_LIMITS: dict[str, Any] = {
    "query_rate": 1_000_000.0,
    "query_burst": 100_000,
    "max_concurrent_queries": 32,
}
SEED = 20261124
# Seconds the events may take after the last callback was answered; then, seconds
# more during which a second event for an order would be seen.
EVENT_TIMEOUT = 60.0
GRACE = 1.0
# Seconds the bridge may take to start, and the warm-up orders to go through.
START_TIMEOUT = 60.0
HTTP_TIMEOUT = 30.0

# Throughput and latencies move with whatever else the machine does; RSS less so.
FIGURES = (
    Figure("accepted_per_s", "receiver: callbacks answered 200 /s", "higher", 0, 20),
    Figure("answer_p50_ms", "callback answer latency p50, ms", "lower", 1, 25),
    Figure("answer_p99_ms", "callback answer latency p99, ms", "lower", 1, 40),
    Figure("e2e_p50_ms", "200 -> event readable, p50 ms", "lower", 1, 30),
    Figure("e2e_p99_ms", "200 -> event readable, p99 ms", "lower", 1, 40),
    Figure("events_per_s", "events/s overall (first post -> last event)", "higher", 0, 20),
    Figure("queries_per_order", "provider queries / order", "", 2, 0),
    Figure("bridge_peak_rss_mib", "bridge process, peak RSS MiB", "lower", 1, 10),
    Figure("bridge_cpu_pct", "bridge process CPU, % of one core", "", 0, 0),
    Figure("driver_cpu_pct", "clients + sandbox + reader CPU, % of one core", "", 0, 0),
    Figure("broker_cpu_pct", "broker CPU, % of one core", "", 0, 0),
)


# -- the bridge, in an interpreter of its own -----------------------------------------------


def bridge_config(bootstrap: str, sandbox_url: str, suffix: str) -> Config:
    return Config(
        kafka=settings_for(bootstrap, suffix),
        http=HttpSettings(host="127.0.0.1", port=0),
        worker=WorkerSettings(group_id=f"bench-{suffix}"),
        accounts=tuple(
            dataclasses.replace(
                account, base_url=f"{sandbox_url}/{account.provider}", **QUERY_LIMITS
            )
            for account in demo_accounts()
        ),
    )


async def phase_bridge(bootstrap: str, sandbox_url: str, suffix: str) -> None:
    """Runs the bridge until SIGTERM; prints its URL once it is up."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    stop = stop_on_signals()
    async with Bridge(bridge_config(bootstrap, sandbox_url, suffix)) as bridge:
        print(json.dumps({"url": bridge.url}), flush=True)
        await stop.wait()


@dataclass
class BridgeProcess:
    process: asyncio.subprocess.Process
    url: str
    log: IO[bytes]

    def log_lines(self) -> list[str]:
        self.log.seek(0)
        return self.log.read().decode(errors="replace").splitlines()


@contextlib.asynccontextmanager
async def bridge_process(
    bootstrap: str, sandbox_url: str, suffix: str
) -> AsyncIterator[BridgeProcess]:
    # Its log goes to a file: a pipe nobody reads would stall it once full.
    with tempfile.TemporaryFile() as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            "--phase",
            "bridge",
            "--bootstrap",
            bootstrap,
            "--sandbox",
            sandbox_url,
            "--suffix",
            suffix,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
        try:
            assert process.stdout is not None
            try:
                line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT)
            except TimeoutError:
                line = b""
            if not line:
                log.seek(0)
                last = log.read().decode(errors="replace").strip().splitlines()[-1:]
                raise SystemExit(f"FAILED: the bridge did not start: {last}")
            yield BridgeProcess(process, json.loads(line)["url"], log)
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except TimeoutError:
                    process.kill()
                    await process.wait()


# -- the orders, the callbacks and the events ------------------------------------------------


@dataclass(frozen=True)
class Callback:
    key: str
    path: str
    body: bytes
    content_type: str


def make_orders(sandbox: Sandbox, accounts: Mapping[str, str], count: int) -> list[Callback]:
    """`count` succeeded orders, providers in turn, and the callback each provider posts."""
    callbacks = []
    for i in range(count):
        provider = PROVIDERS[i % len(PROVIDERS)]
        account = accounts[provider]
        amount = Decimal(10 + i % 490) + Decimal("0.25")
        order = sandbox.create_order(account, status=SUCCEEDED[provider], amount=amount)
        body, content_type = sandbox.callback(account, order.order_id)
        callbacks.append(
            Callback(
                f"{provider}/{account}/{order.order_id}",
                f"/callbacks/{provider}/{account}",
                body,
                content_type,
            )
        )
    return callbacks


@dataclass
class Answer:
    sent: float
    answered: float
    status: int


async def post_all(url: str, callbacks: Sequence[Callback], concurrency: int) -> list[Answer]:
    """Posts every callback once, `concurrency` at a time; each answer, in order."""
    answers: list[Answer | None] = [None] * len(callbacks)
    turns = iter(range(len(callbacks)))

    async def client() -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT, limits=limits) as http:
            for i in turns:  # shared: each callback goes to whichever client is free
                callback = callbacks[i]
                sent = time.monotonic()
                try:
                    answer = await http.post(
                        callback.path,
                        content=callback.body,
                        headers={"content-type": callback.content_type},
                    )
                    status = answer.status_code
                except httpx.HTTPError:
                    status = 0
                answers[i] = Answer(sent, time.monotonic(), status)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return [a for a in answers if a is not None]


class Arrivals:
    """Every status event read, with when this process read it."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}
        self.statuses: dict[str, set[str]] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def following(cls, config: Config) -> AsyncIterator[Arrivals]:
        arrivals = cls()
        async with each_event(config.kafka, arrivals._seen):
            yield arrivals

    async def _seen(self, event: Event) -> None:
        self.seen.setdefault(event.key, []).append(time.monotonic())
        self.statuses.setdefault(event.key, set()).add(str(event.value.get("status")))

    async def wait(self, keys: Sequence[str], timeout: float) -> bool:
        """Whether every key had an event within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        missing = [k for k in keys if k not in self.seen]
        while missing:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
            missing = [k for k in missing if k not in self.seen]
        return True


# -- CPU of this process and its children ---------------------------------------------------


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU seconds of a process so far (0 without /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # After the command: state is field 3, utime and stime fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children() -> list[int]:
    """This process's children (the broker and the bridge), where /proc tells."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children", encoding="ascii") as listed:
                found += [int(pid) for pid in listed.read().split()]
    return found


def cpu_times(bridge_pid: int) -> dict[str, float]:
    others = [pid for pid in children() if pid != bridge_pid]
    return {
        "bridge": cpu_seconds(bridge_pid),
        "driver": cpu_seconds("self"),
        "broker": sum(cpu_seconds(pid) for pid in others),
    }


# -- measuring ---------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest rank: the smallest value with `fraction` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


async def metrics_summary(url: str) -> str:
    """The bridge's counters that tell trouble: queries by outcome, dead letters, inbox."""
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"{url}/metrics")).text
    totals: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if line.startswith(("#", "order_bridge_hints_in_flight", "order_bridge_orders")):
            continue
        sample, _, value = line.rpartition(" ")
        name, _, labels = sample.partition("{")
        if name in ("order_bridge_queries_total", "order_bridge_inbox_writes_total"):
            outcome = [p for p in labels.rstrip("}").split(",") if p.startswith("outcome=")]
            name = f"{name}{{{','.join(outcome)}}}"
        elif name != "order_bridge_deadletters_total":
            continue
        totals[name] += float(value)
    return ", ".join(f"{k} {v:g}" for k, v in sorted(totals.items())) or "none"


async def measure(orders: int, concurrency: int) -> dict[str, float]:
    suffix = uuid.uuid4().hex[:8]
    accounts = {a.provider: a.name for a in demo_accounts()}
    sandbox = Sandbox(demo_accounts(), seed=SEED)
    warm_up = make_orders(sandbox, accounts, len(PROVIDERS))
    print(f"creating {orders:,} orders and their callbacks ...", flush=True)
    callbacks = make_orders(sandbox, accounts, orders)
    async with contextlib.AsyncExitStack() as stack:
        print("starting the embedded broker and the sandbox ...", flush=True)
        broker = await stack.enter_async_context(embedded_broker())
        sandbox_url = await stack.enter_async_context(serve(sandbox.app))
        print("starting the bridge (joining the consumer group takes a few seconds) ...")
        bridge = await stack.enter_async_context(
            bridge_process(broker.bootstrap_servers, sandbox_url, suffix)
        )
        config = bridge_config(broker.bootstrap_servers, sandbox_url, suffix)
        arrivals = await stack.enter_async_context(Arrivals.following(config))

        answers = await post_all(bridge.url, warm_up, 1)
        if any(a.status != 200 for a in answers):
            raise SystemExit(f"FAILED: warm-up callbacks answered {[a.status for a in answers]}")
        if not await arrivals.wait([c.key for c in warm_up], START_TIMEOUT):
            raise SystemExit(f"FAILED: no warm-up events after {START_TIMEOUT:g}s")
        queries_before = len(sandbox.queries)

        print(f"posting {orders:,} callbacks, {concurrency} at a time ...", flush=True)
        cpu_before = cpu_times(bridge.process.pid)
        answers = await post_all(bridge.url, callbacks, concurrency)
        refused = Counter(a.status for a in answers if a.status != 200)
        if refused:
            shown = ", ".join(f"{n} x {status or 'no answer'}" for status, n in refused.items())
            raise SystemExit(f"FAILED: callbacks not answered 200: {shown}")
        keys = [c.key for c in callbacks]
        if not await arrivals.wait(keys, EVENT_TIMEOUT):
            missing = sum(1 for k in keys if k not in arrivals.seen)
            raise SystemExit(
                f"FAILED: {missing:,} of {orders:,} events missing {EVENT_TIMEOUT:g}s after "
                f"the last answer; bridge metrics: {await metrics_summary(bridge.url)}"
            )
        last_event = max(arrivals.seen[k][0] for k in keys)
        cpu_after = cpu_times(bridge.process.pid)
        await asyncio.sleep(GRACE)
        repeated = {k: len(arrivals.seen[k]) for k in keys if len(arrivals.seen[k]) > 1}
        if repeated:
            key, count = next(iter(repeated.items()))
            raise SystemExit(
                f"FAILED: {len(repeated):,} orders got more than one event (e.g. {key}: {count})"
            )
        wrong = {k: s for k in keys if (s := arrivals.statuses[k]) != {"succeeded"}}
        if wrong:
            raise SystemExit(f"FAILED: {len(wrong):,} orders' events not succeeded: {wrong}")
        queries = len(sandbox.queries) - queries_before
        _, bridge_peak = rss_bytes(bridge.process.pid)
        print(f"bridge metrics: {await metrics_summary(bridge.url)}")
        warnings = [line for line in bridge.log_lines() if line.strip()]
        if warnings:
            print(f"bridge log: {len(warnings)} lines, the last: {warnings[-1]}")

    first_sent = min(a.sent for a in answers)
    window = last_event - first_sent
    latencies = [a.answered - a.sent for a in answers]
    e2e = [arrivals.seen[c.key][0] - a.answered for c, a in zip(callbacks, answers, strict=True)]
    figures = {
        "accepted_per_s": orders / (max(a.answered for a in answers) - first_sent),
        "answer_p50_ms": percentile(latencies, 0.50) * 1000,
        "answer_p99_ms": percentile(latencies, 0.99) * 1000,
        "e2e_p50_ms": percentile(e2e, 0.50) * 1000,
        "e2e_p99_ms": percentile(e2e, 0.99) * 1000,
        "events_per_s": orders / window,
        "queries_per_order": queries / orders,
        "bridge_peak_rss_mib": bridge_peak / MIB,
    }
    for part in ("bridge", "driver", "broker"):
        figures[f"{part}_cpu_pct"] = (cpu_after[part] - cpu_before[part]) / window * 100
    return figures


# -- the report --------------------------------------------------------------------------


def params(orders: int, concurrency: int) -> dict[str, int]:
    return {"orders": orders, "concurrency": concurrency}


def describe(params: Mapping[str, Any]) -> str:
    return f"{params['orders']:,} orders, {params['concurrency']} clients"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=3000, help="orders, callbacks (3000)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="concurrent HTTP clients posting (32)"
    )
    parser.add_argument(
        "--save-baseline", action="store_true", help=f"save this run's figures as {BASELINE.name}"
    )
    # The bridge runs in an interpreter of its own: these are for the script itself.
    parser.add_argument("--phase", choices=["bridge"], help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--sandbox", help=argparse.SUPPRESS)
    parser.add_argument("--suffix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.orders < 1 or args.concurrency < 1:
        parser.error("--orders and --concurrency must be at least 1")

    if args.phase == "bridge":
        try:
            asyncio.run(phase_bridge(args.bootstrap, args.sandbox, args.suffix))
        except StartupError as exc:
            raise SystemExit(f"bridge: {exc}") from None
        return

    try:
        figures = asyncio.run(measure(args.orders, args.concurrency))
    except StartupError as exc:
        raise SystemExit(f"FAILED: {exc}") from None
    run = params(args.orders, args.concurrency)
    report(
        FIGURES,
        figures,
        load_baseline(BASELINE),
        title=f"{describe(run)}, {PARTITIONS} partitions, bridge in its own process",
        path=BASELINE,
        params=run,
        describe=describe,
        mismatch="another --orders or --concurrency: nothing is compared",
    )
    if args.save_baseline:
        save_baseline(BASELINE, run, FIGURES, figures)


if __name__ == "__main__":
    main()
