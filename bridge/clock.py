"""Times as the bridge writes them: UTC, ISO 8601, milliseconds, `Z`."""

from __future__ import annotations

import functools
import math
import time
from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """`2026-11-22T10:00:00.123Z`."""
    if moment.tzinfo is UTC:
        return _iso(moment.timestamp())
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_iso() -> str:
    """`iso(utc_now())`: the receiver stamps every callback with it."""
    return _iso(time.time())


# A state record's times fall in a few seconds: now, and the next poll's.
@functools.lru_cache(maxsize=64)
def _second_text(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def iso_from_epoch(epoch: float | None) -> str | None:
    return None if epoch is None else _iso(epoch)


def _iso(epoch: float) -> str:
    """`iso(datetime.fromtimestamp(epoch, UTC))` in half the time: a state record has
    three. Rounded to the microsecond as `fromtimestamp` rounds (half to even), then cut
    to the millisecond as `isoformat` cuts."""
    fraction, whole = math.modf(epoch)
    micros = round(fraction * 1e6)
    if micros < 0:
        micros, whole = micros + 1_000_000, whole - 1
    elif micros >= 1_000_000:
        micros, whole = micros - 1_000_000, whole + 1
    return f"{_second_text(int(whole))}.{micros // 1000:03d}Z"


def epoch_from_iso(text: str | None) -> float | None:
    return None if text is None else datetime.fromisoformat(text).timestamp()
