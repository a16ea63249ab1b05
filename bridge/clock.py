"""Times as the bridge writes them: UTC, ISO 8601, milliseconds, `Z`."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """`2026-11-22T10:00:00.123Z`."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_from_epoch(epoch: float | None) -> str | None:
    return None if epoch is None else iso(datetime.fromtimestamp(epoch, UTC))


def epoch_from_iso(text: str | None) -> float | None:
    return None if text is None else datetime.fromisoformat(text).timestamp()
