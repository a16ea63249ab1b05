"""What the benchmarks share: their figures, the table beside a saved baseline, saving it.

A benchmark describes its figures (`Figure`), measures them, then calls `report()`
with this run's values and the baseline `load_baseline()` found, and `save_baseline()`
on `--save-baseline`. A baseline file holds the run's parameters (say `orders`), the
Python version, CPU count, machine and date, and the figures rounded to 3 digits.
"""

from __future__ import annotations

import json
import os
import platform
import resource
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


@dataclass(frozen=True)
class Figure:
    name: str
    label: str
    # "lower" or "higher" is better; "" for a figure shown for information only.
    better: str
    digits: int
    # Changes within this many percent are run-to-run noise: not called better or worse.
    noise: float
    # Comparable with a baseline of other parameters (say bytes/order, whatever the count).
    scale_free: bool = False


def load_baseline(path: Path) -> dict[str, Any] | None:
    try:
        baseline: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    return baseline


def report(
    figures: Sequence[Figure],
    values: Mapping[str, float],
    baseline: Mapping[str, Any] | None,
    *,
    title: str,
    path: Path,
    params: Mapping[str, Any],
    describe: Callable[[Mapping[str, Any]], str],
    mismatch: str,
) -> None:
    """Prints `title`, the baseline's provenance, then one row a figure: this run's value,
    the baseline's and the change. A baseline whose `params` differ from this run's is
    compared only on the scale-free figures (`mismatch` says so)."""
    print()
    print(f"{title}; {environment()}")
    same_params = baseline is not None and all(baseline.get(k) == v for k, v in params.items())
    if baseline is None:
        print(f"no baseline yet ({path.name}): save one with --save-baseline")
    else:
        print(
            f"baseline: {describe(baseline)}, {baseline['date']}, "
            f"Python {baseline['python']}, {baseline['cpus']} CPUs"
        )
        if not same_params:
            print(f"  ({mismatch})")
    saved: dict[str, float] = {} if baseline is None else baseline["figures"]
    rows = [("figure", "this run", "baseline", "change")]
    for figure in figures:
        value = values[figure.name]
        old = saved.get(figure.name)
        label = figure.label if figure.better else f"{figure.label} (info)"
        if baseline is not None and not same_params and not figure.scale_free:
            old = None
        rows.append((label, f"{value:,.{figure.digits}f}", *compare(figure, value, old)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for n, row in enumerate(rows):
        print(
            f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  "
            f"{row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}"
        )
        if n == 0:
            print("  ".join("-" * width for width in widths))


def compare(figure: Figure, value: float, old: float | None) -> tuple[str, str]:
    """The baseline's value as shown, and the change: `better`/`WORSE` only past the noise."""
    if old is None:
        return "-", "-"
    shown = f"{old:,.{figure.digits}f}"
    if old == 0:
        return shown, "-"
    change = (value - old) / abs(old) * 100.0
    worse = (change > 0) if figure.better == "lower" else (change < 0)
    noise = not figure.better or abs(change) <= figure.noise
    mark = "" if noise else (" WORSE" if worse else " better")
    return shown, ("0.0%" if abs(change) < 0.05 else f"{change:+.1f}%") + mark


def environment() -> str:
    return f"Python {platform.python_version()}, {cpus()} CPUs, {platform.machine()}"


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def save_baseline(
    path: Path, params: Mapping[str, Any], figures: Sequence[Figure], values: Mapping[str, float]
) -> None:
    baseline = {
        **params,
        "python": platform.python_version(),
        "cpus": cpus(),
        "machine": platform.machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "figures": {f.name: round(values[f.name], 3) for f in figures},
    }
    path.write_text(json.dumps(baseline, indent=2) + "\n", encoding="utf-8")
    print(f"\nsaved as the baseline: {path}")


def rss_bytes(pid: int | str = "self") -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process (this one by default): resident now, and its peak so far.

    Without /proc, this process's ru_maxrss stands in for both (another's: zeros)."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    fields[name] = int(value.split()[0]) * 1024
    except OSError:
        pass
    # ru_maxrss is in kB on Linux.
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if pid == "self" else 0
    peak = fields.get("VmHWM", own)
    return fields.get("VmRSS", peak), peak
