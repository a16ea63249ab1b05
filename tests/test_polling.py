"""Polling: every order the bridge has heard of reaches a final event, callbacks or not."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections import defaultdict

from bridge.config import KafkaSettings, PollSettings
from bridge.kafka import ensure_topics
from bridge.service import Bridge
from tests.bridge_fixtures import bridge_config, running_bridge
from tests.conftest import RunningSandbox
from tests.kafka import read_topic

FAST = PollSettings(intervals=(0.3,), max_age=3600.0, not_found_retries=3)
# Rate limits out of the way, for tests about something else.
UNLIMITED = {p: {"query_rate": 1000.0, "query_burst": 100} for p in ("lemft", "lunpay", "kasushou")}


async def queries_reach(
    sandbox: RunningSandbox, account: str, order_id: str | None = None, *, count: int
) -> None:
    """Waits (20 s at most) until the sandbox has had `count` such queries."""
    await asyncio.wait_for(sandbox.sandbox.wait_for_queries(account, order_id, count=count), 20)


async def test_an_order_whose_callback_never_comes_is_published_by_a_poll(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    async with running_bridge(sandbox, kafka_settings, polling=FAST) as bridge:
        order_id, key = bridge.create("lemft", "processing")
        await bridge.post_callback("lemft", order_id)
        await bridge.events_for(key, 1)
        bridge.move("lemft", order_id, "succeeded")  # and no callback ever says so
        first, second = await bridge.events_for(key, 2)
    assert (first.value["trigger"], first.value["status"]) == ("callback", "processing")
    assert (second.value["trigger"], second.value["status"]) == ("poll", "succeeded")
    assert second.value["previous_status"] == "processing"


async def test_a_watched_order_is_followed_to_final_and_then_left_alone(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    async with running_bridge(sandbox, kafka_settings, polling=FAST) as bridge:
        order_id, key = bridge.create("lunpay", "processing")
        assert (await bridge.watch("lunpay", order_id)).status_code == 202
        await bridge.events_for(key, 1)
        # Asked again while unfinished...
        await queries_reach(sandbox, "lunpay-test", order_id, count=3)
        bridge.move("lunpay", order_id, "succeeded")
        events = await bridge.events_for(key, 2)
        asked = sandbox.sandbox.query_count("lunpay-test", order_id)
        # ...and not once more after its final event.
        await bridge.status.quiet(1.5)
        assert sandbox.sandbox.query_count("lunpay-test", order_id) == asked
    assert [(e.value["trigger"], e.value["status"]) for e in events] == [
        ("watch", "processing"),
        ("poll", "succeeded"),
    ]


async def test_polls_survive_a_restart(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    async with running_bridge(sandbox, kafka_settings, polling=FAST) as first:
        order_id, key = first.create("kasushou", "processing")
        await first.watch("kasushou", order_id)
        await first.events_for(key, 1)
    first.move("kasushou", order_id, "succeeded")  # while no bridge runs
    async with running_bridge(sandbox, kafka_settings, polling=FAST) as second:
        events = await second.events_for(key, 2)
    assert [(e.value["trigger"], e.value["status"]) for e in events] == [
        ("watch", "processing"),
        ("poll", "succeeded"),
    ]


async def test_two_workers_never_poll_the_same_order(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    config = bridge_config(
        sandbox, kafka_settings, polling=PollSettings(intervals=(0.2,)), accounts=UNLIMITED
    )
    box = sandbox.sandbox
    orders = [box.create_order("lunpay-test", status=2).order_id for _ in range(12)]
    async with (
        running_bridge(
            sandbox, kafka_settings, with_worker=False, polling=FAST, accounts=UNLIMITED
        ) as receiver,
        Bridge(config, receiver=False),
    ):
        for order_id in orders:
            assert (await receiver.watch("lunpay", order_id)).status_code == 202
        await receiver.status.wait_for_count(len(orders))
        async with Bridge(config, receiver=False) as second:
            # Both members joined one generation: from here on the group is steady.
            steady = len(box.queries)
            await queries_reach(sandbox, "lunpay-test", count=steady + 6 * len(orders))
            assert second.worker is not None
    clients: dict[str, set[str]] = defaultdict(set)
    for query in box.queries[steady:]:
        for order_id in query.order_ids:
            clients[order_id].add(query.client)
    assert set(clients) == set(orders)
    assert all(len(asking) == 1 for asking in clients.values()), clients
    assert len(set(itertools.chain(*clients.values()))) == 2, "both workers poll"


async def test_the_rate_limit_holds_under_a_burst(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    rate, burst = 5.0, 2
    limited = {"lemft": {"query_rate": rate, "query_burst": burst}}
    async with running_bridge(sandbox, kafka_settings, polling=FAST, accounts=limited) as bridge:
        keys = []
        for _ in range(12):
            order_id, key = bridge.create("lemft", "succeeded")
            assert (await bridge.post_callback("lemft", order_id)).status_code == 200
            keys.append(key)
        await bridge.status.wait_for(lambda rs: {r.key for r in rs} >= set(keys), timeout=30)
    times = sorted(q.received_at for q in sandbox.sandbox.queries if q.account == "lemft-test")
    assert len(times) >= len(keys)
    for i, j in itertools.combinations(range(len(times)), 2):
        # No stretch of time saw more queries than the bucket allows (+1 for timing slack).
        assert j - i + 1 <= burst + rate * (times[j] - times[i]) + 1, (i, j, times)


async def test_kasushou_polls_are_batched(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    # A tight rate makes due polls pile up, as they do in production.
    slow = {"kasushou": {"query_rate": 2.0, "query_burst": 1}}
    polling = PollSettings(intervals=(1.0,))
    async with running_bridge(sandbox, kafka_settings, polling=polling, accounts=slow) as bridge:
        keys = {}
        for _ in range(30):
            order_id, key = bridge.create("kasushou", "processing")
            keys[order_id] = key
            await bridge.watch("kasushou", order_id)
        await bridge.status.wait_for_count(30, timeout=30)
        asked_before = len(sandbox.sandbox.queries)
        for order_id in keys:
            bridge.move("kasushou", order_id, "succeeded")
        await bridge.status.wait_for_count(60, timeout=30)
    polls = [q for q in sandbox.sandbox.queries[asked_before:] if q.outcome == "ok"]
    polled = sum(len(q.order_ids) for q in polls)
    assert polled >= 30
    assert len(polls) < polled, "fewer calls than orders"
    assert max(len(q.order_ids) for q in polls) <= 20


async def test_an_order_never_final_ends_in_the_dead_letter_topic(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    short_lived = PollSettings(intervals=(0.2,), max_age=1.0)
    async with running_bridge(sandbox, kafka_settings, polling=short_lived) as bridge:
        order_id, key = bridge.create("lemft", "processing")
        await bridge.watch("lemft", order_id)
        (record,) = await bridge.deadletter.wait_for(
            lambda rs: any(r.key == key for r in rs), what="a stale record"
        )
        asked = sandbox.sandbox.query_count("lemft-test", order_id)
        await bridge.status.quiet(1.0)
        assert sandbox.sandbox.query_count("lemft-test", order_id) == asked
    assert record.value["reason"] == "stale"
    assert "still processing" in record.value["detail"]
    assert record.value["order_id"] == order_id


async def test_a_watched_order_the_provider_does_not_know_yet(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    async with running_bridge(sandbox, kafka_settings, polling=FAST) as bridge:
        await bridge.watch("kasushou", "D-CREATED-LATER")
        await bridge.watch("kasushou", "D-NEVER")
        await queries_reach(sandbox, "kasushou-test", "D-CREATED-LATER", count=2)
        _, key = bridge.create("kasushou", "succeeded", order_id="D-CREATED-LATER")
        (event,) = await bridge.events_for(key, 1)
        (record,) = await bridge.deadletter.wait_for(
            lambda rs: any(r.value["order_id"] == "D-NEVER" for r in rs), what="not found"
        )
    assert (event.value["trigger"], event.value["status"]) == ("poll", "succeeded")
    assert record.value["reason"] == "not_found"
    # Given up on by a poll; the record names the order, so it can be replayed.
    assert record.value["record"]["trigger"] == "poll"
    assert record.value["record"]["order_id"] == "D-NEVER"
    asked = sandbox.sandbox.query_count("kasushou-test", "D-NEVER")
    assert asked == FAST.not_found_retries + 1


async def test_an_order_no_longer_followed_is_forgotten_after_a_while(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    polling = PollSettings(intervals=(0.3,), forget_after=0.5)
    async with (
        running_bridge(sandbox, kafka_settings, polling=polling) as bridge,
        read_topic(kafka_settings, kafka_settings.state_topic) as state,
    ):
        order_id, key = bridge.create("lemft", "succeeded")
        await bridge.post_callback("lemft", order_id)
        await bridge.events_for(key, 1)
        await state.wait_for(
            lambda rs: any(r.key == key and r.value is None for r in rs), what="a tombstone"
        )
        # A callback for an order forgotten starts it afresh.
        await bridge.post_callback("lemft", order_id)
        first, second = await bridge.events_for(key, 2)
    assert second.value["previous_status"] is None
    assert second.headers["ce_id"] == first.headers["ce_id"]


async def test_an_order_of_an_account_no_longer_configured_is_forgotten(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    polling = PollSettings(intervals=(0.3,), forget_after=0.5)
    await ensure_topics(kafka_settings)
    async with read_topic(kafka_settings, kafka_settings.state_topic) as state:
        async with running_bridge(sandbox, kafka_settings, polling=polling) as bridge:
            order_id, key = bridge.create("lemft", "processing")
            await bridge.watch("lemft", order_id)
            await state.wait_for(lambda rs: any(r.key == key for r in rs), what="its state")
        config = bridge_config(sandbox, kafka_settings, polling=polling)
        without_lemft = tuple(a for a in config.accounts if a.provider != "lemft")
        async with Bridge(dataclasses.replace(config, accounts=without_lemft)):
            await state.wait_for(
                lambda rs: any(r.key == key and r.value is None for r in rs), what="a tombstone"
            )


async def test_polls_at_the_last_interval_that_change_nothing_write_no_state_record(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    polling = PollSettings(intervals=(0.1, 0.2), max_age=3600.0)
    async with (
        running_bridge(sandbox, kafka_settings, polling=polling, accounts=UNLIMITED) as bridge,
        read_topic(kafka_settings, kafka_settings.state_topic) as state,
    ):
        order_id, key = bridge.create("lemft", "processing")
        await bridge.watch("lemft", order_id)
        await bridge.events_for(key, 1)
        await queries_reach(sandbox, "lemft-test", order_id, count=8)
        bridge.move("lemft", order_id, "succeeded")
        await bridge.events_for(key, 2)
        await state.wait_for(
            lambda rs: any(r.key == key and r.value["next_poll_at"] is None for r in rs),
            what="the final state record",
        )
        records = [r for r in state.records if r.key == key]
    # The watch's, the first poll's (from the first interval to the last), the final
    # one's; none for the polls at the last interval that found nothing new.
    assert len(records) == 3, [r.value for r in records]
