"""``python -m singleflight bench``: run the repository's benchmarks, report ratios to floors.

The benchmarks live in the repository's ``benchmarks/`` folder, not in the
package: each script measures every figure against a floor interleaved with
it in the same run (``benchmarks/_common.py``).  This runs the chosen scripts
with ``--json`` in this interpreter and prints every figure as ``subject /
floor`` in one table.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["BenchError", "Figure", "find_repo", "parse_figures", "render", "run_bench"]

SCRIPTS = {"core": "bench_core.py", "cache": "bench_cache.py", "redis": "bench_redis.py"}
DEFAULT = ("core", "cache")  # redis needs redis-server and the [bench] extra: asked by name
TIMEOUT = 1800.0  # seconds a script may run


class BenchError(Exception):
    """The benchmarks cannot run; the message is one line for the user."""


Figure = dict[str, Any]


def _is_repo(path: Path) -> bool:
    return all((path / "benchmarks" / name).is_file() for name in ("_common.py", SCRIPTS["core"]))


def find_repo(
    explicit: Path | None = None, cwd: Path | None = None, package: Path | None = None
) -> Path:
    """The checkout holding ``benchmarks/``: ``explicit``, else the working directory or
    one of its parents, else the checkout holding ``package`` (this file: found when the
    package is installed from a checkout, editable)."""
    if explicit is not None:
        if _is_repo(explicit):
            return explicit
        raise BenchError(f"--repo {explicit}: no benchmarks/bench_core.py there")
    here = (cwd or Path.cwd()).resolve()
    package = (package or Path(__file__)).resolve()
    for candidate in (here, *here.parents, *package.parents):
        if _is_repo(candidate):
            return candidate
    raise BenchError(
        "the benchmarks are not installed with the package: run this from a checkout of "
        "the pysingleflight repository (or pass --repo DIR)"
    )


def parse_figures(stdout: str) -> list[Figure]:
    """The figures a benchmark script printed with ``--json`` (after its heading lines)."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("["):
            figures = json.loads("\n".join(lines[i:]))
            if not isinstance(figures, list):
                break
            return figures
    raise BenchError("the benchmark printed no figures (expected a JSON list after --json)")


def _number(value: float, unit: str) -> str:
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".rstrip()


def render(results: Sequence[tuple[str, list[Figure]]]) -> str:
    """One table of every figure: subject, floor, their ratio, the target and the verdict."""
    rows = [("benchmark", "figure", "subject", "floor", "ratio", "target", "verdict")]
    for name, figures in results:
        for f in figures:
            target = "-" if f.get("target") is None else f"{f['target']:.2f}x"
            rows.append(
                (
                    name,
                    str(f["name"]),
                    _number(f["subject"], f["unit"]),
                    _number(f["floor"], f["unit"]),
                    f"{f['subject'] / f['floor']:.2f}x" if f["floor"] else "-",
                    target,
                    str(f.get("verdict", "")),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {2, 3, 4, 5}
    out = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def run_bench(
    names: Sequence[str] | None,
    *,
    quick: bool,
    as_json: bool,
    repo: Path | None,
    out: TextIO,
    err: TextIO,
) -> int:
    """Run the named benchmarks (default: core and cache); 0 if all ran."""
    root = find_repo(repo)
    results: list[tuple[str, list[Figure]]] = []
    for name in names or DEFAULT:
        script = root / "benchmarks" / SCRIPTS[name]
        if not script.is_file():
            raise BenchError(f"no {script.relative_to(root)} in {root}")
        command = [sys.executable, str(script), "--json", *(["--quick"] if quick else [])]
        print(f"running benchmarks/{script.name}{' --quick' if quick else ''} ...", file=err)
        started = time.monotonic()
        try:
            done = subprocess.run(
                command, cwd=root, capture_output=True, text=True, timeout=TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"benchmarks/{script.name} ran over {TIMEOUT:.0f} s") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise BenchError(f"benchmarks/{script.name} failed: {last}")
        figures = parse_figures(done.stdout)
        print(f"  {len(figures)} figures in {time.monotonic() - started:.0f} s", file=err)
        results.append((name, figures))
    if as_json:
        json.dump({name: figures for name, figures in results}, out, indent=2)
        out.write("\n")
        return 0
    version = sys.version.split()[0]
    out.write(
        f"Python {version}; each figure: the subject, its floor measured interleaved in the "
        "same run, and subject / floor\n"
    )
    out.write(render(results) + "\n")
    return 0
