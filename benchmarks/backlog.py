"""One `order-bridge worker` draining an inbox backlog: what a worker alone can confirm.

pipeline.py measures the whole bridge, so its events/s can be no more than the
callbacks its receiver answers and its clients post (on 2 cores, ~200/s). Here the
callbacks are posted first, to a `receiver` alone; then a `worker` starts and drains
the inbox, while this script (sandbox and status reader) answers its queries and reads
its events. Same settings, orders and sandbox as pipeline.py.

    .venv/bin/python benchmarks/backlog.py --orders 4000 --provider-latency 200

Figures: events/s from the first event read to the last; the worker's CPU ms per
order (and % of a core) over that time; this script's and the broker's CPU. FAILED
(exit 1) unless every order gets exactly one `succeeded` event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import uuid
from pathlib import Path

from bench_procs import cpu_seconds, role_process, wait_ready
from pipeline import (
    EVENT_TIMEOUT,
    PROVIDERS,
    SEED,
    Arrivals,
    bridge_config,
    children,
    make_orders,
    post_all,
)

from bridge.broker import embedded_broker, free_port
from bridge.dev import demo_accounts
from bridge.sandbox import Faults, Sandbox
from bridge.servers import serve


async def measure(orders: int, latency_ms: float) -> dict[str, float]:
    accounts = {a.provider: a.name for a in demo_accounts()}
    sandbox = Sandbox(demo_accounts(), seed=SEED)
    if latency_ms:
        for name in accounts.values():
            sandbox.set_faults(name, Faults(latency=latency_ms / 1000))
    callbacks = make_orders(sandbox, accounts, orders + len(PROVIDERS))
    async with contextlib.AsyncExitStack() as stack:
        broker = await stack.enter_async_context(embedded_broker())
        sandbox_url = await stack.enter_async_context(serve(sandbox.app))
        port, worker_port = free_port(), free_port()
        suffix = uuid.uuid4().hex[:8]
        config = bridge_config(broker.bootstrap_servers, sandbox_url, suffix, port, worker_port)
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-backlog-")))
        receiver = await stack.enter_async_context(role_process("receiver", config, workdir))
        await wait_ready(f"http://127.0.0.1:{port}", receiver)
        arrivals = await stack.enter_async_context(Arrivals.following(config))
        print(f"posting {len(callbacks):,} callbacks to the receiver alone ...", flush=True)
        answers = await post_all(f"http://127.0.0.1:{port}", callbacks, 32)
        if any(a.status != 200 for a in answers):
            raise SystemExit("FAILED: a callback was not answered 200")
        print("starting the worker ...", flush=True)
        worker = await stack.enter_async_context(role_process("worker", config, workdir))
        broker_pids = [pid for pid in children() if pid not in (receiver.pid, worker.pid)]
        await wait_ready(f"http://127.0.0.1:{worker_port}", worker)
        keys = [c.key for c in callbacks]
        # The first event starts the clock: joining the group and restoring are not counted.
        while not arrivals.seen:  # noqa: ASYNC110 - Arrivals has no event to wait on
            await asyncio.sleep(0.005)
        cpu = (cpu_seconds(worker.pid), cpu_seconds("self"), sum(map(cpu_seconds, broker_pids)))
        if not await arrivals.wait(keys, EVENT_TIMEOUT):
            raise SystemExit(f"FAILED: events missing {EVENT_TIMEOUT:g}s after the worker started")
        used = (
            cpu_seconds(worker.pid) - cpu[0],
            cpu_seconds("self") - cpu[1],
            sum(map(cpu_seconds, broker_pids)) - cpu[2],
        )
        await asyncio.sleep(1.0)
        if any(len(arrivals.seen[k]) != 1 for k in keys):
            raise SystemExit("FAILED: an order got more than one event")
        if any(arrivals.statuses[k] != {"succeeded"} for k in keys):
            raise SystemExit("FAILED: an order's event is not succeeded")
    times = sorted(seen[0] for seen in arrivals.seen.values())
    window = times[-1] - times[0]
    counted = len(times) - 1
    return {
        "events/s": counted / window,
        "worker CPU ms / order": used[0] / counted * 1000,
        "worker CPU % of a core": used[0] / window * 100,
        "sandbox + reader CPU ms / order": used[1] / counted * 1000,
        "broker CPU ms / order": used[2] / counted * 1000,
        "queries / order": len(sandbox.queries) / len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=4000, help="orders in the backlog (4000)")
    parser.add_argument(
        "--provider-latency", type=float, default=0.0, metavar="MS", help="sandbox latency (0)"
    )
    args = parser.parse_args()
    figures = asyncio.run(measure(args.orders, args.provider_latency))
    print(f"{args.orders:,} orders, provider latency {args.provider_latency:g} ms:")
    for name, value in figures.items():
        print(f"  {name:34} {value:10,.2f}")


if __name__ == "__main__":
    main()
