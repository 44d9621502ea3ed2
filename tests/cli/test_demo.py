"""``python -m singleflight demo`` end to end, with small settings: a real database, real
threads/tasks/processes, the real command line; then its table, its JSON and its PNG.

The settings make the burst arrive together: every client starts at once on a cold
cache, entries live ``TTL`` seconds without jitter (the hand-written modes), and 48
clients ask for 6 keys, so when a key expires many clients want it at the same moment.
The database's own count (SQLite's trace callback; PostgreSQL's records) must then show
the naive mode querying a key many times at once, and the coalesced modes exactly once
per key per expiry.
"""

from __future__ import annotations

import collections
import itertools
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from .conftest import load_json, run_cli

TTL = 0.8
SMALL = [
    "--duration", "2", "--ttl", str(TTL), "--clients", "48", "--keys", "6",
    "--rows", "20000", "--think", "5",
]  # fmt: skip
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _modes(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mode"]: m for m in document["modes"]}


def _by_key(log: list[list[float]]) -> dict[int, list[tuple[float, float]]]:
    queries: dict[int, list[tuple[float, float]]] = collections.defaultdict(list)
    for started, finished, key in sorted(log):
        queries[int(key)].append((started, finished))
    return queries


def assert_one_query_per_key_per_expiry(mode: dict[str, Any], ttl: float, keys: int) -> None:
    """Every key was loaded, and loaded again only once its entry had expired: a query of a
    key starts at least ``ttl`` after the previous one ended (the entry is written after
    the query ends, so it expires later still)."""
    queries = _by_key(mode["log"])
    assert len(queries) == keys, queries.keys()
    for key, runs in queries.items():
        for (_, previous_end), (start, _) in itertools.pairwise(runs):
            assert start >= previous_end + ttl - 1e-6, (mode["mode"], key, runs)
    # The hottest key is asked for all the time: it is loaded again in the window right
    # after each expiry, so the burst at that expiry was served by exactly one query.
    hottest = max(queries.values(), key=len)
    assert len(hottest) >= 2, hottest
    for (_, previous_end), (start, _) in itertools.pairwise(hottest):
        assert start < previous_end + 2 * ttl, hottest


def assert_stampede_then_none(document: dict[str, Any]) -> None:
    modes = _modes(document)
    naive, group, loading = modes["naive"], modes["group"], modes["loading"]
    for mode in (naive, group, loading):
        assert mode["queries"] == len(mode["log"])
        assert mode["errors"] == 0, mode["last_error"]
        assert mode["requests"] > 1000
    # the stampede: keys queried many times at once
    assert naive["duplicates"] >= 10, naive["duplicates"]
    assert naive["queries"] >= 2 * group["queries"], (naive["queries"], group["queries"])
    # Several queries ran at once (how many depends on the machine's load: a busy
    # 2-core CI machine measured 5 in asyncio mode); the duplicates above are the
    # stampede's measure.
    assert naive["most_at_once"] >= 3
    # coalesced: never two queries of a key at once; exactly one per key per expiry
    assert group["duplicates"] == 0
    assert loading["duplicates"] == 0
    assert_one_query_per_key_per_expiry(group, TTL, keys=6)
    assert naive["queries"] > loading["queries"]
    # stale-while-revalidate: after the cold start no request waits for the database
    assert loading["p99"] < group["max"]


@pytest.mark.timeout(120)
def test_demo_with_threads_on_sqlite(tmp_path: Path) -> None:
    chart = tmp_path / "chart.png"
    report = tmp_path / "demo.json"
    done = run_cli("demo", *SMALL, "--out", str(chart), "--json", str(report), timeout=100)
    assert done.returncode == 0, done.stderr

    # the table, on stdout
    lines = done.stdout.splitlines()
    assert lines[0] == "SQLite file in a temporary directory (20,000 users)"
    assert "48 threads" in lines[1]
    header = next(line for line in lines if line.strip().startswith("mode"))
    for column in ("requests", "DB queries", "duplicates", "peak q/s", "p50", "p99", "max"):
        assert column in header
    document = load_json(report)
    for title in ("naive cache-aside", "cache + Group", "LoadingCache (stale, early refresh)"):
        row = next(line for line in lines if line.strip().startswith(title))
        mode = next(m for m in document["modes"] if m["title"] == title)
        # the table shows what the database counted
        assert f"{mode['queries']:,}" in row.split()
        assert f"{mode['requests']:,}" in row.split()
    assert f"chart: {chart}" in done.stdout
    # progress, on stderr (not a terminal: one line per mode)
    assert "running naive cache-aside for 2 s" in done.stderr
    assert "Traceback" not in done.stderr

    assert_stampede_then_none(document)

    # the chart: a real PNG that decodes to a picture that is not blank
    data = chart.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(chart)
    height, width, channels = image.shape
    assert height > 400 and width > 600 and channels in (3, 4)
    assert image[..., :3].std() > 0.05


@pytest.mark.timeout(120)
def test_demo_with_asyncio_tasks(tmp_path: Path) -> None:
    report = tmp_path / "demo.json"
    done = run_cli("demo", *SMALL, "--asyncio", "--no-chart", "--json", str(report), timeout=100)
    assert done.returncode == 0, done.stderr
    assert "48 asyncio tasks" in done.stdout
    assert "cache + AsyncGroup" in done.stdout
    assert "AsyncLoadingCache (stale, early refresh)" in done.stdout
    assert "chart:" not in done.stdout
    assert_stampede_then_none(load_json(report))


@pytest.mark.timeout(180)
def test_demo_against_postgresql(tmp_path: Path, postgres_dsn: str) -> None:
    report = tmp_path / "demo.json"
    chart = tmp_path / "pg.png"
    done = run_cli(
        "demo",
        *SMALL,
        "--dsn",
        postgres_dsn,
        "--out",
        str(chart),
        "--json",
        str(report),
        timeout=160,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("PostgreSQL ")
    document = load_json(report)
    assert "dsn" not in document["config"]  # a DSN may carry a password
    # the counts are the server's own records, on the server's clock
    assert_stampede_then_none(document)
    assert chart.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.timeout(180)
def test_demo_across_processes_with_redis(tmp_path: Path, redis_url: str) -> None:
    """Two worker processes: a Group per process queries each key once per process per
    expiry; a RedisGroup once for both, and so does a LoadingCache over one, and a
    fleet cache (its entries shared in Redis)."""
    report = tmp_path / "demo.json"
    done = run_cli(
        "demo",
        *SMALL,
        "--redis",
        redis_url,
        "--processes",
        "2",
        "--modes",
        "group,redis,loading,fleet",
        "--no-chart",
        "--json",
        str(report),
        timeout=160,
    )
    assert done.returncode == 0, done.stderr
    assert "48 clients (threads) in 2 processes" in done.stdout
    modes = _modes(load_json(report))
    group, redis = modes["group"], modes["redis"]
    assert group["errors"] == 0 and redis["errors"] == 0, (group["last_error"], redis["last_error"])
    assert redis["title"] == "cache + RedisGroup"
    assert redis["duplicates"] == 0
    assert_one_query_per_key_per_expiry(redis, TTL, keys=6)
    # each process loads every key itself: twice the queries, some of them at once
    assert group["queries"] >= 1.5 * redis["queries"], (group["queries"], redis["queries"])
    per_key = collections.Counter(int(key) for _, _, key in group["log"])
    assert all(count >= 2 for count in per_key.values())
    # A LoadingCache with the RedisGroup as its group= (each process caches what the
    # other loaded): never two queries of a key at once, fewer than a Group per process.
    loading = modes["loading"]
    assert loading["title"] == "LoadingCache + RedisGroup"
    assert loading["errors"] == 0, loading["last_error"]
    assert loading["duplicates"] == 0
    assert loading["queries"] < group["queries"], (loading["queries"], group["queries"])
    # The fleet cache: one query per key per expiry for both processes.
    fleet = modes["fleet"]
    assert fleet["title"] == "LoadingCache + Fleet"
    assert fleet["errors"] == 0, fleet["last_error"]
    assert fleet["duplicates"] == 0
    assert_one_query_per_key_per_expiry(fleet, TTL, keys=6)
    assert fleet["per_key_per_ttl"] < group["per_key_per_ttl"], (fleet["queries"], group["queries"])
    assert "q/key/TTL" in done.stdout and "LoadingCache + Fleet" in done.stdout


def test_an_interrupt_while_client_threads_start_is_raised_as_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C lands while the client threads are being started: the run stops with the
    KeyboardInterrupt, not a RuntimeError from joining a thread that never started."""
    import threading
    import types

    from singleflight.cli import demo
    from singleflight.cli.db import SqliteDatabase

    class InterruptedOnSecondStart(threading.Thread):
        started = 0

        def start(self) -> None:
            InterruptedOnSecondStart.started += 1
            if InterruptedOnSecondStart.started == 2:
                raise KeyboardInterrupt
            super().start()

    monkeypatch.setattr(
        demo,
        "threading",
        types.SimpleNamespace(Thread=InterruptedOnSecondStart, Event=threading.Event),
    )
    db = SqliteDatabase(tmp_path / "users.db", 200)
    cfg = demo.DemoConfig(clients=4, duration=5.0, rows=200, out=None)
    with pytest.raises(KeyboardInterrupt):
        demo.run_threads(cfg, "naive", db, "r", range(4), lambda: 0.0, lambda *_: None)
