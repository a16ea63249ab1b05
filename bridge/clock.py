"""Times as the bridge writes them: UTC, ISO 8601, milliseconds, `Z`."""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """`2026-11-22T10:00:00.123Z`."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_iso() -> str:
    """`iso(utc_now())` in half the time: the receiver stamps every callback with it.
    The text up to the seconds is made once a second."""
    now = time.time()
    second = int(now)
    return f"{_second_text(second)}.{int((now - second) * 1000):03d}Z"


@functools.lru_cache(maxsize=1)
def _second_text(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def iso_from_epoch(epoch: float | None) -> str | None:
    return None if epoch is None else iso(datetime.fromtimestamp(epoch, UTC))


def epoch_from_iso(text: str | None) -> float | None:
    return None if text is None else datetime.fromisoformat(text).timestamp()
