"""``python -m singleflight bench``: runs the repository's benchmarks, prints ratios to floors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from singleflight.cli.bench import BenchError, find_repo, parse_figures, render

from .conftest import run_cli

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_bench_runs_the_cache_benchmark_and_prints_ratios() -> None:
    done = run_cli("bench", "--quick", "--only", "cache", timeout=280, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "running benchmarks/bench_cache.py --quick" in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Python ")
    header, *rows = lines[1:]
    assert header.split() == [
        "benchmark", "figure", "subject", "floor", "ratio", "target", "verdict"
    ]  # fmt: skip
    assert len(rows) >= 4  # the hit figures and the simulation's
    for row in rows:
        assert row.startswith("cache ")
        ratio = re.search(r"\s(\d+\.\d\d)x\s", row)
        assert ratio is not None, row
        assert float(ratio.group(1)) > 0
        assert row.split()[-1] in ("met", "MISSED", "reported")


def test_parse_figures_reads_the_json_after_the_heading() -> None:
    figures = [{"name": "x", "unit": "ns", "floor": 2.0, "subject": 3.0, "target": 1.5}]
    stdout = "Python 3.12.1, 2 CPUs; medians\n" + json.dumps(figures, indent=2) + "\n"
    assert parse_figures(stdout) == figures
    with pytest.raises(BenchError, match="printed no figures"):
        parse_figures("Python 3.12.1\nno json here\n")


def test_render_shows_subject_over_floor() -> None:
    table = render(
        [
            ("core", [{"name": "a", "unit": "ns", "floor": 800.0, "subject": 1200.0,
                       "target": 1.5, "verdict": "met"}]),
            ("cache", [{"name": "b", "unit": "/s", "floor": 4.0, "subject": 1.0,
                        "target": None, "verdict": "reported"}]),
        ]
    )  # fmt: skip
    rows = table.splitlines()
    assert rows[1].split() == ["core", "a", "1,200", "ns", "800", "ns", "1.50x", "1.50x", "met"]
    assert rows[2].split() == ["cache", "b", "1", "/s", "4", "/s", "0.25x", "-", "reported"]


def test_the_benchmarks_are_found_from_the_checkout(tmp_path: Path) -> None:
    assert find_repo(cwd=REPO) == REPO
    assert find_repo(cwd=REPO / "src" / "singleflight") == REPO
    assert find_repo(REPO) == REPO


def test_outside_a_checkout_the_error_says_so(tmp_path: Path) -> None:
    installed = tmp_path / "site-packages" / "singleflight" / "cli" / "bench.py"
    with pytest.raises(
        BenchError, match="not installed with the package: run this from a checkout"
    ):
        find_repo(cwd=tmp_path, package=installed)
    with pytest.raises(BenchError, match=r"no benchmarks/bench_core\.py there"):
        find_repo(tmp_path)


@pytest.mark.timeout(60)
def test_bench_with_a_wrong_repo_is_one_line_and_exit_1(tmp_path: Path) -> None:
    done = run_cli("bench", "--repo", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"singleflight bench: --repo {tmp_path}: no benchmarks/bench_core.py there"
    ]
