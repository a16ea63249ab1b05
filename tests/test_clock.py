"""The bridge's fast time and id texts equal what the standard library writes."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from bridge.clock import iso, iso_from_epoch
from bridge.events import _EVENT_NAMESPACE, uuid5


def _stdlib_iso(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_epochs_are_written_as_datetime_writes_them() -> None:
    rng = random.Random(7)
    epochs = [rng.uniform(0, 4e9) for _ in range(20_000)]
    # Where rounding to the microsecond carries into the millisecond or the second.
    edges = [int(e) + f for e in epochs[:500] for f in (0.9999995, 0.0009995, 5e-7, 0.0)]
    for epoch in [*epochs, *edges, 0.0, 86_399.9999996]:
        assert iso_from_epoch(epoch) == _stdlib_iso(epoch), epoch


@pytest.mark.parametrize("offset", [timedelta(0), timedelta(hours=9), timedelta(hours=-5)])
def test_datetimes_are_written_in_utc(offset: timedelta) -> None:
    moment = datetime(2026, 12, 3, 8, 59, 59, 999_999, tzinfo=UTC)
    assert iso(moment.astimezone(timezone(offset))) == "2026-12-03T08:59:59.999Z"
    assert iso(moment) == "2026-12-03T08:59:59.999Z"


def test_event_ids_are_the_standard_uuid5() -> None:
    rng = random.Random(5)
    for _ in range(2_000):
        name = "".join(rng.choice("ab/\n1é😀") for _ in range(rng.randrange(60)))
        assert uuid5(name) == str(uuid.uuid5(_EVENT_NAMESPACE, name))
