"""A forged-callback flood must not become a query flood (issue 8, D13).

lemft and lunpay callbacks carry no signature, so anyone can post them. Hints for an
order whose query is queued or running share the next query (coalescing); past
`[worker] unverified_hints_per_minute` an account's unverified hints wait for their
order's poll, and polls wait behind hints. Measured where a user would: HTTP answers,
the sandbox's query log, the status topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from bridge.config import HttpSettings, KafkaSettings, PollSettings
from bridge.kafka import stop_consumer
from bridge.sandbox import Faults
from bridge.service import Bridge
from tests.bridge_fixtures import CODES, RunningBridge, bridge_config
from tests.conftest import RunningSandbox
from tests.kafka import Record, read_topic

# No poll comes due within a test: every query the sandbox logs was asked for by a hint,
# unless the flood guard made it a poll.
NO_POLLS = PollSettings(intervals=(60.0,), max_age=3600.0)
FLOOD = 500
LATENCY = 0.2


@contextlib.asynccontextmanager
async def flood_bridge(
    sandbox: RunningSandbox,
    kafka: KafkaSettings,
    *,
    worker: Mapping[str, Any] | None = None,
    polling: PollSettings = NO_POLLS,
    accounts: Mapping[str, Mapping[str, Any]] | None = None,
) -> AsyncIterator[RunningBridge]:
    """`running_bridge`, with the inbox timeout at its default (5 s) instead of the tests'
    2 s: hundreds of callbacks at once on a busy 2-core machine can take longer than 2 s
    to be acked, and then they are rightly answered 503."""
    config = bridge_config(sandbox, kafka, worker=worker, polling=polling, accounts=accounts)
    config = dataclasses.replace(
        config, http=dataclasses.replace(config.http, inbox_timeout=HttpSettings().inbox_timeout)
    )
    async with (
        Bridge(config) as bridge,
        httpx.AsyncClient(timeout=10) as http,
        read_topic(kafka, kafka.status_topic) as status,
        read_topic(kafka, kafka.deadletter_topic) as deadletter,
    ):
        yield RunningBridge(bridge, sandbox, http, status, deadletter)


@contextlib.asynccontextmanager
async def group_offsets(kafka: KafkaSettings, group: str) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer that only reads the committed offsets of the workers' group (it never
    joins the group: it subscribes to nothing)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        yield consumer
    finally:
        await stop_consumer(consumer)


async def inbox_done(bridge: RunningBridge, kafka: KafkaSettings, timeout: float) -> None:
    """Waits until the workers have committed every inbox record: every hint is done (a
    record's offset is committed only once its hint is finished). Call it once every
    callback is answered."""
    async with read_topic(kafka, kafka.inbox_topic) as inbox:
        # Whatever was stored arrived by now; a moment more for a late 503'd write.
        stored = await inbox.quiet(0.5)
    ends: dict[int, int] = {}
    for record in stored:
        ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
    group = bridge.bridge.config.worker.group_id
    async with group_offsets(kafka, group) as offsets:
        tps = {TopicPartition(kafka.inbox_topic, p): end for p, end in ends.items()}
        deadline = time.monotonic() + timeout
        while True:
            committed = {tp: await offsets.committed(tp) or 0 for tp in tps}
            lag = {tp.partition: end - committed[tp] for tp, end in tps.items()}
            if all(n <= 0 for n in lag.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"inbox not done after {timeout}s: lag by partition {lag}")
            await asyncio.sleep(0.1)  # re-reads the offsets; the deadline bounds it


# Posts each of the bodies it reads (a JSON list of strings) over 50 kept-alive
# connections at once, from a process of its own: a flood comes from outside, and the
# bridge keeps the test's event loop to itself. Plain HTTP/1.1 on asyncio streams, as
# httpx's pool spends more CPU than the bridge under this load. Prints "half" once half
# of them are answered, then {status code: count} as JSON.
FLOODER = """
import asyncio, collections, json, sys, urllib.parse

async def main(url, content_type, bodies):
    target = urllib.parse.urlsplit(url)
    count, answers, todo = len(bodies), collections.Counter(), list(reversed(bodies))

    async def connection():
        reader, writer = await asyncio.open_connection(target.hostname, target.port)
        while todo:
            body = todo.pop().encode()
            head = (
                f"POST {target.path} HTTP/1.1\\r\\nhost: {target.netloc}\\r\\n"
                f"content-type: {content_type}\\r\\ncontent-length: {len(body)}\\r\\n\\r\\n"
            )
            writer.write(head.encode() + body)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\\r\\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            answers[status] += 1
            if sum(answers.values()) == count // 2:
                print("half", flush=True)
        writer.close()

    await asyncio.gather(*(connection() for _ in range(50)))
    print(json.dumps(answers), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], json.load(sys.stdin)))
"""


class Flood:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    async def _line(self) -> str:
        assert self._process.stdout is not None
        line = await asyncio.wait_for(self._process.stdout.readline(), 30)
        assert line, "the flooder ended early"
        return line.decode().strip()

    async def half_way(self) -> None:
        assert await self._line() == "half"

    async def answers(self) -> dict[int, int]:
        """How many callbacks got each HTTP status, once all are answered."""
        counts = json.loads(await self._line())
        return {int(status): n for status, n in counts.items()}


@contextlib.asynccontextmanager
async def flooding(url: str, bodies: list[bytes], content_type: str) -> AsyncIterator[Flood]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        FLOODER,
        url,
        content_type,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None
    process.stdin.write(json.dumps([body.decode() for body in bodies]).encode())
    process.stdin.close()
    try:
        yield Flood(process)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


def chain(events: list[Record]) -> list[tuple[str | None, str, str]]:
    return [(e.value["previous_status"], e.value["status"], e.value["trigger"]) for e in events]


async def test_a_flood_of_forged_callbacks_for_one_order_costs_a_handful_of_queries(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    box, account = sandbox.sandbox, "lunpay-test"
    # The cap is far below the flood: were each forged hint to take a share of it, the
    # real order's callback below would become a poll.
    worker = {"unverified_hints_per_minute": 100}
    async with flood_bridge(sandbox, kafka_settings, worker=worker) as bridge:
        flooded, flooded_key = bridge.create("lunpay", "processing")
        assert (await bridge.post_callback("lunpay", flooded)).status_code == 200
        await bridge.events_for(flooded_key, 1)
        real, real_key = bridge.create("lunpay", "succeeded")
        box.set_faults(account, Faults(latency=LATENCY))

        asked_before = box.query_count(account, flooded)
        # Claims a success the provider has not seen (yet).
        forged, content_type = box.callback(account, flooded, status=CODES["lunpay"]["succeeded"])
        started = time.monotonic()
        url = bridge.callback_url("lunpay")
        async with flooding(url, [forged] * FLOOD, content_type) as flood:
            await flood.half_way()
            # Mid-flood: the order really succeeds, and a real order's callback comes.
            bridge.move("lunpay", flooded, "succeeded")
            posted = time.monotonic()
            assert (await bridge.post_callback("lunpay", real)).status_code == 200
            (real_event,) = await bridge.events_for(real_key, 1, timeout=20)
            real_latency = time.monotonic() - posted
            answers = await flood.answers()
        flood_took = time.monotonic() - started

        await inbox_done(bridge, kafka_settings, timeout=20)
        asked = box.query_count(account, flooded) - asked_before
        events = [r for r in await bridge.status.quiet(0.3) if r.key == flooded_key]

    print(  # the figures, for `pytest -s`
        f"\n{FLOOD} forged callbacks: {asked} queries for the order; real order's "
        f"callback-to-event {real_latency:.2f}s; the flood was answered in {flood_took:.2f}s; "
        f"answers {answers}"
    )
    assert answers == {200: FLOOD}
    # One event per real change, the last one confirmed after the move.
    assert chain(events) == [
        (None, "processing", "callback"),
        ("processing", "succeeded", "callback"),
    ]
    # Without coalescing: 500 queries, 100 s at 0.2 s each (the order's hints run in turn).
    assert asked <= 15, asked
    assert real_event.value["trigger"] == "callback"
    # Queued behind the flood it would wait ~FLOOD * LATENCY / 2 = 50 s; 5 s leaves room
    # for a busy machine.
    assert real_latency < 5.0, real_latency


def forged_lemft(template: bytes, order_id: str) -> bytes:
    """A lemft callback for `order_id`, shaped like a real one."""
    fields = json.loads(template)
    fields["order_id"] = order_id
    return json.dumps(fields).encode()


async def test_unverified_hints_past_the_cap_become_polls_behind_the_hints(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    box, account, cap = sandbox.sandbox, "lemft-test", 20
    # 40 orders that exist, 160 ids that do not: callbacks for all 200, well past the cap.
    succeeded = CODES["lemft"]["succeeded"]
    real = [box.create_order(account, status=succeeded).order_id for _ in range(40)]
    template, content_type = box.callback(account, real[0])
    fake = [f"ord_forged{i:04d}" for i in range(160)]
    ids = [order_id for pair in zip(real, fake[:40], strict=True) for order_id in pair]
    ids += fake[40:]
    watched = box.create_order(account, status=CODES["lemft"]["succeeded"]).order_id

    async with flood_bridge(
        sandbox,
        kafka_settings,
        polling=PollSettings(intervals=(0.5,), max_age=3600.0, not_found_retries=0),
        worker={"unverified_hints_per_minute": cap},
        accounts={"lemft": {"query_rate": 20.0, "query_burst": 5}},
    ) as bridge:
        started = len(box.queries)
        bodies = [forged_lemft(template, order_id) for order_id in ids]
        async with flooding(bridge.callback_url("lemft"), bodies, content_type) as flood:
            await flood.half_way()
            answers = await flood.answers()
        # A watch request is not a callback: the cap does not apply, and it goes before
        # the polls the flood became.
        posted = time.monotonic()
        assert (await bridge.watch("lemft", watched)).status_code == 202
        watch_key = f"lemft/{account}/{watched}"
        await bridge.events_for(watch_key, 1, timeout=20)
        watch_latency = time.monotonic() - posted
        keys = {f"lemft/{account}/{order_id}" for order_id in real}
        records = await bridge.status.wait_for(
            lambda rs: {r.key for r in rs} >= keys, timeout=30, what="every real order's event"
        )
        first_seconds = [q for q in box.queries[started:] if q.received_at <= posted + 1.0]

    events = [r for r in records if r.key in keys]
    triggers = [e.value["trigger"] for e in events]
    log = [q.order_ids[0] for q in box.queries[started:] if q.account == account]
    watch_position = log.index(watched)
    print(  # the figures, for `pytest -s`
        f"\n{len(ids)} forged callbacks, cap {cap}: triggers {sorted(triggers)}; watch "
        f"confirmed in {watch_latency:.2f}s as query #{watch_position + 1} of {len(log)}; "
        f"{len(first_seconds)} queries by 1 s after the flood"
    )
    assert answers == {200: len(ids)}
    assert len(events) == len(keys)  # one each: they were final from the start
    assert all(e.value["status"] == "succeeded" for e in events)
    # At most `cap` hints got a query of their own; the others waited for a poll.
    assert triggers.count("callback") <= cap, triggers
    assert triggers.count("poll") >= len(keys) - cap, triggers
    assert set(triggers) <= {"callback", "poll"}
    # Polls wait behind hints: the watch, posted after the flood, was among the first
    # queries (behind at most the capped hints and the queries already under way), not
    # behind the ~180 polls; without the cap it would wait for ~200 queries, 10 s.
    assert watch_position < cap + 10, watch_position
    assert watch_latency < 4.0, watch_latency


async def test_signed_kasushou_callbacks_are_never_capped(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    box, cap = sandbox.sandbox, 2
    orders = {
        provider: [
            box.create_order(account.name, status=CODES[provider]["succeeded"]).order_id
            for _ in range(8)
        ]
        for provider, account in sandbox.accounts.items()
        if provider in ("kasushou", "lunpay")
    }
    async with flood_bridge(
        sandbox,
        kafka_settings,
        polling=PollSettings(intervals=(0.3,), max_age=3600.0),
        worker={"unverified_hints_per_minute": cap},
    ) as bridge:
        for provider, ids in orders.items():
            for order_id in ids:
                assert (await bridge.post_callback(provider, order_id)).status_code == 200
        records = await bridge.status.wait_for_count(16, timeout=20)
    triggers = {
        provider: sorted(r.value["trigger"] for r in records if r.value["provider"] == provider)
        for provider in orders
    }
    assert triggers["kasushou"] == ["callback"] * 8  # signed: each gets its own query
    # The same number of unsigned callbacks, in the same minute: the cap holds for them.
    assert triggers["lunpay"].count("callback") <= cap, triggers
    assert triggers["lunpay"].count("poll") >= 8 - cap, triggers


async def test_a_known_orders_callback_is_not_delayed_by_a_flood_of_forged_ids(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    box, account, cap = sandbox.sandbox, "lemft-test", 20
    known = box.create_order(account, status=CODES["lemft"]["processing"]).order_id
    template, content_type = box.callback(account, known)
    bodies = [forged_lemft(template, f"ord_forged{i:04d}") for i in range(200)]
    async with flood_bridge(
        sandbox,
        kafka_settings,
        polling=PollSettings(intervals=(60.0,), max_age=3600.0, not_found_retries=0),
        worker={"unverified_hints_per_minute": cap},
        accounts={"lemft": {"query_rate": 20.0, "query_burst": 5}},
    ) as bridge:
        key = f"lemft/{account}/{known}"
        assert (await bridge.post_callback("lemft", known)).status_code == 200
        await bridge.events_for(key, 1)
        async with flooding(bridge.callback_url("lemft"), bodies, content_type) as flood:
            await flood.half_way()
            assert await flood.answers() == {200: len(bodies)}
        # The order the bridge follows really moves on, and its callback says so.
        bridge.move("lemft", known, "succeeded")
        posted = time.monotonic()
        assert (await bridge.post_callback("lemft", known)).status_code == 200
        _, final = await bridge.events_for(key, 2, timeout=20)
        latency = time.monotonic() - posted
    print(f"\nknown order's callback after a capped flood: {latency:.2f}s")
    assert final.value["status"] == "succeeded"
    assert latency < 3.0, latency
