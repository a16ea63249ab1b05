"""The benchmark scripts still run: each, very short, prints its figures and a balanced
ledger. Not a measurement: the figures of a run this short mean nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "VOID" not in output, output
    return output


@pytest.mark.slow
def test_ingest_prints_figures_and_ratios() -> None:
    # The asyncio generator, as in CI where wrk is not installed.
    output = run(
        "ingest.py",
        "--duration",
        "1",
        "-c",
        "4",
        "--generator",
        "own",
        "--targets",
        "naive-plain,receiver",
    )
    for target in ("naive-plain", "receiver"):
        row = next(line for line in output.splitlines() if line.startswith(target))
        assert row.rstrip().endswith("ok"), row
    assert "callbacks/s" in output
    assert "p99.9 ms" in output
    assert "ratio receiver / naive-plain:" in output


@pytest.mark.slow
def test_pipeline_prints_figures_and_balanced_ledger() -> None:
    output = run(
        "pipeline.py", "--orders", "12", "--concurrency", "4", "--mode", "split", "--workers", "2"
    )
    assert "ledger: sent 12 = accepted 12 + refused 0; accepted 12 = events 12" in output
    assert "split with 2 workers" in output
    assert "events/s overall" in output
    assert "callback sent -> event readable, p99.9 ms" in output
    assert "worker(s) CPU ms / order" in output
    # Every stage of the breakdown measured: three figures each, none missing.
    stages = output.split("where the time goes", 1)[1].splitlines()[1:6]
    assert [line.split(":")[0].strip() for line in stages] == [
        "receiver",
        "worker takes the hint",
        "provider answers, worker writes",
        "event published and read",
        "the whole",
    ], stages
    for line in stages:
        assert len([float(figure) for figure in line.split()[-3:]]) == 3, line  # not "-"


@pytest.mark.slow
def test_pipeline_compares_serve_with_a_receiver_alone() -> None:
    output = run("pipeline.py", "--orders", "12", "--concurrency", "4", "--against-receiver")
    assert "inbox records 12, between the accepted and the sent" in output
    assert "ledger: sent 12 = accepted 12 + refused 0; accepted 12 = events 12" in output
    assert "serve answered" in output
    assert "callbacks/s, a receiver alone" in output
