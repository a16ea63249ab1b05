"""The worker's pure parts: offsets, per-order lanes, the publish decision, event ids."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest

from bridge.events import StatusEvent
from bridge.inbox import InboxRecord
from bridge.metrics import Metrics
from bridge.orders import OrderSnapshot, ProviderStatus, Status
from bridge.state import OrderState
from bridge.worker.confirm import backoff
from bridge.worker.handler import Decision, decide
from bridge.worker.lanes import OrderLanes
from bridge.worker.offsets import PartitionOffsets
from bridge.worker.polls import PollSchedule


def test_offsets_commit_only_past_finished_records() -> None:
    offsets = PartitionOffsets()
    assert offsets.to_commit() is None
    for offset in (10, 11, 12):
        offsets.started(offset)
    offsets.finished(11)
    assert offsets.to_commit() == 10
    offsets.finished(10)
    assert offsets.to_commit() == 12
    offsets.committed(12)
    assert offsets.to_commit() is None
    offsets.finished(12)
    assert offsets.to_commit() == 13
    assert offsets.in_flight == 0


async def test_lanes_keep_one_keys_jobs_in_order_and_run_keys_concurrently() -> None:
    log: list[str] = []
    gate = asyncio.Event()

    def job(name: str, wait: bool = False) -> object:
        async def run() -> None:
            if wait:
                await gate.wait()
            log.append(name)

        return run

    lanes = OrderLanes()
    lanes.submit("a", job("a1", wait=True))  # type: ignore[arg-type]
    lanes.submit("a", job("a2"))  # type: ignore[arg-type]
    lanes.submit("b", job("b1"))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert log == ["b1"]  # b is not held up by a's slow job
    gate.set()
    assert await lanes.drain(5) == 0
    assert log == ["b1", "a1", "a2"]
    assert len(lanes) == 0


async def test_a_failing_job_does_not_strand_the_next() -> None:
    done: list[str] = []

    async def fail() -> None:
        raise RuntimeError("boom")

    async def ok() -> None:
        done.append("ok")

    lanes = OrderLanes()
    lanes.submit("a", fail)
    lanes.submit("a", ok)
    await lanes.drain(5)
    assert done == ["ok"]


async def test_drain_cancels_what_does_not_finish_in_time() -> None:
    lanes = OrderLanes()
    lanes.submit("a", asyncio.Event().wait)  # type: ignore[arg-type]
    assert await lanes.drain(0.05) == 1
    assert len(lanes) == 0


def snapshot(status: Status, code: int | str = 1) -> OrderSnapshot:
    return OrderSnapshot(
        provider="lunpay",
        account="lp",
        order_id="O-1",
        external_order_id="",
        status=status,
        provider_status=ProviderStatus(code, "x"),
        amount=Decimal("0.40"),
        currency="USD",
    )


def state(status: Status, code: int | str = 1, highest: Status | None = None) -> OrderState:
    return OrderState(
        first_seen=0.0, status=status, code=code, event_id="e", published_at=1.0, highest=highest
    )


@pytest.mark.parametrize(
    ("previous", "new", "decision"),
    [
        (None, snapshot(Status.PENDING), Decision.PUBLISH),
        (state(Status.PENDING), snapshot(Status.PENDING), Decision.UNCHANGED),
        (state(Status.PENDING), snapshot(Status.PROCESSING, 2), Decision.PUBLISH),
        (state(Status.PROCESSING, 2), snapshot(Status.ON_HOLD, 3), Decision.PUBLISH),
        (state(Status.ON_HOLD, 3), snapshot(Status.PROCESSING, 2), Decision.PUBLISH),
        (state(Status.PROCESSING, 0), snapshot(Status.PROCESSING, 2), Decision.PUBLISH),
        (state(Status.SUCCEEDED, 4), snapshot(Status.PROCESSING, 2), Decision.STALE),
        (state(Status.REFUNDED, 6), snapshot(Status.SUCCEEDED, 4), Decision.STALE),
        (state(Status.SUCCEEDED, 4), snapshot(Status.CANCELLED, 5), Decision.PUBLISH),
        (state(Status.REFUNDED, 6), snapshot(Status.UNKNOWN, 42), Decision.PUBLISH),
        (state(Status.UNKNOWN, 42), snapshot(Status.UNKNOWN, 42), Decision.UNCHANGED),
        (state(Status.UNKNOWN, 42), snapshot(Status.PENDING, 1), Decision.PUBLISH),
        # `unknown` in between never reopens a lower rank than the highest published.
        (state(Status.UNKNOWN, 42, Status.SUCCEEDED), snapshot(Status.PROCESSING), Decision.STALE),
        (state(Status.UNKNOWN, 42, Status.SUCCEEDED), snapshot(Status.FAILED), Decision.PUBLISH),
        (state(Status.UNKNOWN, 42, Status.SUCCEEDED), snapshot(Status.REFUNDED), Decision.PUBLISH),
    ],
)
def test_status_moves_forward_only(
    previous: OrderState | None, new: OrderSnapshot, decision: Decision
) -> None:
    assert decide(previous, new) is decision


def event(previous_event_id: str | None, status: Status = Status.SUCCEEDED) -> StatusEvent:
    return StatusEvent(
        snapshot=snapshot(status, 4),
        previous_status=Status.PROCESSING,
        previous_event_id=previous_event_id,
        trigger="callback",
        observed_at=datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC),
    )


def test_event_id_is_deterministic_per_change() -> None:
    assert event("prev").id == event("prev").id
    assert event("prev").id != event("other").id
    assert event("prev").id != event("prev", Status.FAILED).id


def test_event_value_and_headers() -> None:
    e = event(None)
    value = orjson.loads(e.value())
    assert value["amount"] == "0.40"
    assert value["observed_at"] == "2026-11-22T10:00:00.123Z"
    assert value["previous_status"] == "processing"
    headers = dict(e.headers())
    assert list(headers) == [
        "ce_specversion",
        "ce_id",
        "ce_source",
        "ce_type",
        "ce_subject",
        "ce_time",
        "ce_dataschema",
        "content-type",
    ]
    assert headers["ce_time"] == b"2026-11-22T10:00:00.123Z"
    assert headers["ce_id"] == e.id.encode()
    assert headers["ce_dataschema"] == b"urn:order-bridge:schema:order-status-event:v1"


def test_inbox_record_round_trip_and_rejects_garbage() -> None:
    record = InboxRecord("kasushou", "k", "D1", "callback", "2026-11-22T10:00:00.000Z", body="x")
    assert InboxRecord.decode(record.encode()) == record
    # to_json names each field itself: one added to the class must be written too.
    full = InboxRecord(
        "lemft", "l", "L1", "watch", "2026-11-22T10:00:00.000Z", "application/json", "{}",
        {"user-agent": "ua"}, "paid", "md5",
    )  # fmt: skip
    assert full.to_json() == {"version": InboxRecord.VERSION, **dataclasses.asdict(full)}
    assert InboxRecord.decode(full.encode()) == full
    for garbage in (b"", b"[]", b'{"provider": "k"}', b'{"provider":"k","account":"a",'
                    b'"order_id":"o","trigger":"nope","received_at":"t"}'):  # fmt: skip
        with pytest.raises(ValueError, match="not an inbox record"):
            InboxRecord.decode(garbage)


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (10, 30.0)):
        delay = backoff(attempt, 1.0, 30.0)
        assert ceiling / 2 <= delay <= ceiling


def test_metrics_render_in_prometheus_text_format() -> None:
    metrics = Metrics()
    labels = {"provider": "lemft", "account": 'odd"label\n', "outcome": "accepted"}
    metrics.inc("order_bridge_callbacks_total", **labels)
    metrics.set("order_bridge_breaker_open", 1, provider="lemft", account="a")
    text = metrics.render()
    assert "# TYPE order_bridge_callbacks_total counter" in text
    labelled = 'account="odd\\"label\\n",outcome="accepted",provider="lemft"'
    assert f"order_bridge_callbacks_total{{{labelled}}} 1.0" in text
    assert 'order_bridge_breaker_open{account="a",provider="lemft"} 1.0' in text
    assert metrics.value("order_bridge_callbacks_total", **labels) == 1
    # The same labels in another order count in the same series.
    metrics.inc("order_bridge_callbacks_total", **dict(reversed(labels.items())))
    assert metrics.value("order_bridge_callbacks_total", **labels) == 2
    with pytest.raises(KeyError):
        metrics.inc("no_such_metric")
    metrics.observe("order_bridge_inbox_write_seconds", 0.1, outcome="ok")
    with pytest.raises(TypeError):
        metrics.inc("order_bridge_inbox_write_seconds", outcome="ok")


def test_poll_schedule_takes_due_orders_earliest_first() -> None:
    schedule = PollSchedule()
    schedule.own(0)
    schedule.own(1)
    schedule.set(0, "a", 30.0)
    schedule.set(1, "b", 10.0)
    schedule.set(0, "c", 20.0)
    schedule.set(0, "a", 5.0)  # rescheduled: the old entry no longer counts
    assert schedule.next_due() == 5.0
    assert schedule.due(now=25.0, limit=10) == [(0, "a"), (1, "b"), (0, "c")]
    assert schedule.due(now=100.0, limit=10) == []  # taken orders wait for set()
    assert len(schedule) == 0


def test_poll_schedule_respects_limit_and_stops() -> None:
    schedule = PollSchedule()
    schedule.own(0)
    for n in range(5):
        schedule.set(0, f"o{n}", float(n))
    schedule.set(0, "o0", None)
    assert schedule.due(now=10.0, limit=2) == [(0, "o1"), (0, "o2")]
    assert len(schedule) == 2


def test_poll_schedule_ignores_partitions_it_does_not_own() -> None:
    schedule = PollSchedule()
    schedule.own(0)
    schedule.set(0, "a", 1.0)
    schedule.forget([0])
    schedule.set(0, "b", 1.0)  # work finishing after the hand-over
    schedule.set(7, "c", 1.0)
    assert schedule.due(now=10.0, limit=10) == []
    assert schedule.next_due() is None


def test_the_highest_rank_published_survives_unknown() -> None:
    known = OrderState(first_seen=0.0)
    for status in (Status.PROCESSING, Status.SUCCEEDED, Status.UNKNOWN):
        known = known.published(status, 1, f"id-{status}", 1.0, 0)
    assert (known.status, known.highest) == (Status.UNKNOWN, Status.SUCCEEDED)


def test_state_records_of_other_versions_are_read() -> None:
    newer = {
        "version": 99,
        "first_seen_at": "2026-11-22T10:00:00.000Z",
        "status": "chargeback",  # a status this version does not know
        "highest_status": "refunded",
        "code": 9,
        "event_id": "e9",
        "next_poll_at": None,
        "covered_offset": 41,
        "something_new": {"a": 1},
    }
    state, covered = OrderState.decode(orjson.dumps(newer))
    assert (state.status, state.highest, state.code, covered) == (
        Status.UNKNOWN,
        Status.REFUNDED,
        9,
        41,
    )
    older = {"version": 1, "first_seen_at": "2026-11-22T10:00:00.000Z", "status": "succeeded"}
    state, covered = OrderState.decode(orjson.dumps(older))
    assert (state.status, state.highest, state.polls, covered) == (
        Status.SUCCEEDED,
        Status.SUCCEEDED,
        0,
        None,
    )
    round_trip, _ = OrderState.decode(state.encode(7))
    assert round_trip == state


@pytest.mark.parametrize(
    "value",
    [b"", b"not json", b"[]", b'{"status": "succeeded"}', b'{"first_seen_at": 5}'],
)
def test_unreadable_state_records_are_a_value_error(value: bytes) -> None:
    with pytest.raises(ValueError, match="not a state record"):
        OrderState.decode(value)


@pytest.mark.parametrize(
    ("amount", "text"), [("1E+3", "1000"), ("0.0000001", "0.0000001"), ("375.280", "375.280")]
)
def test_amounts_are_fixed_point_decimal_strings(amount: str, text: str) -> None:
    order = dataclasses.replace(snapshot(Status.SUCCEEDED), amount=Decimal(amount))
    assert order.to_json()["amount"] == text
