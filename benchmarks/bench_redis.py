"""Redis benchmark: 8 processes on one cold key with a 200 ms loader, on a private redis-server.

    python benchmarks/bench_redis.py            # full run (needs redis-server on PATH)
    python benchmarks/bench_redis.py --quick    # fewer repetitions
    python benchmarks/bench_redis.py --json

Install the peers first to compare with them: pip install -e '.[bench]'.

Subjects, each run by ``--procs`` worker processes of ``--callers`` callers
(threads, or tasks for the asyncio ones), all asking for one new key at the
same instant, interleaved round by round (the order rotates each round):

  floor     the least a cross-process coalescer can do: one process sleeps
            200 ms then XADDs once; every other process blocks in one XREAD and
            wakes its callers with a threading.Event.  No leadership, no lease.
  sync      singleflight.redis.RedisGroup (defaults)
  async     singleflight.redis.AsyncRedisGroup (defaults)
  dogpile   dogpile.cache Redis backend, distributed_lock=True (lock_sleep 0.1 s)
  cashews   cashews @cache(ttl, lock=True)

First, uncontended (one process): a lead on a new key (ACQUIRE + COMPLETE)
against two PINGs, and a hit against one PING, in microseconds per call.

Then, medians over the rounds, each a ratio to the floor measured in the
same rounds:
  loads         loader runs per round (the floor always has 1)
  added p50/p99 ms from the loader's return to a caller's return, over the
                callers of the processes that did not load
  cmds/caller   commands the server ran per caller (INFO commandstats deltas,
                commands run by scripts included)
  round trips/caller  commands the clients sent (EVALSHA, XREAD...), per caller
Goals of the issue for RedisGroup/AsyncRedisGroup: 1 load; added p50 <= 5 ms
on loopback; <= 1 command per caller.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "redis"))  # the private-server helpers

from _common import Figure, interleaved, report  # noqa: E402
from _redis_fleet import Fleet  # noqa: E402
from _redis_server import RedisServer, find_server  # noqa: E402

WORKER = str(HERE / "_redis_bench_worker.py")
SUBJECTS = ["floor", "sync", "async", "dogpile", "cashews"]
LABELS = {
    "sync": "RedisGroup",
    "async": "AsyncRedisGroup",
    "dogpile": "dogpile.cache",
    "cashews": "cashews",
}
NOT_COUNTED = ("info", "config|resetstat", "flushall")
ROUND_TRIPS = ("evalsha", "eval", "xread", "xadd")


def available(subject: str) -> bool:
    module = {"dogpile": "dogpile.cache", "cashews": "cashews"}.get(subject)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_round(fleet: Fleet, server: RedisServer, key: str, callers: int) -> dict[str, float] | None:
    before = server.commandstats()
    fleet.start(60.0, 0.3, key)
    reports = fleet.reports(60.0, last=False)
    after = server.commandstats()
    if not fleet.loads_file.exists():
        raise RuntimeError(f"no load in round {key}: {reports}")
    lines = [line.split() for line in fleet.loads_file.read_text().splitlines()]
    lines = [(kind, int(pid), float(t)) for kind, pid, t, k in lines if k == key]
    ends = [(t, pid) for kind, pid, t in lines if kind == "end"]
    if not ends:
        return None
    loaded_at, _ = min(ends)
    loaders = {pid for kind, pid, _ in lines if kind == "start"}
    added = [
        (outcome["t"] - loaded_at) * 1000
        for r in reports
        if r["pid"] not in loaders
        for outcome in r["outcomes"]
    ]
    errors = sum(1 for r in reports for o in r["outcomes"] if o["error"])
    delta = {
        name: count - before.get(name, 0)
        for name, count in after.items()
        if name not in NOT_COUNTED
    }
    total = sum(len(r["outcomes"]) for r in reports)
    return {
        "loads": float(len([1 for kind, _, _ in lines if kind == "start"])),
        "p50": percentile(added, 0.5) if added else float("nan"),
        "p99": percentile(added, 0.99) if added else float("nan"),
        "cmds": sum(delta.values()) / total,
        # What the clients sent (scripts' own commands excluded): only the floor
        # and our groups use nothing but these.
        "trips": sum(delta.get(name, 0) for name in ROUND_TRIPS) / total,
        "errors": float(errors),
    }


def bench_uncontended(server: RedisServer, n: int, reps: int) -> list[Figure]:
    """One process, nobody else: the cost of a lead (new key) and of a hit, vs PINGs."""
    import redis

    from singleflight.redis import RedisGroup

    client = redis.Redis(port=server.port)
    group: RedisGroup[str, int] = RedisGroup(client, namespace="solo", result_ttl=600)
    counter = iter(range(10**9))

    def pings(count: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            for _ in range(count):
                client.ping()
        return (time.perf_counter() - started) / n * 1e6

    def leads() -> float:
        started = time.perf_counter()
        for _ in range(n):
            group.do(f"k{next(counter)}", int)
        return (time.perf_counter() - started) / n * 1e6

    group.do("hot", int)

    def hits() -> float:
        started = time.perf_counter()
        for _ in range(n):
            group.do("hot", int)
        return (time.perf_counter() - started) / n * 1e6

    leads(), pings(2), hits()  # warm up
    floor2, lead = interleaved(lambda: pings(2), leads, reps)
    floor1, hit = interleaved(lambda: pings(1), hits, reps)
    group.close()
    client.close()
    return [
        Figure("RedisGroup lead, uncontended (2 PINGs)", "us", floor2, lead, None),
        Figure("RedisGroup hit (1 PING)", "us", floor1, hit, None),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--procs", type=int, default=8)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    reps = args.reps or (3 if args.quick else 9)
    binary = find_server("redis")
    if binary is None:
        raise SystemExit("bench_redis needs redis-server on PATH")
    subjects = [s for s in SUBJECTS if available(s)]
    missing = [s for s in SUBJECTS if s not in subjects]
    if missing:
        print(f"# not installed, skipped: {', '.join(missing)} (pip install -e '.[bench]')")

    rounds: dict[str, list[dict[str, float]]] = {s: [] for s in subjects}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(binary) as server:
        solo = bench_uncontended(server, 300 if args.quick else 2000, reps)
        config = {"port": server.port, "callers": args.callers, "loader_seconds": 0.2}
        fleets = {
            s: Fleet(args.procs, config | {"subject": s}, Path(tmp) / f"{s}.loads", WORKER)
            for s in subjects
        }
        try:
            for rep in range(reps + 1):  # round 0 warms connections and imports
                order = subjects[rep % len(subjects) :] + subjects[: rep % len(subjects)]
                for subject in order:
                    result = one_round(fleets[subject], server, f"r{rep}-{subject}", args.callers)
                    if rep and result is not None:
                        rounds[subject].append(result)
                    time.sleep(0.05)
        finally:
            for fleet in fleets.values():
                for worker in fleet.workers:
                    worker.send("quit")
                fleet.stop()

    def median(subject: str, metric: str) -> float:
        return statistics.median(r[metric] for r in rounds[subject])

    figures = []
    for subject in subjects[1:]:
        label = LABELS[subject]
        for metric, unit, name in (
            ("loads", "", "loads"),
            ("p50", "ms", "added p50"),
            ("p99", "ms", "added p99"),
            ("cmds", "", "cmds/caller"),
            ("trips", "", "round trips/caller"),
        ):
            if metric == "trips" and subject not in ("sync", "async"):
                continue
            target = 1.0 if (metric == "loads" and subject in ("sync", "async")) else None
            figures.append(
                Figure(
                    f"{label} {name}",
                    unit,
                    median("floor", metric),
                    median(subject, metric),
                    target,
                )
            )
    report(solo + figures, as_json=args.json)
    if args.json:
        return
    print(f"\n{args.procs} processes x {args.callers} callers, 200 ms loader, {reps} rounds")
    print(f"floor: added p50 {median('floor', 'p50'):.2f} ms, p99 {median('floor', 'p99'):.2f} ms")
    for subject in ("sync", "async"):
        if subject not in subjects:
            continue
        p50, cmds, loads = median(subject, "p50"), median(subject, "cmds"), median(subject, "loads")
        errors = sum(r["errors"] for r in rounds[subject])
        goals = [
            ("1 load", loads == 1),
            ("added p50 <= 5 ms", p50 <= 5.0),
            ("<= 1 command per caller", cmds <= 1.0),
            ("no errors", errors == 0),
        ]
        verdicts = ", ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in goals)
        print(f"{LABELS[subject]}: {verdicts}")


if __name__ == "__main__":
    main()
