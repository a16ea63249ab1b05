"""The bridge end to end on loopback: callbacks in through the receiver, status events out.

    .venv/bin/python benchmarks/pipeline.py [--orders 3000] [--concurrency 32]
        [--provider-latency MS] [--mode serve|split] [--workers N [--against-one-worker]]
        [--save-baseline]

It starts the embedded broker, the sandbox providers (in this process) and the bridge
as real processes from this tree: `order-bridge serve` (`--mode serve`, receiver and
worker in one process) or `order-bridge receiver` plus `order-bridge worker` (`--mode
split`), so that the load and the providers do not share the bridge's event loop. The
accounts' query limits are set far above what the run needs: the provider's rate limits
are not what is measured. `--provider-latency` makes the sandbox answer each query that
many milliseconds late (`Faults(latency=...)`).

N orders are created in the sandbox, a third per provider, all succeeded. After a
warm-up (one order per provider, through the whole pipeline, not counted), their
correctly signed callbacks are posted by C concurrent HTTP clients, each with one
keep-alive connection, while a reader follows the status topic.

Ledger: sent = accepted (200) + refused (anything else, or no answer); accepted = events
+ dead letters (the worker's records, with a reason, in the dead-letter topic). The run
is VOID (exit 1) when it does not balance: an accepted order with neither an event nor
a dead letter EVENT_TIMEOUT seconds after the last answer. It FAILS (exit 1) if an
order gets more than one event (watched for GRACE seconds more) or one that is not
`succeeded`.

After the figures, where a callback's time went (info): the percentiles of each stage,
from the poster's clock, the sandbox's log of queries, each event record's timestamp and
the reader's clock (`stage_figures`).

In split mode, each worker's share of the measured orders follows (events published and
queries sent, by provider, from its /metrics), with the speedup over one worker that this
split allows when the provider's latency binds (see `ideal_speedup`), and the time the
busiest worker's busiest account needs at the provider's latency. `--against-one-worker`
first runs the same with one worker, then prints the measured speedup beside the ideal.

The figures are printed beside those of `benchmarks/pipeline_baseline.json`, if saved
(compared only for the same orders, clients, latency and mode). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from baseline_report import MIB, Figure, load_baseline, report, rss_bytes, save_baseline
from bench_procs import (
    RoleProcess,
    cpu_seconds,
    percentile,
    role_process,
    topic_records,
    wait_ready,
)
from followed_orders import PARTITIONS, settings_for

from bridge.broker import embedded_broker, free_port
from bridge.config import Config, HttpSettings, WorkerSettings
from bridge.dev import demo_accounts
from bridge.errors import StartupError
from bridge.sandbox import Faults, Sandbox
from bridge.servers import serve
from bridge.tail import follow_topic

SCRIPT = Path(__file__).resolve()
BASELINE = SCRIPT.with_name("pipeline_baseline.json")
POSTER = SCRIPT.with_name("poster.py")
# Each provider's code for "succeeded" in the sandbox.
SUCCEEDED = {"lemft": 1, "lunpay": 4, "kasushou": 3}
PROVIDERS = ("kasushou", "lemft", "lunpay")
# Far above what a run needs: the provider's limits are not what is measured. 64
# queries in flight an account: lemft and lunpay answer one order a query, so with a
# provider answering in 200 ms each account confirms at most 320 orders a second.
QUERY_LIMITS: dict[str, Any] = {
    "query_rate": 1_000_000.0,
    "query_burst": 100_000,
    "max_concurrent_queries": 64,
}
# The flood guard's budget of unsigned callbacks, sized like the limits above: at its
# default (600 a minute an account) a run's lemft and lunpay callbacks past the 600th
# of a minute wait for their order's first poll, 10 s later, which made every run's p99.
UNVERIFIED_HINTS_PER_MINUTE = 10_000_000
SEED = 20261124
# Seconds the events may take after the last callback was answered; then, seconds
# more during which a second event for an order would be seen.
EVENT_TIMEOUT = 60.0
GRACE = 1.0
# Seconds the bridge may take to start, and the warm-up orders to go through.
START_TIMEOUT = 60.0
HTTP_TIMEOUT = 30.0

# The reader's fetch wait, ms: see Arrivals.following.
READER_MAX_WAIT_MS = 5
# Throughput and latencies move with whatever else the machine does; RSS less so.
FIGURES = (
    Figure("accepted_per_s", "receiver: callbacks answered 200 /s", "higher", 0, 20),
    Figure("answer_p50_ms", "callback answer latency p50, ms", "lower", 1, 25),
    Figure("answer_p99_ms", "callback answer latency p99, ms", "lower", 1, 40),
    Figure("e2e_p50_ms", "200 -> event readable, p50 ms", "lower", 1, 30),
    Figure("e2e_p99_ms", "200 -> event readable, p99 ms", "lower", 1, 40),
    Figure("c2e_p50_ms", "callback sent -> event readable, p50 ms", "lower", 1, 30),
    Figure("c2e_p99_ms", "callback sent -> event readable, p99 ms", "lower", 1, 40),
    Figure("c2e_p999_ms", "callback sent -> event readable, p99.9 ms", "lower", 1, 50),
    Figure("events_per_s", "events/s overall (first post -> last event)", "higher", 0, 20),
    Figure("queries_per_order", "provider queries / order", "", 2, 0),
    Figure("bridge_peak_rss_mib", "bridge process(es), peak RSS MiB", "lower", 1, 10),
    Figure("bridge_cpu_pct", "bridge process(es) CPU, % of one core", "", 0, 0),
    Figure("driver_cpu_pct", "poster + sandbox + reader CPU, % of one core", "", 0, 0),
    Figure("broker_cpu_pct", "broker CPU, % of one core", "", 0, 0),
    Figure("bridge_cpu_ms", "bridge process(es) CPU ms / order", "", 2, 0),
    Figure("driver_cpu_ms", "poster + sandbox + reader CPU ms / order", "", 2, 0),
    Figure("broker_cpu_ms", "broker CPU ms / order", "", 2, 0),
)
ROLE_FIGURES = (
    Figure("receiver_cpu_ms", "receiver CPU ms / order (serve: its main process)", "", 2, 0),
    Figure("worker_cpu_ms", "worker(s) CPU ms / order (serve: its child)", "", 2, 0),
)
MODES = {"serve": ("serve",), "split": ("receiver", "worker"), "receiver": ("receiver",)}


# -- the bridge, as processes of its own -----------------------------------------------------


def bridge_config(
    bootstrap: str,
    sandbox_url: str,
    suffix: str,
    port: int = 0,
    worker_port: int = 0,
    limits: Mapping[str, Any] = QUERY_LIMITS,
) -> Config:
    return Config(
        kafka=settings_for(bootstrap, suffix),
        http=HttpSettings(host="127.0.0.1", port=port),
        worker=WorkerSettings(
            group_id=f"bench-{suffix}",
            http_port=worker_port,
            unverified_hints_per_minute=UNVERIFIED_HINTS_PER_MINUTE,
        ),
        accounts=tuple(
            dataclasses.replace(account, base_url=f"{sandbox_url}/{account.provider}", **limits)
            for account in demo_accounts()
        ),
    )


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


async def post_all(
    url: str, callbacks: Sequence[Callback], concurrency: int, rate: float = 0.0
) -> list[Answer]:
    """Posts every callback once, `concurrency` at a time (`rate` a second, if given),
    from a process of its own (poster.py); each answer, in order."""
    host, _, port = url.removeprefix("http://").partition(":")
    requests = [(c.path, c.content_type, c.body.decode("latin-1")) for c in callbacks]
    options = ["--concurrency", str(concurrency), "--rate", str(rate)]
    poster = await asyncio.create_subprocess_exec(
        *(sys.executable, str(POSTER), host, port, *options),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await poster.communicate(json.dumps(requests).encode())
    if poster.returncode != 0:
        raise SystemExit("FAILED: the poster failed")
    return [Answer(*answer) for answer in json.loads(out)]


class Arrivals:
    """Every status event read: when this process read it, and when the worker wrote it."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}
        # Each key's first event: its record's timestamp (the worker's wall clock when
        # its producer took the record, in ms), on time.monotonic()'s clock.
        self.written: dict[str, float] = {}
        self.statuses: dict[str, set[str]] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def following(cls, config: Config) -> AsyncIterator[Arrivals]:
        arrivals = cls()
        # The embedded broker holds an empty fetch for its whole wait, even when a record
        # comes: a wait of 100 ms would be up to 100 ms on every event's latency.
        async with follow_topic(
            config.kafka,
            config.kafka.status_topic,
            from_beginning=True,
            max_wait_ms=READER_MAX_WAIT_MS,
        ) as records:
            task = asyncio.create_task(arrivals._read(records))
            try:
                yield arrivals
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _read(self, records: AsyncIterator[ConsumerRecord]) -> None:
        to_monotonic = time.monotonic() - time.time()
        async for record in records:
            read = time.monotonic()
            key = record.key.decode() if record.key else ""
            try:
                status = str(orjson.loads(record.value).get("status"))
            except (orjson.JSONDecodeError, AttributeError, TypeError):
                status = "unreadable"
            self.seen.setdefault(key, []).append(read)
            self.written.setdefault(key, record.timestamp / 1000 + to_monotonic)
            self.statuses.setdefault(key, set()).add(status)

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


def children(pid: int | str = "self") -> list[int]:
    """A process's children (here: the broker and the bridge), where /proc tells."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as listed:
                found += [int(child) for child in listed.read().split()]
    return found


def cpu_times(roles: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """CPU seconds so far of each bridge role, the driver (this process, the sandbox and
    reader, and the posters it has waited for) and the broker (the other children)."""
    ours = {pid for pids in roles.values() for pid in pids}
    others = [pid for pid in children() if pid not in ours]
    times = {role: sum(map(cpu_seconds, pids)) for role, pids in roles.items()}
    posters = resource.getrusage(resource.RUSAGE_CHILDREN)
    times["driver"] = cpu_seconds("self") + posters.ru_utime + posters.ru_stime
    times["broker"] = sum(cpu_seconds(pid) for pid in others)
    return times


# -- measuring ---------------------------------------------------------------------------


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


# The series of a worker's /metrics the split is read from: events published (the
# `publish` outcome of its hints), queries sent and their seconds, by provider.
SPLIT_SERIES = (
    "order_bridge_hints_total",
    "order_bridge_queries_total",
    "order_bridge_query_seconds_sum",
    "order_bridge_inbox_lag",
)


async def scrape(url: str) -> dict[tuple[str, str], float]:
    """A worker's counters that tell how much of the run it took, by (series, provider):
    `events` (its hints that published), `queries`, `query_seconds` (their time added
    up), and one ("partition", N) a partition it owns (`order_bridge_inbox_lag`)."""
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"{url}/metrics")).text
    counts: dict[tuple[str, str], float] = defaultdict(float)
    for line in text.splitlines():
        if not line.startswith(SPLIT_SERIES):
            continue
        sample, _, value = line.rpartition(" ")
        name, _, rest = sample.partition("{")
        labels = dict(
            (k, v.strip('"')) for k, _, v in (p.partition("=") for p in rest.rstrip("}").split(","))
        )
        if name == "order_bridge_inbox_lag":
            counts["partition", labels.get("partition", "?")] = 1
        elif name == "order_bridge_hints_total" and labels.get("outcome") == "publish":
            counts["events", labels.get("provider", "?")] += float(value)
        elif name == "order_bridge_queries_total":
            counts["queries", labels.get("provider", "?")] += float(value)
        elif name == "order_bridge_query_seconds_sum":
            counts["query_seconds", labels.get("provider", "?")] += float(value)
    return counts


@dataclass(frozen=True)
class WorkerShare:
    """What one worker did in the measured window (its counters after, less before)."""

    name: str
    partitions: tuple[int, ...]
    events: Mapping[str, float]  # by provider
    queries: Mapping[str, float]
    query_seconds: Mapping[str, float]


def worker_share(
    name: str, before: Mapping[tuple[str, str], float], after: Mapping[tuple[str, str], float]
) -> WorkerShare:
    def of(series: str) -> dict[str, float]:
        return {p: after.get((series, p), 0.0) - before.get((series, p), 0.0) for p in PROVIDERS}

    owned = tuple(sorted(int(p) for s, p in after if s == "partition" and p.isdigit()))
    return WorkerShare(name, owned, of("events"), of("queries"), of("query_seconds"))


def ideal_speedup(shares: Sequence[WorkerShare], per: str) -> float:
    """The speedup of N workers over one that this split allows when the provider's
    latency binds. A worker confirms an account's orders at most `max_concurrent_queries`
    queries at a time, each taking the provider's latency L, and the accounts go on side
    by side; so one worker needs max over accounts a of Q[a] / c x L, and N workers need
    max over workers w and accounts a of Q[w][a] / c x L, c and L the same for all:

        ideal = max_a sum_w Q[w][a] / max_w,a Q[w][a]

    Q[w][a]: `per` ("queries" or "events") of account a on worker w in the window. Queries
    are what holds a slot: lemft and lunpay send one an order, kasushou's orders waiting
    together go out up to 20 a query, so by events kasushou would count for too much.
    The window adds a start and an end (about 0.2 to 0.3 s here) that the ideal leaves out."""
    counts = [getattr(share, per) for share in shares]
    busiest = max((c[p] for c in counts for p in PROVIDERS), default=0.0)
    whole = max(sum(c[p] for c in counts) for p in PROVIDERS)
    return whole / busiest if busiest else 0.0


@dataclass(frozen=True)
class Split:
    """How the measured orders went to the workers, and what that allows."""

    shares: tuple[WorkerShare, ...]
    window: float  # seconds, first post -> last event
    max_queries: int
    latency_ms: float

    @property
    def ideal(self) -> float:
        return ideal_speedup(self.shares, "queries")

    def lines(self) -> list[str]:
        n = len(self.shares)
        out = [
            f"\nthe split of the orders, {n} worker{'s' if n > 1 else ''} (info): events published"
            " / queries sent (their mean ms), by provider"
        ]
        for share in self.shares:
            cells = [
                f"{p} {share.events[p]:,.0f} / {share.queries[p]:,.0f}"
                + (
                    f" ({share.query_seconds[p] / share.queries[p] * 1000:.0f} ms)"
                    if share.queries[p]
                    else ""
                )
                for p in PROVIDERS
            ]
            owned = ",".join(map(str, share.partitions)) or "?"
            events = sum(share.events.values())
            out.append(
                f"  {share.name} (partitions {owned}): {', '.join(cells)}; events {events:,.0f}"
            )
        out += [
            f"ideal speedup given this split (info): {self.ideal:.2f}x (by events instead of"
            f" queries: {ideal_speedup(self.shares, 'events'):.2f}x)",
            "  = max_a sum_w Q[w][a] / max_w,a Q[w][a], Q[w][a] the queries of account a on"
            " worker w: latency-bound, w needs Q[w][a] / max_concurrent_queries x latency for a",
        ]
        share, provider = max(
            ((s, p) for s in self.shares for p in PROVIDERS), key=lambda t: t[0].queries[t[1]]
        )
        most = share.queries[provider]
        if self.latency_ms and most:
            # At the provider's latency, and at the mean time its queries took (the
            # sandbox's latency plus the bridge's and the sandbox's own time, and waits).
            bound = most / self.max_queries * self.latency_ms / 1000
            busy = share.query_seconds[provider]
            took = busy / self.max_queries
            out.append(
                f"latency bound: {provider} on {share.name}, {most:,.0f} queries / "
                f"{self.max_queries} in flight x {self.latency_ms:g} ms = {bound:.2f} s"
                f" (x their mean {busy / most * 1000:.0f} ms: {took:.2f} s); the window"
                f" (first post -> last event) {self.window:.2f} s, {self.window - took:.2f} s more"
            )
        return out


async def dead_letter_keys(config: Config) -> set[str]:
    """Keys of the worker's dead letters (records with a `reason`) in the dead-letter topic."""
    topic = config.kafka.deadletter_topic
    consumer = AIOKafkaConsumer(
        bootstrap_servers=config.kafka.bootstrap_servers, enable_auto_commit=False
    )
    await consumer.start()
    keys: set[str] = set()
    try:
        await consumer.topics()
        parts = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not parts:
            return keys
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        while [p for p in parts if await consumer.position(p) < ends[p]]:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    headers = dict(record.headers or ())
                    # Refused callbacks carry the reason too, but their orders were not accepted.
                    if "reason" in headers and record.key is not None:
                        keys.add(record.key.decode(errors="replace"))
        return keys
    finally:
        await consumer.stop()


@dataclass(frozen=True)
class Run:
    """One run's parameters."""

    orders: int = 3000
    concurrency: int = 32
    latency_ms: float = 0.0
    mode: str = "serve"
    workers: int = 1
    rate: float = 0.0
    max_queries: int = QUERY_LIMITS["max_concurrent_queries"]
    query_rate: float = QUERY_LIMITS["query_rate"]

    @property
    def limits(self) -> dict[str, Any]:
        return {
            **QUERY_LIMITS,
            "max_concurrent_queries": self.max_queries,
            "query_rate": self.query_rate,
        }


@contextlib.asynccontextmanager
async def bridge_processes(
    run: Run, config: Config, workdir: Path
) -> AsyncIterator[tuple[dict[str, RoleProcess], dict[str, list[int]], list[str]]]:
    """The run's bridge processes, ready; their pids by role (serve's worker child
    counted as `worker`) and the URLs of their /metrics."""
    url = f"http://127.0.0.1:{config.http.port}"
    worker_ports = [config.worker.http_port, *(free_port() for _ in range(run.workers - 1))]
    worker_urls = [f"http://127.0.0.1:{port}" for port in worker_ports]
    async with contextlib.AsyncExitStack() as stack:
        processes: dict[str, RoleProcess] = {}
        for role in MODES[run.mode]:
            if role != "worker":
                processes[role] = await stack.enter_async_context(
                    role_process(role, config, workdir)
                )
                await wait_ready(url, processes[role])
                continue
            for i, port in enumerate(worker_ports):  # each with a config file of its own
                own = dataclasses.replace(
                    config, worker=dataclasses.replace(config.worker, http_port=port)
                )
                directory = workdir / f"worker-{i}"
                directory.mkdir()
                processes[f"worker-{i}"] = await stack.enter_async_context(
                    role_process(role, own, directory)
                )
            for i, worker_url in enumerate(worker_urls):
                await wait_ready(worker_url, processes[f"worker-{i}"])
        receiver = processes[MODES[run.mode][0]]
        pids = {"receiver": [receiver.pid]}
        if run.mode == "serve":  # its worker is a child process, with probes of its own
            await wait_ready(worker_urls[0], receiver)
            pids["worker"] = children(receiver.pid)
        elif run.mode == "split":
            pids["worker"] = [p.pid for role, p in processes.items() if role != "receiver"]
        yield processes, pids, [url] if run.mode == "receiver" else [url, *worker_urls]


async def measure(run: Run) -> tuple[dict[str, float], bool, Split | None]:
    """The figures, whether the ledger balanced, and in split mode the split."""
    suffix = uuid.uuid4().hex[:8]
    accounts = {a.provider: a.name for a in demo_accounts()}
    sandbox = Sandbox(demo_accounts(), seed=SEED)
    if run.latency_ms:
        for name in accounts.values():
            sandbox.set_faults(name, Faults(latency=run.latency_ms / 1000))
    warm_up = make_orders(sandbox, accounts, len(PROVIDERS))
    print(f"creating {run.orders:,} orders and their callbacks ...", flush=True)
    callbacks = make_orders(sandbox, accounts, run.orders)
    follows = run.mode != "receiver"
    async with contextlib.AsyncExitStack() as stack:
        print("starting the embedded broker and the sandbox ...", flush=True)
        broker = await stack.enter_async_context(embedded_broker())
        sandbox_url = await stack.enter_async_context(serve(sandbox.app))
        print(f"starting order-bridge {' + '.join(MODES[run.mode])} ...", flush=True)
        port, worker_port = free_port(), free_port()
        config = bridge_config(
            broker.bootstrap_servers, sandbox_url, suffix, port, worker_port, run.limits
        )
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pipe-")))
        processes, pids, metrics_urls = await stack.enter_async_context(
            bridge_processes(run, config, workdir)
        )
        print(f"bridge pids: {pids}", flush=True)
        url = f"http://127.0.0.1:{port}"
        arrivals = await stack.enter_async_context(Arrivals.following(config))

        answers = await post_all(url, warm_up, 1)
        if any(a.status != 200 for a in answers):
            raise SystemExit(f"FAILED: warm-up callbacks answered {[a.status for a in answers]}")
        if follows and not await arrivals.wait([c.key for c in warm_up], START_TIMEOUT):
            raise SystemExit(f"FAILED: no warm-up events after {START_TIMEOUT:g}s")
        queries_before = len(sandbox.queries)

        paced = f", {run.rate:g} a second" if run.rate else ""
        print(f"posting {run.orders:,} callbacks, {run.concurrency} at a time{paced} ...")
        # Split mode: each worker's counters, so that the warm-up's are left out.
        worker_urls = metrics_urls[1:] if run.mode == "split" else []
        counts_before = [await scrape(u) for u in worker_urls]
        cpu_before = cpu_times(pids)
        answers = await post_all(url, callbacks, run.concurrency, run.rate)
        answered = time.monotonic()
        refused = Counter(a.status for a in answers if a.status != 200)
        if refused:
            shown = ", ".join(f"{n} x {status or 'no answer'}" for status, n in refused.items())
            print(f"callbacks not answered 200: {shown}")
        accepted = [c.key for c, a in zip(callbacks, answers, strict=True) if a.status == 200]
        sent = len(callbacks)
        if follows:
            everything = await arrivals.wait(accepted, EVENT_TIMEOUT)
        cpu_after = cpu_times(pids)
        if follows:
            last_event = max(
                (arrivals.seen[k][0] for k in accepted if k in arrivals.seen), default=0
            )
            await asyncio.sleep(GRACE)
            events = sum(1 for k in accepted if k in arrivals.seen)
            missing = [k for k in accepted if k not in arrivals.seen]
            dead = await dead_letter_keys(config) if missing else set()
            dead_letters = sum(1 for k in missing if k in dead)
            balanced = (
                sent == len(accepted) + refused.total() and len(accepted) == events + dead_letters
            )
            print(
                f"ledger: sent {sent:,} = accepted {len(accepted):,} + refused "
                f"{refused.total():,}; accepted {len(accepted):,} {'=' if balanced else '!='} "
                f"events {events:,} + dead letters {dead_letters:,}"
                + ("" if balanced else "  VOID")
            )
            if not everything:
                print(f"{len(missing):,} events missing {EVENT_TIMEOUT:g}s after the last answer")
            check_events(arrivals, accepted)
        else:  # each 200 is a record in the inbox; a refusal may be one too (a 503 late)
            last_event, events = answered, 0
            stored = await topic_records(broker.bootstrap_servers, config.kafka.inbox_topic)
            stored -= len(warm_up)
            balanced = len(accepted) <= stored <= sent
            print(
                f"ledger: sent {sent:,} = accepted {len(accepted):,} + refused "
                f"{refused.total():,}; inbox records {stored:,}, between the accepted and "
                f"the sent" + ("" if balanced else ": no, VOID")
            )
        summary = "; ".join([await metrics_summary(u) for u in metrics_urls])
        shares = [
            worker_share(f"worker-{i}", before, await scrape(u))
            for i, (u, before) in enumerate(zip(worker_urls, counts_before, strict=True))
        ]
        queries = len(sandbox.queries) - queries_before
        queried: dict[str, float] = {}  # by order id, when the sandbox got its first query
        for query in sandbox.queries[queries_before:]:
            for order_id in query.order_ids:
                queried.setdefault(order_id, query.received_at)
        peak = sum(rss_bytes(pid)[1] for role_pids in pids.values() for pid in role_pids)
        print(f"bridge metrics: {summary}")
        for role, process in processes.items():
            warnings = [line for line in process.log_lines() if line.strip()]
            if len(warnings) > 1:  # the start line is always there
                print(f"{role} log: {len(warnings)} lines, the last: {warnings[-1]}")

    if not accepted or (follows and not events):
        raise SystemExit("VOID: no callback accepted or no event read")
    first_sent = min(a.sent for a in answers)
    window = last_event - first_sent
    latencies = [a.answered - a.sent for a in answers]
    figures = {
        "accepted_per_s": len(accepted) / (max(a.answered for a in answers) - first_sent),
        "answer_p50_ms": percentile(latencies, 0.50) * 1000,
        "answer_p99_ms": percentile(latencies, 0.99) * 1000,
        "bridge_peak_rss_mib": peak / MIB,
    }
    if follows:
        seen = [(c, a) for c, a in zip(callbacks, answers, strict=True) if c.key in arrivals.seen]
        e2e = [arrivals.seen[c.key][0] - a.answered for c, a in seen]
        c2e = [arrivals.seen[c.key][0] - a.sent for c, a in seen]
        figures |= stage_figures(seen, arrivals, queried)
        figures |= {
            "e2e_p50_ms": percentile(e2e, 0.50) * 1000,
            "e2e_p99_ms": percentile(e2e, 0.99) * 1000,
            "c2e_p50_ms": percentile(c2e, 0.50) * 1000,
            "c2e_p99_ms": percentile(c2e, 0.99) * 1000,
            "c2e_p999_ms": percentile(c2e, 0.999) * 1000,
            "events_per_s": events / window,
            "queries_per_order": queries / run.orders,
        }
    used = {part: cpu_after[part] - cpu_before[part] for part in cpu_after}
    used["bridge"] = sum(used[role] for role in pids)
    for part in ("bridge", "driver", "broker", *pids):
        figures[f"{part}_cpu_pct"] = used[part] / window * 100
        figures[f"{part}_cpu_ms"] = used[part] / run.orders * 1000
    split = Split(tuple(shares), window, run.max_queries, run.latency_ms) if shares else None
    return figures, balanced, split


# Where a callback's time goes, stage by stage: each stage's (name, what it spans).
STAGES = (
    ("answer", "receiver: callback sent -> answered 200"),
    ("take", "worker takes the hint: answered -> provider queried"),
    ("confirm", "provider answers, worker writes: queried -> event's record"),
    ("publish", "event published and read: event's record -> read"),
    ("whole", "the whole: callback sent -> event read"),
)
STAGE_PERCENTILES = (50, 90, 99)


def stage_figures(
    seen: Sequence[tuple[Callback, Answer]], arrivals: Arrivals, queried: Mapping[str, float]
) -> dict[str, float]:
    """The STAGE_PERCENTILES of each of STAGES, in ms, over the orders whose event was read.

    `queried` is when the sandbox's handler started on an order's first query: time in
    this process's event loop, which the sandbox shares with the reader, is in it. An
    event's record is stamped when the worker's producer takes it, in whole ms of the
    wall clock, so `confirm` and `publish` are each +-1 ms."""
    spans: dict[str, list[float]] = {name: [] for name, _ in STAGES}
    for callback, answer in seen:
        order_id = callback.key.rpartition("/")[2]
        query, written = queried.get(order_id), arrivals.written[callback.key]
        spans["answer"].append(answer.answered - answer.sent)
        read = arrivals.seen[callback.key][0]
        spans["publish"].append(read - written)
        spans["whole"].append(read - answer.sent)
        if query is not None:  # always, unless the bridge published without a query
            spans["take"].append(query - answer.answered)
            spans["confirm"].append(written - query)
    return {
        f"stage_{name}_p{p}_ms": percentile(values, p / 100) * 1000
        for name, values in spans.items()
        if values
        for p in STAGE_PERCENTILES
    }


def stage_lines(figures: Mapping[str, float]) -> list[str]:
    """The table of where a callback's time went (info: each stage's percentiles are
    its own, so the stages' do not add up to the whole's)."""
    if "stage_whole_p50_ms" not in figures:
        return []
    lines = ["", f"{'where the time goes (info)':<62}  p50 ms  p90 ms  p99 ms"]
    for name, what in STAGES:
        shown = [figures.get(f"stage_{name}_p{p}_ms") for p in STAGE_PERCENTILES]
        lines.append(
            f"  {what:<60}" + "".join(f"{'-' if v is None else f'{v:.1f}':>8}" for v in shown)
        )
    return lines


def check_events(arrivals: Arrivals, accepted: Sequence[str]) -> None:
    """FAILED unless each order has at most one event, and that one `succeeded`."""
    repeated = {k: len(arrivals.seen[k]) for k in accepted if len(arrivals.seen.get(k, [])) > 1}
    if repeated:
        key, count = next(iter(repeated.items()))
        raise SystemExit(
            f"FAILED: {len(repeated):,} orders got more than one event (e.g. {key}: {count})"
        )
    wrong = {
        k: s for k in accepted if (s := arrivals.statuses.get(k, {"succeeded"})) != {"succeeded"}
    }
    if wrong:
        raise SystemExit(f"FAILED: {len(wrong):,} orders' events not succeeded: {wrong}")


# -- the report --------------------------------------------------------------------------


def params(run: Run) -> dict[str, Any]:
    """The run's parameters; those at their default only for orders and concurrency (the
    saved baseline predates the others, and is a run with none)."""
    shown: dict[str, Any] = {"orders": run.orders, "concurrency": run.concurrency}
    default = Run()
    for name, key in PARAMS.items():
        if getattr(run, name) != getattr(default, name):
            shown[key] = getattr(run, name)
    return shown


# Run's fields as a baseline names them.
PARAMS = {
    "latency_ms": "provider_latency_ms",
    "mode": "mode",
    "workers": "workers",
    "rate": "rate",
    "max_queries": "max_concurrent_queries",
    "query_rate": "query_rate",
}


def describe(params: Mapping[str, Any]) -> str:
    text = f"{params['orders']:,} orders, {params['concurrency']} clients"
    if params.get("rate"):
        text += f" at {params['rate']:g}/s"
    if params.get("provider_latency_ms"):
        text += f", provider answering in {params['provider_latency_ms']:g} ms"
    if "max_concurrent_queries" in params or "query_rate" in params:
        text += (
            f", {params.get('max_concurrent_queries', Run.max_queries)} queries in flight"
            f" and {params.get('query_rate', Run.query_rate):g}/s an account"
        )
    text += f", {params.get('mode', 'serve')}"
    return text + (f" with {params['workers']} workers" if params.get("workers") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=Run.orders, help="orders, callbacks (3000)")
    parser.add_argument(
        "--concurrency", type=int, default=Run.concurrency, help="connections posting (32)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="callbacks a second, paced (default 0: each connection posts when answered)",
    )
    parser.add_argument(
        "--provider-latency",
        type=float,
        default=0.0,
        metavar="MS",
        help="milliseconds the sandbox takes to answer each query (0)",
    )
    parser.add_argument(
        "--mode",
        choices=sorted(MODES),
        default="serve",
        help="serve: `order-bridge serve`; split: `receiver` + `worker` processes; "
        "receiver: a `receiver` alone (no events)",
    )
    parser.add_argument(
        "--against-receiver",
        action="store_true",
        help="first the same run with a `receiver` alone, then the ratio of callbacks/s",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes in split (1)")
    parser.add_argument(
        "--against-one-worker",
        action="store_true",
        help="split: first the same run with 1 worker, then the speedup of --workers N",
    )
    parser.add_argument(
        "--max-queries", type=int, default=Run.max_queries, help="queries in flight an account"
    )
    parser.add_argument(
        "--query-rate", type=float, default=Run.query_rate, help="queries/s an account"
    )
    parser.add_argument(
        "--save-baseline", action="store_true", help=f"save this run's figures as {BASELINE.name}"
    )
    args = parser.parse_args()
    if args.orders < 1 or args.concurrency < 1 or args.provider_latency < 0 or args.rate < 0:
        parser.error(
            "--orders and --concurrency must be at least 1; --provider-latency and "
            "--rate at least 0"
        )
    if args.workers != 1 and args.mode != "split":
        parser.error("--workers is for --mode split")
    if args.against_one_worker and (args.mode != "split" or args.workers < 2):
        parser.error("--against-one-worker is for --mode split with --workers 2 or more")
    if args.against_one_worker and args.against_receiver:
        parser.error("--against-one-worker and --against-receiver: one or the other")
    run = Run(
        args.orders,
        args.concurrency,
        args.provider_latency,
        args.mode,
        args.workers,
        args.rate,
        args.max_queries,
        args.query_rate,
    )
    runs = [run]
    if args.against_receiver:
        runs.insert(0, dataclasses.replace(run, mode="receiver"))
    if args.against_one_worker:
        runs.insert(0, dataclasses.replace(run, workers=1))
    results = [measured(each) for each in runs]
    figures, split = results[-1]
    if args.against_receiver:
        rates = [results[0][0]["accepted_per_s"], figures["accepted_per_s"]]
        print(
            f"\n{run.mode} answered {rates[1]:,.0f} callbacks/s, a receiver alone {rates[0]:,.0f}:"
            f" {rates[1] / rates[0]:.2f} of it"
        )
    if args.against_one_worker and split is not None:
        one, many = results[0][0]["events_per_s"], figures["events_per_s"]
        speedup = many / one
        print(
            f"\nmeasured speedup (info): {many:,.0f} / {one:,.0f} events/s = {speedup:.2f}x with"
            f" {run.workers} workers against 1; ideal given the split {split.ideal:.2f}x;"
            f" measured / ideal {speedup / split.ideal:.2f}"
        )
    if args.save_baseline:
        save_baseline(BASELINE, params(run), shown_figures(run, figures), figures)


def shown_figures(run: Run, figures: Mapping[str, float]) -> tuple[Figure, ...]:
    return tuple(f for f in (*FIGURES, *ROLE_FIGURES) if f.name in figures)


def measured(run: Run) -> tuple[dict[str, float], Split | None]:
    """Measures and reports one run; SystemExit if it fails or is void."""
    try:
        figures, balanced, split = asyncio.run(measure(run))
    except StartupError as exc:
        raise SystemExit(f"FAILED: {exc}") from None
    report(
        shown_figures(run, figures),
        figures,
        load_baseline(BASELINE),
        title=f"{describe(params(run))}, {PARTITIONS} partitions, bridge in processes of its own",
        path=BASELINE,
        params=params(run),
        describe=describe,
        mismatch="other parameters: nothing is compared",
    )
    for line in stage_lines(figures):
        print(line)
    if split is not None:
        print("\n".join(split.lines()))
    if not balanced:
        raise SystemExit("VOID: the ledger does not balance")
    return figures, split


if __name__ == "__main__":
    main()
