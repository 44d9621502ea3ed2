"""``python -m singleflight demo``: a real stampede against a real database, measured.

For each mode (see :mod:`.modes`), ``clients`` threads (or asyncio tasks, or
threads in ``processes`` worker processes) start cold and together, then for
``duration`` seconds each one asks for a user profile (keys drawn from a Zipf
distribution over the ``keys`` hottest users), waits ``think`` seconds, and
asks again.  Cache entries live ``ttl`` seconds, so every ``ttl`` the hot keys
expire while every client is asking for them.

The database counts the queries it executed (see :mod:`.db`); the clients
time each request.  Then a table per mode (queries, duplicate queries, peak
queries/s at expiry, latency percentiles, errors) and a PNG chart of database
queries per second over time, one line per mode.
"""

from __future__ import annotations

import asyncio
import io
import json
import multiprocessing
import os
import queue
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

from rich import box
from rich.console import Console, RenderableType
from rich.console import Group as RichGroup
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._redact import redact
from .db import Database, DatabaseError, PostgresDatabase, SqliteDatabase, attach, new_run_id
from .measure import ModeSummary, ZipfKeys, summarize
from .modes import build_async, build_sync, mode_title

__all__ = ["DemoConfig", "DemoError", "run_demo"]


class DemoError(Exception):
    """The demo cannot run as asked; the message is one line for the user."""


@dataclass(slots=True)
class DemoConfig:
    """The demo's settings (the command line's options, validated)."""

    clients: int = 200
    clients_fixed: bool = True  # False: the default, which may be cut to fit the server
    duration: float = 12.0
    ttl: float = 3.0
    keys: int = 50
    zipf: float = 1.1
    think: float = 0.01  # seconds
    rows: int = 100_000
    seed: int = 1
    modes: list[str] = field(default_factory=lambda: ["naive", "group", "loading"])
    use_asyncio: bool = False
    dsn: str | None = None
    db_file: Path | None = None
    redis: str | None = None
    processes: int = 1
    out: Path | None = Path("singleflight-demo.png")
    json_out: Path | None = None

    @property
    def bucket(self) -> float:
        """Seconds per point of the chart and of the peak rate: a sixth of the TTL."""
        return min(1.0, max(0.05, self.ttl / 6))


@dataclass(slots=True)
class ClientStats:
    """What one client saw: each request's latency, and its errors."""

    rng: random.Random
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    last_error: str = ""

    def failed(self, exc: Exception) -> None:
        """Count ``exc``, keeping the first line of its message."""
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0]


@dataclass(slots=True)
class RawRun:
    """One mode's run before it is summarized (picklable: workers send it back)."""

    latencies: list[float]
    errors: int
    last_error: str
    log: list[tuple[float, float, int]]  # (started, finished, key) of each executed query


def hot_keys(cfg: DemoConfig) -> list[int]:
    """The user ids the clients ask for, hottest first: spread over the table."""
    return random.Random(cfg.seed).sample(range(1, cfg.rows + 1), cfg.keys)


# -- one process: threads or tasks ---------------------------------------------------------

Tick = Callable[[int, int], None]  # (requests so far, queries so far)
Start = Callable[[], float]  # waits for the run's start, then returns its origin


class _Clients:
    """What the clients of one run share: the key choice, and each client's stats."""

    def __init__(self, cfg: DemoConfig, clients: range) -> None:
        self.pick = ZipfKeys(hot_keys(cfg), cfg.zipf)
        self.stats = [ClientStats(random.Random(cfg.seed * 100_003 + i)) for i in clients]

    def requests(self) -> int:
        """Requests made so far, by every client."""
        return sum(len(s.latencies) for s in self.stats)

    def done(self, db: Database, tick: Tick) -> RawRun:
        """The last tick, and the run (``db`` is closed)."""
        tick(self.requests(), db.executed())
        run = _merged(self.stats, db.log() if db.counts_in_process else [])
        db.close()
        return run


def _merged(parts: Sequence[ClientStats | RawRun], log: list[tuple[float, float, int]]) -> RawRun:
    return RawRun(
        latencies=[lat for p in parts for lat in p.latencies],
        errors=sum(p.errors for p in parts),
        last_error=next((p.last_error for p in parts if p.last_error), ""),
        log=log,
    )


def run_threads(
    cfg: DemoConfig, mode: str, db: Database, run: str, clients: range, start_at: Start, tick: Tick
) -> RawRun:
    """Run ``mode`` with one thread per client index in ``clients``.

    The threads start together once ``start_at()`` (which may wait) returns
    the origin, a ``time.monotonic()`` reading; each stops asking at
    ``origin + duration``.
    """
    service = build_sync(mode, db.profile, cfg.ttl, cfg.redis, f"singleflight-demo:{run}:{mode}")
    everyone = _Clients(cfg, clients)
    go = threading.Event()
    stop = threading.Event()  # set early only when the run is interrupted
    origin = 0.0

    def client(mine: ClientStats) -> None:
        go.wait()
        deadline = origin + cfg.duration
        get, clock, latencies, rng = service.get, time.perf_counter, mine.latencies, mine.rng
        while time.monotonic() < deadline and not stop.is_set():
            key = everyone.pick(rng)
            started = clock()
            try:
                get(key)
            except Exception as exc:
                mine.failed(exc)
            latencies.append(clock() - started)
            stop.wait(rng.expovariate(1 / cfg.think) if cfg.think else 0)

    threads = [
        threading.Thread(target=client, args=(s,), name=f"demo-client-{i}", daemon=True)
        for i, s in zip(clients, everyone.stats, strict=True)
    ]
    try:
        for thread in threads:
            thread.start()
        origin = start_at()
        db.begin(run, origin)
        go.set()
        while any(thread.is_alive() for thread in threads):
            tick(everyone.requests(), db.executed())
            time.sleep(0.1)
    finally:
        stop.set()
        go.set()
        for thread in threads:
            if thread.is_alive():  # an interrupt may have come before some started
                thread.join()
        service.close()
    return everyone.done(db, tick)


def run_tasks(
    cfg: DemoConfig, mode: str, db: Database, run: str, clients: range, start_at: Start, tick: Tick
) -> RawRun:
    """Run ``mode`` with one asyncio task per client index, on a new event loop.

    The driver is blocking, so queries run on a thread pool as large as the
    number of clients (what ``asyncio.to_thread`` does, without its small
    default pool capping the stampede).
    """

    async def main() -> RawRun:
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(len(clients) + 4, thread_name_prefix="demo-query")

        async def query(key: int) -> dict[str, Any]:
            return await loop.run_in_executor(pool, db.profile, key)

        service = build_async(mode, query, cfg.ttl, cfg.redis, f"singleflight-demo:{run}:{mode}")
        everyone = _Clients(cfg, clients)
        go = asyncio.Event()
        origin = 0.0

        async def client(mine: ClientStats) -> None:
            await go.wait()
            deadline = origin + cfg.duration
            get, clock, latencies, rng = service.get, time.perf_counter, mine.latencies, mine.rng
            while time.monotonic() < deadline:
                key = everyone.pick(rng)
                started = clock()
                try:
                    await get(key)
                except Exception as exc:
                    mine.failed(exc)
                latencies.append(clock() - started)
                await asyncio.sleep(rng.expovariate(1 / cfg.think) if cfg.think else 0)

        tasks = [asyncio.create_task(client(s)) for s in everyone.stats]
        try:
            origin = await loop.run_in_executor(pool, start_at)
            await loop.run_in_executor(pool, db.begin, run, origin)
            go.set()
            while not all(task.done() for task in tasks):
                tick(everyone.requests(), await loop.run_in_executor(pool, db.executed))
                await asyncio.wait(tasks, timeout=0.1)
        finally:
            for task in tasks:  # still running only if the run was interrupted
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await service.aclose()
            pool.shutdown(wait=True)
        return everyone.done(db, tick)

    return asyncio.run(main())


# -- several processes ------------------------------------------------------------------------


def _worker(
    cfg: DemoConfig,
    mode: str,
    spec: tuple[str, str, int],
    run: str,
    clients: range,
    slot: int,
    counters: Any,
    go: Any,
    origin: Any,
    messages: Any,
) -> None:
    """A worker process: set up its share of the clients, say it is ready, start at the
    origin the parent sets, and send back the run (or the error)."""
    try:
        db = attach(spec)

        def start_at() -> float:
            messages.put(("ready", slot, None))
            if not go.wait(START_TIMEOUT):
                raise DemoError("the parent process never started the run")
            time.sleep(max(0.0, origin.value - time.monotonic()))
            return float(origin.value)

        def tick(requests: int, queries: int) -> None:
            counters[2 * slot] = requests
            counters[2 * slot + 1] = queries

        runner = run_tasks if cfg.use_asyncio else run_threads
        try:
            messages.put(("done", slot, runner(cfg, mode, db, run, clients, start_at, tick)))
        finally:
            db.shutdown()
    except BaseException as exc:
        messages.put(("failed", slot, f"{type(exc).__name__}: {exc}".splitlines()[0]))


START_TIMEOUT = 60.0  # seconds worker processes may take to start


def run_processes(cfg: DemoConfig, mode: str, db: Database, run: str, tick: Tick) -> RawRun:
    """Run ``mode`` in ``cfg.processes`` worker processes sharing the clients.

    Each worker starts its clients, then waits; once all are ready the parent
    sets one origin and they all start at it.  A worker that fails or dies
    ends the run with :class:`DemoError`; the others are stopped.
    """
    context = multiprocessing.get_context("spawn")
    counters = context.Array("q", 2 * cfg.processes, lock=False)
    go = context.Event()
    origin = context.Value("d", 0.0, lock=False)
    messages = context.Queue()
    workers = [
        context.Process(
            target=_worker,
            args=(
                cfg,
                mode,
                db.spec(),
                run,
                range(slot, cfg.clients, cfg.processes),
                slot,
                counters,
                go,
                origin,
                messages,
            ),
            name=f"singleflight-demo-worker-{slot}",
            daemon=True,
        )
        for slot in range(cfg.processes)
    ]
    ready: set[int] = set()
    raws: dict[int, RawRun] = {}
    deadline = time.monotonic() + START_TIMEOUT
    try:
        for worker in workers:
            worker.start()
        while len(raws) < len(workers):
            if go.is_set():
                requests = sum(counters[0::2])
                queries = sum(counters[1::2]) if db.counts_in_process else db.executed()
                tick(requests, queries)
            try:
                kind, slot, payload = messages.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise DemoError("worker processes did not finish in time") from None
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    raise DemoError(f"worker process {dead[0].name} died") from None
                continue
            if kind == "failed":
                raise DemoError(f"worker process {slot} failed: {payload}")
            if kind == "done":
                raws[slot] = payload
                continue
            ready.add(slot)
            if len(ready) == len(workers):
                origin.value = time.monotonic() + 0.05
                db.begin(run, origin.value)
                go.set()
                deadline = origin.value + cfg.duration + START_TIMEOUT
    finally:
        go.set()
        for worker in workers:
            worker.join(10 if not raws else 5)
            if worker.is_alive():
                worker.kill()
                worker.join()
    log = [e for r in raws.values() for e in r.log] if db.counts_in_process else db.log()
    return _merged(list(raws.values()), sorted(log))


# -- the whole demo -----------------------------------------------------------------------------


def open_database(cfg: DemoConfig, scratch: Path) -> Database:
    if cfg.dsn is not None:
        db = PostgresDatabase(cfg.dsn, cfg.rows)
        # Each client thread holds a connection (so does each refresh thread).
        spare = db.max_clients() - 8 * cfg.processes
        if cfg.clients > spare:
            if cfg.clients_fixed or spare < max(2, cfg.processes):
                db.shutdown()
                raise DemoError(
                    f"{cfg.clients} clients need about {cfg.clients + 8 * cfg.processes} "
                    f"PostgreSQL connections and the server has {spare + 8 * cfg.processes} "
                    f"free (max_connections): use --clients {max(1, spare)}"
                )
            cfg.clients = spare  # the default, cut to what the server allows
        return db
    if cfg.db_file is not None:
        return SqliteDatabase(cfg.db_file, cfg.rows)
    return SqliteDatabase(
        scratch / "singleflight-demo.db", cfg.rows, label="SQLite file in a temporary directory"
    )


def _check_redis(url: str) -> None:
    try:
        import redis
    except ImportError as exc:
        raise DemoError(
            "cross-process mode needs the Redis tier: pip install 'pysingleflight[redis]'"
        ) from exc
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise DemoError(f"cannot reach Redis at {url}: {str(exc).splitlines()[0]}") from exc
    finally:
        client.close()


def _describe(cfg: DemoConfig, db: Database) -> str:
    if cfg.processes > 1:
        who = f"{cfg.clients} clients ({'tasks' if cfg.use_asyncio else 'threads'}) in "
        who += f"{cfg.processes} processes"
    else:
        who = f"{cfg.clients} {'asyncio tasks' if cfg.use_asyncio else 'threads'}"
    return (
        f"{db.label}\n{who}, Zipf(s={cfg.zipf:g}) over {cfg.keys:,} hot users, "
        f"{cfg.think * 1000:g} ms think time; cache TTL {cfg.ttl:g} s; {cfg.duration:g} s per mode"
    )


def latency(seconds: float) -> str:
    """A latency for the table: µs below a millisecond, ms below a second, else s."""
    if seconds < 1e-5:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


TABLE_NOTES = """\
q/key/TTL: DB queries per key queried per TTL of the run (1.0: one load of each key
           per expiry, for every process together)
duplicates: queries that started while a query of the same key was still running
at once: the most queries running at the same moment
peak q/s: the most DB queries per second, in {width:g} ms buckets, after the first half TTL
          (that is, at expiries rather than at the cold start)
p50/p99/max: latency of a request, as its client saw it"""


FIGURE_COLUMNS = ("requests", "DB queries", "duplicates", "at once", "peak q/s")
LATENCY_COLUMNS = ("q/key/TTL", "p50", "p99", "max", "errors")
TABLE_TITLE = "Queries the database executed, and request latency"


def _table(title: str | None, names: tuple[str, ...], rows: list[list[str]], wrap: bool) -> Table:
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left")
    table.add_column("mode", no_wrap=not wrap)
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def render_table(
    summaries: list[ModeSummary], width: float, columns: int | None = None
) -> RenderableType:
    """The results, one row per mode, for a terminal ``columns`` wide (``None``: any width).

    When one row per mode does not fit, the figures and the latencies are two tables,
    one above the other, and a long mode name may wrap; no figure is ever cut.
    """
    figures = [
        [
            f"{s.requests:,}",
            f"{s.queries:,}",
            f"{s.duplicates:,}",
            f"{s.most_at_once:,}",
            f"{s.peak_qps:,.0f}",
        ]
        for s in summaries
    ]
    latencies = [
        [
            f"{s.per_key_per_ttl:.2f}",
            latency(s.p50),
            latency(s.p99),
            latency(s.max),
            f"{s.errors:,}",
        ]
        for s in summaries
    ]
    titles = [s.title for s in summaries]
    whole = _table(
        TABLE_TITLE,
        FIGURE_COLUMNS + LATENCY_COLUMNS,
        [[t, *f, *lat] for t, f, lat in zip(titles, figures, latencies, strict=True)],
        wrap=False,
    )
    if columns is None or Console(width=10_000).measure(whole).maximum <= columns:
        return whole
    return RichGroup(
        _table(
            TABLE_TITLE,
            FIGURE_COLUMNS,
            [[t, *f] for t, f in zip(titles, figures, strict=True)],
            wrap=True,
        ),
        _table(
            None,
            LATENCY_COLUMNS,
            [[t, *lat] for t, lat in zip(titles, latencies, strict=True)],
            wrap=True,
        ),
    )


def _verdict(summaries: list[ModeSummary]) -> str:
    by_mode = {s.mode: s for s in summaries}
    naive = by_mode.get("naive")
    lines = []
    for s in summaries:
        if s is naive or naive is None or s.queries == 0:
            continue
        lines.append(
            f"{s.title}: {naive.queries / s.queries:.1f}x fewer database queries than "
            f"{naive.title}, {s.duplicates:,} duplicates (naive: {naive.duplicates:,})"
        )
    return "\n".join(lines)


def run_demo(cfg: DemoConfig, out: Console, err: Console) -> list[ModeSummary]:
    """Run every mode of ``cfg``; print progress to ``err`` and the results to ``out``."""
    if cfg.redis is not None:
        _check_redis(cfg.redis)
    with tempfile.TemporaryDirectory(prefix="singleflight-demo-") as scratch:
        asked = cfg.clients
        try:
            db = open_database(cfg, Path(scratch))
        except DatabaseError as exc:
            raise DemoError(str(exc)) from exc
        if cfg.clients < asked:
            err.print(
                f"PostgreSQL has connections for {cfg.clients} clients: running "
                f"{cfg.clients} rather than {asked} (--clients to choose)",
                highlight=False,
            )
        try:
            return _run_modes(cfg, db, out, err)
        finally:
            db.shutdown()


def _run_modes(cfg: DemoConfig, db: Database, out: Console, err: Console) -> list[ModeSummary]:
    out.print(_describe(cfg, db), highlight=False)
    summaries: list[ModeSummary] = []
    raws: dict[str, RawRun] = {}
    columns = (
        TextColumn("{task.description:<42}"),
        BarColumn(bar_width=24),
        TimeElapsedColumn(),
        TextColumn("{task.fields[requests]:>9,} requests  {task.fields[queries]:>7,} DB queries"),
    )
    with Progress(*columns, console=err, disable=not err.is_terminal) as progress:
        for mode in cfg.modes:
            title = mode_title(mode, cfg.redis is not None, cfg.use_asyncio)
            task = progress.add_task(title, total=cfg.duration, requests=0, queries=0)
            if not err.is_terminal:
                err.print(f"running {title} for {cfg.duration:g} s ...", highlight=False)
            started = time.monotonic()

            def tick(
                requests: int, queries: int, task: Any = task, started: float = started
            ) -> None:
                elapsed = min(time.monotonic() - started, cfg.duration)
                progress.update(task, completed=elapsed, requests=requests, queries=queries)

            run = new_run_id()
            try:
                if cfg.processes > 1:
                    raw = run_processes(cfg, mode, db, run, tick)
                else:
                    runner = run_tasks if cfg.use_asyncio else run_threads
                    raw = runner(cfg, mode, db, run, range(cfg.clients), time.monotonic, tick)
                    if not db.counts_in_process:
                        raw.log = db.log()
            finally:
                db.end()
            progress.update(task, completed=cfg.duration)
            summary = summarize(
                mode,
                title,
                raw.latencies,
                raw.errors,
                raw.log,
                duration=cfg.duration,
                ttl=cfg.ttl,
                width=cfg.bucket,
            )
            if raw.last_error:
                err.print(
                    f"{title}: {raw.errors:,} errors, the last: {redact(raw.last_error)}",
                    highlight=False,
                    markup=False,
                )
            summaries.append(summary)
            raws[mode] = raw
    out.print(render_table(summaries, cfg.bucket, columns=out.width))
    out.print(TABLE_NOTES.format(width=cfg.bucket * 1000), style="dim", highlight=False)
    verdict = _verdict(summaries)
    if verdict:
        out.print(verdict, highlight=False)
    if cfg.out is not None:
        from . import chart  # matplotlib takes a while to import: only where it is used

        chart.write(cfg.out, summaries, cfg, subtitle=_describe(cfg, db).splitlines()[-1])
        out.print(f"chart: {cfg.out}", highlight=False)
    if cfg.json_out is not None:
        _write_json(cfg.json_out, cfg, summaries, raws)
    return summaries


def _write_json(
    path: Path, cfg: DemoConfig, summaries: list[ModeSummary], raws: dict[str, RawRun]
) -> None:
    config = asdict(cfg)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in config.items()}
    config.pop("dsn", None)  # may hold a password
    if config["redis"] is not None:
        config["redis"] = redact(config["redis"])
    config["bucket"] = cfg.bucket
    document = {
        "config": config,
        "modes": [
            asdict(s) | {"log": raws[s.mode].log, "last_error": raws[s.mode].last_error}
            for s in summaries
        ],
    }
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(document))
    tmp.replace(path)


class _TrimmedLines(io.TextIOBase):
    """A text file writing each line to ``file`` without its trailing spaces.

    Output that is not a terminal gets no padding out to the console's width.
    """

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._pending = ""

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._file, "encoding", None) or "utf-8"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self._file.write(line.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending.strip():
            self._file.write(self._pending.rstrip())
        self._pending = ""
        self._file.flush()


def main(cfg: DemoConfig) -> int:
    if sys.stdout.isatty():
        out = Console()
    else:
        # Piped: one row per mode whatever $COLUMNS says, and no padding.
        out = Console(file=cast(TextIO, _TrimmedLines(sys.stdout)), width=200, color_system=None)
    err = Console(stderr=True)
    try:
        run_demo(cfg, out, err)
    finally:
        out.file.flush()
    return 0
