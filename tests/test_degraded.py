"""Degraded providers (issue 8, C7): polling never abandons an order it has confirmed.

A provider that suddenly says "not found" for an order it confirmed before, or refuses
the bridge's queries (a key rotated, "system busy"), is having an incident: the order
stays followed, asked again less and less often, and reaches its final event once the
provider answers again. Everything is observed from outside: the sandbox's query log,
the status and dead-letter topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import pytest

from bridge.config import KafkaSettings, PollSettings
from bridge.sandbox import Faults
from bridge.sandbox.book import QueryRecord
from tests.bridge_fixtures import RunningBridge, running_bridge
from tests.conftest import RunningSandbox
from tests.kafka import Record

# Polls back off over these steps. not_found_retries=1: before C7, the second "not
# found" in a row dead-lettered the order and stopped polling it.
BACKING_OFF = PollSettings(intervals=(0.2, 0.4, 0.8), max_age=3600.0, not_found_retries=1)


async def answered(
    sandbox: RunningSandbox,
    account: str,
    order_id: str,
    outcome: str,
    count: int,
    timeout: float = 10.0,
) -> list[QueryRecord]:
    """Waits until the sandbox has answered `count` queries for the order with `outcome`;
    returns those, oldest first."""
    box = sandbox.sandbox

    def matching() -> list[QueryRecord]:
        return [q for q in box.queries if order_id in q.order_ids and q.outcome == outcome]

    deadline = time.monotonic() + timeout
    while len(matching()) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            seen = [(q.outcome, round(q.received_at, 2)) for q in box.queries]
            raise AssertionError(f"{count} {outcome!r} answers for {order_id}; saw {seen}")
        # The account's next query wakes this up; the loop checks it.
        asked = len([q for q in box.queries if q.account == account])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(box.wait_for_queries(account, count=asked + 1), remaining)
    return matching()


def gaps(queries: list[QueryRecord]) -> list[float]:
    times = [q.received_at for q in queries]
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def chain(events: list[Record]) -> list[tuple[str | None, str, str]]:
    return [(e.value["previous_status"], e.value["status"], e.value["trigger"]) for e in events]


async def confirmed_processing(bridge: RunningBridge, provider: str) -> tuple[str, str]:
    """An order at `provider` whose `processing` the bridge has published (by callback)."""
    order_id, key = bridge.create(provider, "processing")
    assert (await bridge.post_callback(provider, order_id)).status_code == 200
    await bridge.events_for(key, 1)
    return order_id, key


@pytest.mark.parametrize("provider", ["lemft", "lunpay", "kasushou"])
async def test_not_found_for_a_confirmed_order_is_a_glitch_and_polling_goes_on(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings, provider: str
) -> None:
    account = sandbox.accounts[provider].name
    async with running_bridge(sandbox, kafka_settings, polling=BACKING_OFF) as bridge:
        order_id, key = await confirmed_processing(bridge, provider)
        sandbox.sandbox.set_faults(account, Faults(missing_ids=(order_id,)))

        # Three "not found" answers in a row: more than not_found_retries allows for an
        # order never confirmed, and still asked again, less and less often.
        missing = await answered(sandbox, account, order_id, "missing", 3)
        # Not asked again at once: it backs off, 0.2 s then 0.4 s. Lower bounds only, less
        # the query's own time: a busy machine makes gaps longer, never shorter.
        first, second = gaps(missing)
        assert first >= 0.15, gaps(missing)
        assert second >= 0.3, gaps(missing)

        # The provider finds it again, and it has moved on meanwhile.
        bridge.move(provider, order_id, "succeeded")
        sandbox.sandbox.set_faults(account, Faults())
        events = await bridge.events_for(key, 2, timeout=10)
        await bridge.deadletter.quiet(0.5)

    assert chain(events) == [(None, "processing", "callback"), ("processing", "succeeded", "poll")]
    assert [r.value["reason"] for r in bridge.deadletter.records if r.key == key] == []


async def test_not_found_for_an_order_never_confirmed_is_still_dead_lettered(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    """The other side of the glitch rule: a watched id the provider never confirmed is
    given up after not_found_retries, as before."""
    async with running_bridge(sandbox, kafka_settings, polling=BACKING_OFF) as bridge:
        assert (await bridge.watch("lunpay", "20990101404")).status_code == 202
        key = "lunpay/lunpay-test/20990101404"
        (letter,) = await bridge.deadletter.wait_for(
            lambda rs: any(r.key == key for r in rs), timeout=10
        )
        asked = sandbox.sandbox.query_count("lunpay-test", "20990101404")
        await bridge.deadletter.quiet(1.0)  # longer than the poll interval it had
        assert sandbox.sandbox.query_count("lunpay-test", "20990101404") == asked
    assert letter.value["reason"] == "not_found"
    assert asked == BACKING_OFF.not_found_retries + 1


async def test_a_permanent_error_on_polls_keeps_the_order_followed_with_one_dead_letter(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    account = "lemft-test"
    async with running_bridge(sandbox, kafka_settings, polling=BACKING_OFF) as bridge:
        order_id, key = await confirmed_processing(bridge, "lemft")
        # lemft answers every query about the order with an error envelope (code 10002).
        sandbox.sandbox.set_faults(account, Faults(refuse_ids=(order_id,)))

        refused = await answered(sandbox, account, order_id, "refused", 4)
        assert min(gaps(refused)) >= 0.15, gaps(refused)  # backing off, not hammering
        assert gaps(refused)[-1] >= 0.6, gaps(refused)
        # One dead letter for the incident, however many polls it lasts.
        (incident,) = await bridge.deadletter.wait_for(
            lambda rs: len([r for r in rs if r.key == key]) >= 1, timeout=5
        )

        bridge.move("lemft", order_id, "succeeded")
        sandbox.sandbox.set_faults(account, Faults())
        events = await bridge.events_for(key, 2, timeout=10)
        await bridge.deadletter.quiet(0.5)

    assert chain(events) == [(None, "processing", "callback"), ("processing", "succeeded", "poll")]
    assert [r.value["reason"] for r in bridge.deadletter.records if r.key == key] == ["rejected"]
    assert incident.value["record"]["trigger"] == "poll"  # replayable: it names the order
    assert "code 10002" in incident.value["detail"]


async def test_a_hint_refused_during_an_incident_is_dead_lettered_on_its_own(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    """Hints are replayable, so each one refused is kept; the polls around it still
    count as the one incident."""
    account = "lunpay-test"
    async with running_bridge(sandbox, kafka_settings, polling=BACKING_OFF) as bridge:
        order_id, key = await confirmed_processing(bridge, "lunpay")
        sandbox.sandbox.set_faults(account, Faults(refuse_ids=(order_id,)))
        await answered(sandbox, account, order_id, "refused", 2)
        assert (await bridge.post_callback("lunpay", order_id)).status_code == 200
        await bridge.deadletter.wait_for(lambda rs: len([r for r in rs if r.key == key]) >= 2)
        before = len(await answered(sandbox, account, order_id, "refused", 3))
        await answered(sandbox, account, order_id, "refused", before + 2)

        bridge.move("lunpay", order_id, "succeeded")
        sandbox.sandbox.set_faults(account, Faults())
        events = await bridge.events_for(key, 2, timeout=10)
        await bridge.deadletter.quiet(0.5)

    assert chain(events) == [(None, "processing", "callback"), ("processing", "succeeded", "poll")]
    letters = [r.value for r in bridge.deadletter.records if r.key == key]
    assert sorted((v["reason"], v["record"]["trigger"]) for v in letters) == [
        ("rejected", "callback"),
        ("rejected", "poll"),
    ]


async def test_a_permanent_error_after_a_transient_one_is_still_dead_lettered(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    """An incident that starts with a 5xx and goes on as a refusal (a provider restarting
    with a rotated key): the refusal needs an operator, so it is dead-lettered once."""
    account = "lemft-test"
    async with running_bridge(sandbox, kafka_settings, polling=BACKING_OFF) as bridge:
        order_id, key = await confirmed_processing(bridge, "lemft")
        sandbox.sandbox.set_faults(account, Faults(error_rate=1.0))
        await answered(sandbox, account, order_id, "fault", 1)
        sandbox.sandbox.set_faults(account, Faults(refuse_ids=(order_id,)))
        await answered(sandbox, account, order_id, "refused", 3)
        letters = await bridge.deadletter.quiet(0.5)
        sandbox.sandbox.set_faults(account, Faults())
    assert [r.value["reason"] for r in letters if r.key == key] == ["rejected"]
