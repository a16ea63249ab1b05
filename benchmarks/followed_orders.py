"""What N followed orders cost a worker: memory, a full poll sweep, and a restore.

    .venv/bin/python benchmarks/followed_orders.py [--orders 100000] [--save-baseline]

Each measurement runs in a fresh interpreter of its own (this script, `--phase ...`),
so that one phase's garbage never hides in, or inflates, the next one's RSS:

- `memory`: a StateStore and a PollSchedule filled as a worker fills them, measured
  with tracemalloc (Python's own allocations) and VmRSS (what the OS sees), then
  one `due(now, limit=1000)` sweep that drains the schedule.
- `restore` and `restore-traced`: `StateStore.restore()` of all 12 partitions from a
  state topic on the embedded broker holding N records (written by this process
  first): timed and measured by RSS, then under tracemalloc (which slows it down)
  for its peak and what it holds; each checks that the store holds exactly the
  records written.

Orders go to partition i % 12; times are the best of 3 runs, memory is the first's.

The figures are printed beside those of `benchmarks/baseline.json`, if saved.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import random
import sys
import time
import tracemalloc
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from baseline_report import MIB, Figure, load_baseline, report, rss_bytes, save_baseline

from bridge.broker import embedded_broker
from bridge.config import KafkaSettings
from bridge.errors import StartupError
from bridge.kafka import client_options, ensure_topics
from bridge.orders import Status
from bridge.state import OrderState, StateStore
from bridge.worker.polls import PollSchedule

PARTITIONS = 12
SCRIPT = Path(__file__).resolve()
BASELINE = SCRIPT.with_name("baseline.json")
# (provider, account, order-id prefix, the provider's code for "processing"); ids are 22 chars.
PROVIDERS = (
    ("kasushou", "kasushou-main", "D", 2),
    ("lemft", "lemft-main", "L", 0),
    ("lunpay", "lunpay-main", "P", 2),
)
SEED = 20261122
PHASE_TIMEOUT = 300.0
# Times are the best of this many runs; memory is measured on the first.
REPEATS = 3


# Bytes/order figures are comparable whatever the order count. tracemalloc counts are exact
# for the same Python and code; RSS, the restore's peak (how records batch up in fetches)
# and times vary from run to run.
FIGURES = (
    Figure(
        "store_bytes_per_order",
        "state store, bytes/order (tracemalloc)",
        "lower",
        0,
        1,
        scale_free=True,
    ),
    Figure(
        "schedule_bytes_per_order",
        "poll schedule, bytes/order (tracemalloc)",
        "lower",
        0,
        1,
        scale_free=True,
    ),
    Figure(
        "total_bytes_per_order",
        "store + schedule, bytes/order (tracemalloc)",
        "lower",
        0,
        1,
        scale_free=True,
    ),
    Figure("total_mib", "store + schedule, MiB (tracemalloc)", "lower", 1, 1),
    Figure("rss_growth_mib", "store + schedule, RSS growth MiB", "lower", 1, 10),
    Figure(
        "stale_entry_bytes_per_order",
        "reschedule: stale heap entry, bytes/order",
        "lower",
        0,
        1,
        scale_free=True,
    ),
    Figure("sweep_orders_per_s", "due(now, 1000) sweep, orders/s (best of 3)", "higher", 0, 30),
    Figure("produce_s", "setup: produce the state records, s", "", 2, 0),
    Figure("restore_s", "restore of 12 partitions, s (best of 3)", "lower", 2, 20),
    Figure("restore_orders_per_s", "restore, orders/s (best of 3)", "higher", 0, 20),
    Figure("restore_current_mib", "after restore, MiB held (tracemalloc)", "lower", 1, 1),
    Figure("restore_peak_mib", "during restore, peak MiB (tracemalloc)", "lower", 1, 10),
    Figure("restore_rss_growth_mib", "after restore, RSS growth MiB", "lower", 1, 30),
    Figure("restore_rss_peak_growth_mib", "during restore, peak RSS growth MiB", "lower", 1, 10),
)


# -- the orders ---------------------------------------------------------------------------


def followed_orders(count: int, now: float) -> Iterator[tuple[int, str, OrderState]]:
    """`count` non-final orders as the worker holds them, the same for the same arguments.

    Each order has objects of its own (key, event id, times), as decoded records and
    handled hints do; times are whole milliseconds, as the state record keeps them.
    """
    rng = random.Random(SEED)  # noqa: S311 - test data, not secrets
    for i in range(count):
        provider, account, prefix, code = PROVIDERS[i % len(PROVIDERS)]
        order_id = f"{prefix}{rng.randrange(10**21):021d}"
        first_seen = round(now - rng.uniform(60.0, 72 * 3600.0), 3)
        state = OrderState(
            first_seen=first_seen,
            status=Status.PROCESSING,
            code=code,
            event_id=str(uuid.UUID(int=rng.getrandbits(128), version=5)),
            published_at=round(first_seen + rng.uniform(1.0, 60.0), 3),
            next_poll=round(now + rng.uniform(10.0, 900.0), 3),
            polls=rng.randrange(6),
        )
        yield i % PARTITIONS, f"{provider}/{account}/{order_id}", state


def fill(count: int, now: float) -> tuple[StateStore, PollSchedule]:
    """What a worker holds after `_assigned()`: the states, then each one's next poll."""
    store = StateStore(KafkaSettings())
    for partition, key, state in followed_orders(count, now):
        store.put(partition, key, state)
    return store, schedule_of(store)


def schedule_of(store: StateStore) -> PollSchedule:
    schedule = PollSchedule()
    for partition in range(PARTITIONS):
        schedule.own(partition)
        for key, state in store.items(partition):
            schedule.set(partition, key, state.next_poll)
    return schedule


def check_store(store: StateStore, count: int, now: float) -> None:
    """Fails loudly unless `store` holds exactly the `count` orders generated for `now`."""
    if len(store) != count:
        raise SystemExit(f"FAILED: the store holds {len(store)} orders, {count} expected")
    for partition, key, expected in followed_orders(count, now):
        found = store.get(partition, key)
        if found is None or found.encode() != expected.encode():
            raise SystemExit(f"FAILED: {key} in partition {partition} is {found}, not {expected}")


# -- measuring ---------------------------------------------------------------------------


def traced_now() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def phase_memory(count: int, now: float) -> dict[str, float]:
    # Untraced: RSS growth, and the sweep's speed.
    gc.collect()
    rss_before, _ = rss_bytes()
    store, schedule = fill(count, now)
    gc.collect()
    rss_after, _ = rss_bytes()
    if len(store) != count or len(schedule) != count:
        raise SystemExit(f"FAILED: {len(store)} states, {len(schedule)} polls, {count} expected")
    sweep = math.inf
    for repeat in range(REPEATS):
        if repeat:
            schedule = schedule_of(store)
        started = time.perf_counter()
        taken = 0
        while batch := schedule.due(now + 3600.0, limit=1000):
            taken += len(batch)
        sweep = min(sweep, time.perf_counter() - started)
        if taken != count:
            raise SystemExit(f"FAILED: the sweep took {taken} orders, {count} expected")
    del store, schedule

    # Traced: exact bytes of each part, in the order the worker builds them.
    tracemalloc.start()
    start = traced_now()
    store = StateStore(KafkaSettings())
    for partition, key, state in followed_orders(count, now):
        store.put(partition, key, state)
    with_store = traced_now()
    schedule = schedule_of(store)
    with_schedule = traced_now()
    # A callback or a failed poll reschedules an order before its due time: the old heap
    # entry stays until that time comes. Once for every order:
    for partition in range(PARTITIONS):
        for key, state in store.items(partition):
            assert state.next_poll is not None
            schedule.set(partition, key, state.next_poll + 60.0)
    with_stale = traced_now()
    tracemalloc.stop()
    total = with_schedule - start
    return {
        "store_bytes_per_order": (with_store - start) / count,
        "schedule_bytes_per_order": (with_schedule - with_store) / count,
        "total_bytes_per_order": total / count,
        "total_mib": total / MIB,
        "rss_growth_mib": (rss_after - rss_before) / MIB,
        "stale_entry_bytes_per_order": (with_stale - with_schedule) / count,
        "sweep_orders_per_s": count / sweep,
    }


def settings_for(bootstrap_servers: str, suffix: str) -> KafkaSettings:
    """Topics of this run's own (as tests/conftest.py's kafka_settings_for makes them)."""
    return KafkaSettings(
        bootstrap_servers=bootstrap_servers,
        status_topic=f"bench-status-{suffix}",
        inbox_topic=f"bench-inbox-{suffix}",
        deadletter_topic=f"bench-deadletter-{suffix}",
        state_topic=f"bench-state-{suffix}",
        partitions=PARTITIONS,
        replication_factor=1,
        enable_idempotence=False,  # the embedded broker has no InitProducerId
    )


async def produce(settings: KafkaSettings, count: int, now: float) -> float:
    """Writes the state records of `count` orders as the worker would; returns seconds."""
    producer = AIOKafkaProducer(
        **client_options(settings),
        acks="all",
        enable_idempotence=False,
        linger_ms=20,
        max_batch_size=256 * 1024,
    )
    started = time.perf_counter()
    await producer.start()
    try:
        sent: list[asyncio.Future[Any]] = []
        for partition, key, state in followed_orders(count, now):
            value = state.encode()
            sent.append(
                await producer.send(
                    settings.state_topic, value, key=key.encode(), partition=partition
                )
            )
            if len(sent) >= 10_000:
                await asyncio.gather(*sent)
                sent.clear()
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def phase_restore(settings: KafkaSettings, count: int, now: float) -> dict[str, float]:
    store = StateStore(settings)
    gc.collect()
    rss_before, peak_before = rss_bytes()
    started = time.perf_counter()
    await store.restore(list(range(PARTITIONS)))
    elapsed = time.perf_counter() - started
    gc.collect()
    rss_after, peak_after = rss_bytes()
    check_store(store, count, now)
    for _ in range(REPEATS - 1):
        del store
        store = StateStore(settings)
        started = time.perf_counter()
        await store.restore(list(range(PARTITIONS)))
        elapsed = min(elapsed, time.perf_counter() - started)
        if len(store) != count:
            raise SystemExit(f"FAILED: the store holds {len(store)} orders, {count} expected")
    return {
        "restore_s": elapsed,
        "restore_orders_per_s": count / elapsed,
        "restore_rss_growth_mib": (rss_after - rss_before) / MIB,
        "restore_rss_peak_growth_mib": (peak_after - peak_before) / MIB,
    }


async def phase_restore_traced(settings: KafkaSettings, count: int, now: float) -> dict[str, float]:
    store = StateStore(settings)
    tracemalloc.start()
    start = traced_now()
    tracemalloc.reset_peak()
    await store.restore(list(range(PARTITIONS)))
    held = traced_now()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    check_store(store, count, now)
    return {"restore_current_mib": (held - start) / MIB, "restore_peak_mib": (peak - start) / MIB}


# -- running the phases -----------------------------------------------------------------


async def run_phase(phase: str, count: int, now: float, *extra: str) -> dict[str, float]:
    """Runs one phase in a fresh interpreter; its figures are its last line of output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--phase",
        phase,
        "--orders",
        str(count),
        "--now",
        repr(now),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), PHASE_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise SystemExit(f"FAILED: phase {phase} took over {PHASE_TIMEOUT:g}s") from None
    if process.returncode != 0:
        lines = (err or out).decode(errors="replace").strip().splitlines()
        raise SystemExit(f"FAILED: phase {phase} exited {process.returncode}: {lines[-1:]}")
    figures: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return figures


async def measure(count: int) -> dict[str, float]:
    now = round(time.time(), 3)
    print(f"memory: {count:,} orders in a StateStore and a PollSchedule ...", flush=True)
    figures = await run_phase("memory", count, now)
    print("restore: starting the embedded broker ...", flush=True)
    async with embedded_broker() as broker:
        settings = settings_for(broker.bootstrap_servers, uuid.uuid4().hex[:8])
        await ensure_topics(settings)
        print(f"restore: producing {count:,} state records ...", flush=True)
        figures["produce_s"] = await produce(settings, count, now)
        print("restore: restoring (timed, then traced) ...", flush=True)
        extra = ("--bootstrap", broker.bootstrap_servers, "--state-topic", settings.state_topic)
        figures |= await run_phase("restore", count, now, *extra)
        figures |= await run_phase("restore-traced", count, now, *extra)
    return figures


# -- the report --------------------------------------------------------------------------


def params(count: int) -> dict[str, int]:
    return {"orders": count, "partitions": PARTITIONS}


def describe(params: Mapping[str, Any]) -> str:
    return f"{params['orders']:,} orders"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=100_000, help="followed orders (100000)")
    parser.add_argument(
        "--save-baseline", action="store_true", help=f"save this run's figures as {BASELINE.name}"
    )
    # The phases run in interpreters of their own: these are for the script itself.
    parser.add_argument(
        "--phase", choices=["memory", "restore", "restore-traced"], help=argparse.SUPPRESS
    )
    parser.add_argument("--now", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--state-topic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.orders < 1:
        parser.error("--orders must be at least 1")

    if args.phase is not None:
        if args.now is None:
            parser.error("--phase needs --now")
        figures: dict[str, float]
        if args.phase == "memory":
            figures = phase_memory(args.orders, args.now)
        else:
            settings = KafkaSettings(bootstrap_servers=args.bootstrap, state_topic=args.state_topic)
            run = phase_restore if args.phase == "restore" else phase_restore_traced
            figures = asyncio.run(run(settings, args.orders, args.now))
        print(json.dumps(figures))
        return

    try:
        figures = asyncio.run(measure(args.orders))
    except StartupError as exc:
        raise SystemExit(f"FAILED: {exc}") from None
    report(
        FIGURES,
        figures,
        load_baseline(BASELINE),
        title=f"{args.orders:,} followed orders, {PARTITIONS} partitions",
        path=BASELINE,
        params=params(args.orders),
        describe=describe,
        mismatch="another order count: only the bytes/order figures are compared",
    )
    if args.save_baseline:
        save_baseline(BASELINE, params(args.orders), FIGURES, figures)


if __name__ == "__main__":
    main()
