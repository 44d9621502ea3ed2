"""The command line: ``singleflight demo`` and ``singleflight bench``.

Only the standard library here, so that ``--help`` and option errors work
without the demo extra.  Every error is one line (:class:`UsageError`),
never argparse's usage dump or a traceback.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

MODE_NAMES = ("naive", "group", "redis", "loading", "fleet")
REDIS_MODES = ("redis", "fleet")
BENCH_NAMES = ("core", "cache", "redis")


class UsageError(Exception):
    """A bad command line; the message is one line for the user."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _number(
    low: float,
    high: float,
    unit: str = "",
    *,
    integer: bool = False,
    per: int = 1,
    low_text: str = "",
) -> Any:
    """A parser of a number from ``low`` to ``high`` (of ``unit``), divided by ``per``."""
    what = "a whole number" if integer else f"a number of {unit}" if unit else "a number"
    spec = "," if integer else "g"
    bounds = f"{low_text or format(low, spec)} to {high:{spec}}"

    def parse(text: str) -> float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high:  # also false for nan
            shown = value if integer else text
            raise argparse.ArgumentTypeError(f"{shown} is out of range: use {bounds}")
        return value / per if per > 1 else value

    return parse


def _modes(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown mode {', '.join(unknown) or text!r}: choose from {', '.join(MODE_NAMES)}"
        )
    return list(dict.fromkeys(names))


def _dsn(text: str) -> str:
    if urlsplit(text).scheme not in ("postgresql", "postgres"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a PostgreSQL URL: use postgresql://user@host:port/database"
        )
    return text


def _redis_url(text: str) -> str:
    if urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Redis URL: use redis://host:port/db")
    return text


DEMO_DESCRIPTION = """\
A real cache stampede against a real database, measured.

Clients ask for user profiles (a slow SQL query per user) through a cache whose
entries expire, for a fixed time, in each mode:
  naive     cache-aside by hand: every client that misses queries the database
  group     the same cache with misses coalesced by singleflight.Group
  redis     the same with a RedisGroup: coalesced across processes (--redis)
  loading   singleflight.LoadingCache with stale-while-revalidate and early refresh
  fleet     a LoadingCache whose entries every process shares in Redis (--redis)
The database counts the queries it really executed (SQLite's trace callback,
or PostgreSQL's own records); the table and a PNG chart show the difference.
By default it builds a SQLite file of 100,000 users in a temporary directory.
"""

DEMO_EPILOG = """\
examples:
  python -m singleflight demo
  python -m singleflight demo --asyncio --clients 200
  python -m singleflight demo --dsn postgresql://postgres@127.0.0.1:5432/test
  python -m singleflight demo --redis redis://127.0.0.1:6379/0 --processes 4
"""

BENCH_DESCRIPTION = """\
Run the project's benchmarks (benchmarks/bench_core.py and bench_cache.py) and
print each figure as a ratio to its floor, measured interleaved in the same run.
Needs a checkout of the repository (the benchmarks are not installed).
"""


def _version() -> str:
    from .. import __version__

    return __version__


_DATABASE = "database (default: a SQLite file in a temporary directory)"
# (argument group, flag, add_argument's keywords) of each demo option; "where": the database's.
_DEMO_OPTIONS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("load", "--clients", dict(type=_number(1, 2_000, integer=True), help="concurrent clients, all "
        "processes together (default: 200, or fewer if PostgreSQL has fewer free connections)")),
    ("load", "--duration", dict(type=_number(0.5, 3600, "seconds"), default=12.0,
        help="seconds each mode runs (default: 12)")),
    ("load", "--ttl", dict(type=_number(0.1, 3600, "seconds"), default=3.0,
        help="seconds a cache entry lives (default: 3)")),
    ("load", "--keys", dict(type=_number(1, 1_000_000, integer=True), default=50,
        help="hot users the clients ask for, with Zipf-distributed popularity (default: 50)")),
    ("load", "--zipf", dict(type=_number(0, 5, low_text="0 (uniform)"), default=1.1, metavar="S",
        help="Zipf exponent: 0 is uniform, higher is more skewed (default: 1.1)")),
    ("load", "--think", dict(type=_number(0, 10_000, "milliseconds", per=1000), default=0.01,
        metavar="MS", help="mean pause of a client between requests, in ms (default: 10)")),
    ("load", "--modes", dict(type=_modes, help=f"comma-separated modes to run, from "
        f"{', '.join(MODE_NAMES)} (default: naive,group,loading; with --redis also redis, fleet)")),
    ("load", "--asyncio", dict(action="store_true", dest="use_asyncio",
        help="clients are asyncio tasks (queries run in a thread pool) instead of threads")),
    ("load", "--seed", dict(type=int, default=1,
        help="seed of the key choices and the data (default: 1)")),
    ("where", "--dsn", dict(type=_dsn, help="run against PostgreSQL instead: "
        "postgresql://user@host:port/database (creates schema singleflight_demo there)")),
    ("where", "--db-file", dict(type=Path, metavar="PATH",
        help="SQLite file to use (built if missing, kept afterwards)")),
    (_DATABASE, "--rows", dict(type=_number(1, 10_000_000, integer=True), default=100_000,
        help="users in the table; the query scans them all (default: 100000)")),
    ("across processes", "--redis", dict(type=_redis_url, metavar="URL",
        help="Redis for the cross-process modes (redis://host:port/db); adds redis, fleet")),
    ("across processes", "--processes", dict(type=_number(1, 64, integer=True), default=1,
        help="worker processes sharing the clients; above 1 needs --redis (default: 1)")),
    ("output", "--out", dict(type=Path, default=Path("singleflight-demo.png"), metavar="PNG",
        help="where to write the chart (default: ./singleflight-demo.png)")),
    ("output", "--no-chart", dict(action="store_true", help="do not write the chart")),
    ("output", "--json", dict(type=Path, dest="json_out", metavar="PATH",
        help="also write the results, with every executed query, as JSON")),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="singleflight",
        description="pysingleflight's command line: see it work, measure it.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"pysingleflight {_version()}",
        help="print the version",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="a cache stampede against a real database, with and without singleflight",
        description=DEMO_DESCRIPTION,
        epilog=DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups = {
        name: demo.add_argument_group(name)
        for name in ("load", _DATABASE, "across processes", "output")
    }
    where = groups[_DATABASE].add_mutually_exclusive_group()
    for group, flag, options in _DEMO_OPTIONS:
        (where if group == "where" else groups[group]).add_argument(flag, **options)

    bench = commands.add_parser(
        "bench",
        help="run the benchmarks; each figure as a ratio to its floor",
        description=BENCH_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--quick", action="store_true", help="fewer repetitions (a rough look)")
    bench.add_argument(
        "--only",
        type=lambda text: [p.strip() for p in text.split(",") if p.strip()],
        metavar="NAMES",
        help="comma-separated benchmarks to run: core, cache, redis (default: core,cache; "
        "redis needs redis-server on PATH)",
    )
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument(
        "--repo",
        type=Path,
        metavar="DIR",
        help="the repository checkout holding benchmarks/ (default: found from here)",
    )
    return parser


def _check_output(path: Path, what: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"singleflight demo: {what} {path} is a directory; give a file name")
    if not parent.is_dir():
        raise UsageError(f"singleflight demo: {what}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"singleflight demo: {what}: directory {parent} is not writable")


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse and cross-check ``argv``; :class:`UsageError` (one line) if it is wrong."""
    args = build_parser().parse_args(argv)
    if args.command != "demo":
        if args.only is not None:
            unknown = [name for name in args.only if name not in BENCH_NAMES]
            if unknown or not args.only:
                raise UsageError(
                    f"singleflight bench: --only: unknown benchmark {', '.join(unknown)!r}: "
                    f"choose from {', '.join(BENCH_NAMES)}"
                )
        return args
    if args.modes is None:
        args.modes = [name for name in MODE_NAMES if name not in REDIS_MODES or args.redis]
    for name in REDIS_MODES:
        if name in args.modes and args.redis is None:
            raise UsageError(f"singleflight demo: mode {name} needs --redis URL")
    if args.processes > 1 and args.redis is None:
        raise UsageError(
            "singleflight demo: --processes above 1 shows cross-process coalescing and "
            "needs --redis URL"
        )
    args.clients_fixed = args.clients is not None
    if args.clients is None:
        args.clients = 200
    if args.clients < args.processes:
        raise UsageError(
            f"singleflight demo: --clients {args.clients} is fewer than "
            f"--processes {args.processes}"
        )
    if args.keys > args.rows:
        raise UsageError(
            f"singleflight demo: --keys {args.keys:,} is more than --rows {args.rows:,}"
        )
    if not args.no_chart:
        _check_output(args.out, "--out")
    if args.json_out is not None:
        _check_output(args.json_out, "--json")
    if args.db_file is not None and args.db_file.is_dir():
        raise UsageError(f"singleflight demo: --db-file {args.db_file} is a directory")
    return args
