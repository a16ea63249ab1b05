"""The top entries of a `py-spy record -f raw` profile: by self and by total samples.

    .venv/bin/py-spy record -d 15 --pid PID -f raw -o receiver.raw
    .venv/bin/python benchmarks/profile_top.py receiver.raw [--top 20]

A frame is `function (file)`, the line number dropped, so one function's lines add up.
Self: samples with the function on top of the stack; total: samples with it anywhere
in the stack (counted once a sample). Percentages are of all samples recorded (py-spy
leaves idle samples out unless given --idle).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

_LINE = re.compile(r":\d+\)$")
_SITE = re.compile(r"/(?:site-packages|lib/python3\.\d+)/")


def frame_name(frame: str) -> str:
    """`func (path/to/file.py:12)` as `func (file.py)`, paths shortened."""
    frame = _LINE.sub(")", frame.strip())
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    parts = _SITE.split(where)
    where = parts[-1] if len(parts) > 1 else where.rsplit("/main/", 1)[-1]
    return f"{name} ({where})"


def tally(lines: Iterable[str]) -> tuple[Counter[str], Counter[str], int]:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        samples += n
        own[frames[-1]] += n
        for name in set(frames):
            total[name] += n
    return own, total, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path, help="a py-spy raw (collapsed) profile")
    parser.add_argument("--top", type=int, default=20, help="entries of each (20)")
    args = parser.parse_args()
    own, total, samples = tally(args.profile.read_text(encoding="utf-8").splitlines())
    print(f"{samples:,} samples")
    for title, counts in (("self", own), ("total", total)):
        print(f"\nby {title}:")
        for name, n in counts.most_common(args.top):
            print(f"{n / samples * 100:6.1f}%  {name}")


if __name__ == "__main__":
    main()
