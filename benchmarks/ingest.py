"""Ingest on loopback: the receiver beside a bare route and the naive bridge, one run.

    .venv/bin/python benchmarks/ingest.py [--duration 10] [-c 32] [--targets ...]
                                           [--generator auto|wrk|own]

One after another, each alone on the machine's loopback, with the embedded broker up:

  bare-fast, bare-plain     a Starlette POST route answering 200 at once
  naive-fast, naive-plain   a Starlette route doing aiokafka `send_and_wait` (acks=all,
                            enable_idempotence false) of the body, then 200
  receiver                  `order-bridge receiver` as a process (`python -m bridge`)

`-fast` is uvicorn with uvloop and httptools (skipped when they are not installed),
`-plain` uvicorn with h11 and asyncio: the project's own dependency set. Every target
gets the same load: valid lunpay callbacks, as the sandbox builds them (1,024 orders,
in turn), posted to `/callbacks/lunpay/lunpay-demo` by C keep-alive connections, each
sending the next as soon as the last is answered, for D seconds after a warm-up.

The load generator is wrk (`apt-get install wrk`, one thread, a Lua script) or, when
wrk is missing (or `--generator own`), an asyncio client in a process of its own; its
CPU is printed beside the figures, so a saturated generator shows.

Ledger: sent = accepted (200) + refused (anything else) + errors (no answer). For the
targets writing to Kafka, the records in their topic must be at least the 200s and at
most the 200s plus requests unanswered (cut off at the end or errors). A run that
does not balance is VOID (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_procs import cpu_seconds, percentile, role_process, topic_records, wait_ready
from followed_orders import PARTITIONS, settings_for

from bridge.broker import embedded_broker, free_port
from bridge.config import Config, HttpSettings, WorkerSettings
from bridge.dev import demo_accounts
from bridge.sandbox import Sandbox

SCRIPT = Path(__file__).resolve()
TARGETS = ("bare-fast", "bare-plain", "naive-fast", "naive-plain", "receiver")
ACCOUNT = "lunpay-demo"
PATH = f"/callbacks/lunpay/{ACCOUNT}"
BODIES = 1024
LUNPAY_SUCCEEDED = 4
WARM_UP = 1.0
START_TIMEOUT = 60.0


def fast_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("uvloop", "httptools"))


# -- the bare route and the naive bridge, each in an interpreter of its own ----------------


def phase_app(kind: str, fast: bool, port: int, bootstrap: str, topic: str) -> None:
    import uvicorn
    from aiokafka import AIOKafkaProducer
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    producer: Any = None

    async def bare(request: Request) -> Response:
        await request.body()
        return Response(b"success", media_type="text/plain")

    async def naive(request: Request) -> Response:
        body = await request.body()
        await producer.send_and_wait(topic, body)
        return Response(b"success", media_type="text/plain")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal producer
        if kind == "naive":
            producer = AIOKafkaProducer(
                bootstrap_servers=bootstrap, acks="all", enable_idempotence=False
            )
            await producer.start()
        try:
            yield
        finally:
            if producer is not None:
                await producer.stop()

    endpoint = naive if kind == "naive" else bare
    app = Starlette(routes=[Route(PATH, endpoint, methods=["POST"])], lifespan=lifespan)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop" if fast else "asyncio",
        http="httptools" if fast else "h11",
        log_level="warning",
        access_log=False,
    )


# -- the bodies -------------------------------------------------------------------------------


def lunpay_bodies(count: int) -> list[bytes]:
    """`count` valid lunpay callbacks (succeeded orders), as the sandbox posts them."""
    sandbox = Sandbox(demo_accounts(), seed=20261202)
    bodies = []
    for _ in range(count):
        order = sandbox.create_order(ACCOUNT, status=LUNPAY_SUCCEEDED)
        body, content_type = sandbox.callback(ACCOUNT, order.order_id)
        assert content_type.startswith("application/json"), content_type
        bodies.append(body)
    return bodies


# -- load generators --------------------------------------------------------------------------


@dataclass
class Load:
    sent: int
    accepted: int
    refused: int
    errors: int
    # Requests on the wire when the run stopped, never answered (wrk: up to -c).
    cut_off: int
    seconds: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    generator_cpu_s: float
    generator: str


WRK_SCRIPT = """
local bodies = {%(bodies)s}
local n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  n = n + 1
  return wrk.format(nil, "%(path)s", nil, bodies[(n %% #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("LEDGER %%d %%d %%d %%d %%d %%d %%d\\n", summary.requests, e.status,
    e.connect, e.read, e.write, e.timeout, summary.duration))
  io.write(string.format("LATENCY %%d %%d %%d\\n", latency:percentile(50),
    latency:percentile(99), latency:percentile(99.9)))
end
"""


def lua_string(body: bytes) -> str:
    return '"' + "".join(f"\\{b}" for b in body) + '"'


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def run_wrk(
    port: int, bodies: Sequence[bytes], duration: float, connections: int, workdir: Path
) -> Load:
    script = workdir / "post.lua"
    script.write_text(
        WRK_SCRIPT % {"bodies": ", ".join(lua_string(b) for b in bodies), "path": PATH},
        encoding="ascii",
    )
    before = children_cpu()
    process = await asyncio.create_subprocess_exec(
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}/",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    cpu = children_cpu() - before
    text = out.decode(errors="replace")
    ledger = re.search(r"^LEDGER ([\d ]+)$", text, re.M)
    latency = re.search(r"^LATENCY ([\d ]+)$", text, re.M)
    if process.returncode != 0 or not ledger or not latency:
        raise SystemExit(f"FAILED: wrk: {text} {err.decode(errors='replace')}")
    answered, refused, connect, read, write, timeout, micros = map(int, ledger[1].split())
    p50, p99, p999 = (int(v) / 1000 for v in latency[1].split())
    errors = connect + read + write + timeout
    return Load(
        sent=answered + read + write + timeout,
        accepted=answered - refused,
        refused=refused,
        errors=read + write + timeout,
        # wrk does not count the requests it leaves on the wire when it stops.
        cut_off=connections,
        seconds=micros / 1e6,
        p50_ms=p50,
        p99_ms=p99,
        p999_ms=p999,
        generator_cpu_s=cpu,
        generator="wrk" if not errors else f"wrk ({connect} connect errors)",
    )


async def own_load(
    port: int, bodies: Sequence[bytes], duration: float, connections: int
) -> dict[str, Any]:
    """The fallback generator: C keep-alive connections, each posting as soon as answered."""
    requests = [
        (
            f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body in bodies
    ]
    counter = iter(range(1 << 62))
    latencies: list[float] = []
    tally = {"sent": 0, "accepted": 0, "refused": 0, "errors": 0}
    length = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)
    deadline = time.monotonic() + duration

    async def client() -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while time.monotonic() < deadline:
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    tally["errors"] += 1
                    await asyncio.sleep(0.01)
                    continue
            assert reader is not None
            request = requests[next(counter) % len(requests)]
            started = time.perf_counter()
            tally["sent"] += 1
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                match = length.search(head)
                await reader.readexactly(int(match[1]) if match else 0)
            except (OSError, asyncio.IncompleteReadError, ConnectionError):
                tally["errors"] += 1
                writer.close()
                reader = writer = None
                continue
            latencies.append(time.perf_counter() - started)
            tally["accepted" if head[9:12] == b"200" else "refused"] += 1
            if b"connection: close" in head.lower():
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(connections)))
    seconds = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        **tally,
        "seconds": seconds,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "p999_ms": percentile(latencies, 0.999) * 1000,
        "cpu_s": usage.ru_utime + usage.ru_stime - cpu_before,
    }


async def run_own(
    port: int, bodies: Sequence[bytes], duration: float, connections: int, workdir: Path
) -> Load:
    path = workdir / "bodies.json"
    path.write_text(json.dumps([b.decode() for b in bodies]), encoding="utf-8")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--phase",
        "load",
        "--port",
        str(port),
        "--bodies",
        str(path),
        "--duration",
        str(duration),
        "-c",
        str(connections),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise SystemExit("FAILED: the load generator failed")
    got = json.loads(out.decode().strip().splitlines()[-1])
    return Load(
        sent=got["sent"],
        accepted=got["accepted"],
        refused=got["refused"],
        errors=got["errors"],
        cut_off=0,  # it waits for every answer before it stops
        seconds=got["seconds"],
        p50_ms=got["p50_ms"],
        p99_ms=got["p99_ms"],
        p999_ms=got["p999_ms"],
        generator_cpu_s=got["cpu_s"],
        generator="own (python asyncio)",
    )


# -- one target -------------------------------------------------------------------------------


@dataclass
class Result:
    target: str
    load: Load
    server_cpu_s: float
    # Records written to Kafka during the measured run (None: the target writes none).
    records: int | None

    @property
    def rate(self) -> float:
        return self.load.accepted / self.load.seconds if self.load.seconds else 0.0

    def void(self) -> str | None:
        """Why the ledger does not balance, or None."""
        load = self.load
        if load.sent != load.accepted + load.refused + load.errors:
            return f"sent {load.sent} != {load.accepted} + {load.refused} + {load.errors}"
        if self.records is not None:
            if self.records < load.accepted:
                return f"{load.accepted} answered 200 but {self.records} records written"
            most = load.accepted + load.errors + load.cut_off
            if self.records > most:
                return f"{self.records} records written, more than the {most} possible"
        return None


async def port_open(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return True
    return False


@contextlib.asynccontextmanager
async def app_process(
    kind: str, fast: bool, port: int, bootstrap: str, topic: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--phase",
        "app",
        "--kind",
        kind,
        *(["--fast"] if fast else []),
        "--port",
        str(port),
        "--bootstrap",
        bootstrap,
        "--topic",
        topic,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        if not await port_open(port, START_TIMEOUT):
            raise SystemExit(f"FAILED: {kind} did not start")
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


async def create_topic(bootstrap: str, topic: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()


async def measure_target(
    target: str,
    bootstrap: str,
    bodies: Sequence[bytes],
    args: argparse.Namespace,
    workdir: Path,
) -> Result:
    port = free_port()
    suffix = uuid.uuid4().hex[:8]
    if target == "receiver":
        settings = settings_for(bootstrap, suffix)
        config = Config(
            kafka=settings,
            http=HttpSettings(host="127.0.0.1", port=port),
            worker=WorkerSettings(group_id=f"bench-{suffix}"),
            accounts=tuple(
                dataclasses.replace(a, base_url=f"http://127.0.0.1:9/{a.provider}")
                for a in demo_accounts()
            ),
        )
        async with role_process("receiver", config, workdir) as role:
            await wait_ready(f"http://127.0.0.1:{port}", role)
            run = run_wrk if args.generator == "wrk" else run_own
            await run(port, bodies, min(WARM_UP, args.duration), args.connections, workdir)
            await asyncio.sleep(0.2)
            records_before = await topic_records(bootstrap, settings.inbox_topic)
            cpu_before = cpu_seconds(role.pid)
            load = await run(port, bodies, args.duration, args.connections, workdir)
            cpu = cpu_seconds(role.pid) - cpu_before
            await asyncio.sleep(0.5)  # writes of requests cut off at the end
            records = await topic_records(bootstrap, settings.inbox_topic) - records_before
            warnings = [line for line in role.log_lines() if "WARNING" in line or "ERROR" in line]
            if warnings:
                print(f"  receiver log: {len(warnings)} warnings, the last: {warnings[-1]}")
        return Result(target, load, cpu, records)

    kind, _, variant = target.partition("-")
    topic = f"bench-naive-{suffix}"
    if kind == "naive":
        await create_topic(bootstrap, topic)
    async with app_process(kind, variant == "fast", port, bootstrap, topic) as process:
        run = run_wrk if args.generator == "wrk" else run_own
        await run(port, bodies, min(WARM_UP, args.duration), args.connections, workdir)
        await asyncio.sleep(0.2)
        records_before = await topic_records(bootstrap, topic) if kind == "naive" else 0
        cpu_before = cpu_seconds(process.pid)
        load = await run(port, bodies, args.duration, args.connections, workdir)
        cpu = cpu_seconds(process.pid) - cpu_before
        await asyncio.sleep(0.5)
        written: int | None = None
        if kind == "naive":
            written = await topic_records(bootstrap, topic) - records_before
    return Result(target, load, cpu, written)


# -- the report ---------------------------------------------------------------------------


def table(results: Sequence[Result], connections: int) -> None:
    rows = [
        (
            "target",
            "callbacks/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "server CPU %",
            "generator CPU %",
            "sent",
            "200",
            "refused",
            "errors",
            "records",
            "ledger",
        )
    ]
    for r in results:
        load = r.load
        void = r.void()
        rows.append(
            (
                r.target,
                f"{r.rate:,.0f}",
                f"{load.p50_ms:.2f}",
                f"{load.p99_ms:.2f}",
                f"{load.p999_ms:.2f}",
                f"{r.server_cpu_s / load.seconds * 100:.0f}",
                f"{load.generator_cpu_s / load.seconds * 100:.0f}",
                f"{load.sent:,}",
                f"{load.accepted:,}",
                f"{load.refused:,}",
                f"{load.errors:,}",
                "-" if r.records is None else f"{r.records:,}",
                "ok" if void is None else "VOID",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print(
            "  ".join(
                f"{cell:<{widths[i]}}" if i == 0 else f"{cell:>{widths[i]}}"
                for i, cell in enumerate(row)
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))
    by = {r.target: r for r in results}
    receiver = by.get("receiver")
    print()
    for other in ("naive-fast", "naive-plain", "bare-fast", "bare-plain"):
        if receiver is not None and other in by and by[other].rate:
            print(f"ratio receiver / {other}: {receiver.rate / by[other].rate:.2f}")
    if "naive-fast" in by and "bare-fast" in by and by["bare-fast"].rate:
        print(f"ratio naive-fast / bare-fast: {by['naive-fast'].rate / by['bare-fast'].rate:.2f}")
    for r in results:
        void = r.void()
        if void:
            print(f"VOID {r.target}: {void}")
    gen = results[0].load.generator if results else "-"
    print(f"\n{connections} connections, generator {gen}; {environment()}")


def environment() -> str:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return f"{os.cpu_count()} CPUs ({model}), Python {sys.version.split()[0]}"


async def measure(args: argparse.Namespace, targets: Sequence[str]) -> list[Result]:
    bodies = lunpay_bodies(BODIES)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        async with embedded_broker() as broker:
            for target in targets:
                print(f"measuring {target} for {args.duration:g}s ...", flush=True)
                results.append(
                    await measure_target(target, broker.bootstrap_servers, bodies, args, Path(tmp))
                )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds a target (10)")
    parser.add_argument("-c", "--connections", type=int, default=32, help="connections (32)")
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated, of {', '.join(TARGETS)} (all)",
    )
    parser.add_argument(
        "--generator",
        choices=["auto", "wrk", "own"],
        default="auto",
        help="wrk if installed (auto), or the asyncio one",
    )
    parser.add_argument("--phase", choices=["app", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--bodies", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase == "app":
        phase_app(args.kind, args.fast, args.port, args.bootstrap, args.topic)
        return
    if args.phase == "load":
        bodies = [b.encode() for b in json.loads(Path(args.bodies).read_text(encoding="utf-8"))]
        if fast_available():
            import uvloop

            uvloop.install()
        got = asyncio.run(own_load(args.port, bodies, args.duration, args.connections))
        print(json.dumps(got), flush=True)
        return

    if args.duration <= 0 or args.connections < 1:
        parser.error("--duration and --connections must be positive")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets: {', '.join(unknown)}")
    if not fast_available():
        skipped = [t for t in targets if t.endswith("-fast")]
        if skipped:
            print(f"uvloop/httptools not installed: skipping {', '.join(skipped)}")
        targets = [t for t in targets if not t.endswith("-fast")]
    if args.generator == "auto":
        args.generator = "wrk" if shutil.which("wrk") else "own"
    elif args.generator == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk), use --generator own")
    print(f"generator: {args.generator}", flush=True)
    results = asyncio.run(measure(args, targets))
    table(results, args.connections)
    if any(r.void() for r in results):
        raise SystemExit("VOID: a ledger did not balance")


if __name__ == "__main__":
    main()
