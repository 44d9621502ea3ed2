"""Shared helpers: interleaved repetitions and ratio reporting."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class Figure:
    name: str
    unit: str
    floor: float
    subject: float
    target: float | None  # the ratio the issue asks for, None if only reported

    @property
    def ratio(self) -> float:
        return self.subject / self.floor

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "reported"
        return "met" if self.ratio <= self.target else "MISSED"


def interleaved(
    floor: Callable[[], float], subject: Callable[[], float], reps: int
) -> tuple[float, float]:
    """Run floor and subject alternately ``reps`` times; return the median of each.

    Alternating (and swapping which goes first) spreads the machine's noise over
    both, so their ratio means something on a shared two-core box.
    """
    floors: list[float] = []
    subjects: list[float] = []
    for i in range(reps):
        if i % 2:
            subjects.append(subject())
            floors.append(floor())
        else:
            floors.append(floor())
            subjects.append(subject())
    return statistics.median(floors), statistics.median(subjects)


def report(figures: list[Figure], as_json: bool = False) -> None:
    if as_json:
        json.dump(
            [asdict(f) | {"ratio": f.ratio, "verdict": f.verdict} for f in figures],
            sys.stdout,
            indent=2,
        )
        print()
        return
    width = max(len(f.name) for f in figures)
    print(
        f"{'figure':<{width}}  {'floor':>12}  {'subject':>12}  {'ratio':>7}  {'target':>7}  verdict"
    )
    for f in figures:
        target = "-" if f.target is None else f"{f.target:.2f}x"
        spec = ",.0f" if f.unit == "i" else ".3g"  # "i": instructions, whole numbers
        print(
            f"{f.name:<{width}}  {f.floor:>10{spec}}{f.unit:>2}  {f.subject:>10{spec}}{f.unit:>2}"
            f"  {f.ratio:>6.2f}x  {target:>7}  {f.verdict}"
        )


def instructions_per_call(script: str, case: str, n: int) -> float:
    """CPU instructions per call of ``case``, counted by callgrind.

    Runs ``python script --run case N`` under ``valgrind --tool=callgrind`` with
    N = n and N = 11 n and divides the difference by 10 n: interpreter start,
    imports and warm-up cancel out.  ``PYTHONHASHSEED=0`` makes the counts
    repeat to the instruction (string hashes decide dict probe sequences).
    """
    import os
    import re
    import subprocess

    def count(calls: int) -> int:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + os.devnull,
             sys.executable, script, "--run", case, str(calls)],
            capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )  # fmt: skip
        found = re.search(r"Collected : (\d+)", out.stderr)
        assert found, out.stderr
        return int(found.group(1))

    return (count(11 * n) - count(n)) / (10 * n)
