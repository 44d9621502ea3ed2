"""Loading-cache benchmarks: each figure is a ratio to a floor measured in the same run.

    python benchmarks/bench_cache.py            # full run
    python benchmarks/bench_cache.py --quick    # fewer repetitions, a shorter simulation
    python benchmarks/bench_cache.py --json
    python benchmarks/bench_cache.py --only hit # or: sim
    python benchmarks/bench_cache.py --callgrind  # CPU instructions per hit (valgrind)

Figures:
  hit               LoadingCache.get of a fresh entry
                    / dict[key] + time.monotonic(), inline in the loop          <= 1.5x (the issue's target)
  hit-vs-call       the same get
                    / a Python function doing dict[key] + time.monotonic()      reported
  async-hit         await AsyncLoadingCache.get of a fresh entry
                    / await of an async function doing the same lookup + clock  reported
  cached-hit        a call of a @cached function that hits (keys built from the
                    arguments) / dict[key] + time.monotonic(), inline            reported
  --callgrind       CPU instructions per hit, counted by callgrind (stable where
                    times are not): LoadingCache.get, the same with fleet= (its L1
                    hit; needs redis-server on 127.0.0.1:6379), and
                    AsyncLoadingCache.get, each / a Python function (an async one
                    for the async hit) doing dict[key], time.monotonic() and one
                    comparison                                                  <= 1.3x
  sim-*             simulated traffic: 10,000 hot keys, Zipf(1.0) requests at a
                    fixed rate, fixed TTL, every key loaded together at t=0.
                    Peak backend loads per second around the first TTL boundary,
                    for each configuration / the same with jitter=0             reported
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import shutil
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from time import monotonic
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))

from _common import Figure, instructions_per_call, interleaved, report

from singleflight import AsyncLoadingCache, LoadingCache, cached

# -- the hit path ---------------------------------------------------------------------------


def _keys(n: int) -> list[int]:
    keys = list(range(n))
    random.Random(0).shuffle(keys)
    return keys


def bench_hit(n: int, passes: int, reps: int) -> tuple[Figure, Figure]:
    keys = _keys(n)
    plain = {k: k for k in keys}
    cache: LoadingCache[int, int] = LoadingCache(lambda k: k, ttl=1e9, maxsize=None)
    for k in keys:
        cache.get(k)

    def floor_inline() -> float:
        d, m = plain, monotonic
        t0 = time.perf_counter()
        for _ in range(passes):
            for k in keys:
                d[k]
                m()
        return (time.perf_counter() - t0) / (passes * n) * 1e9

    def floor_call() -> float:
        d, m = plain, monotonic

        def lookup(k: int) -> int:
            value = d[k]
            m()
            return value

        t0 = time.perf_counter()
        for _ in range(passes):
            for k in keys:
                lookup(k)
        return (time.perf_counter() - t0) / (passes * n) * 1e9

    def subject() -> float:
        get = cache.get
        t0 = time.perf_counter()
        for _ in range(passes):
            for k in keys:
                get(k)
        return (time.perf_counter() - t0) / (passes * n) * 1e9

    floor, hit = interleaved(floor_inline, subject, reps)
    call_floor, hit2 = interleaved(floor_call, subject, reps)
    assert cache.stats().misses == n  # every timed get was a hit
    return (
        Figure("hit (ns/get) / dict[k]+monotonic() inline", "ns", floor, hit, 1.5),
        Figure("hit-vs-call (ns/get) / same in a function", "ns", call_floor, hit2, None),
    )


def bench_async_hit(n: int, passes: int, reps: int) -> Figure:
    keys = _keys(n)
    plain = {k: k for k in keys}

    async def body(floor: bool) -> float:
        cache: AsyncLoadingCache[int, int] = AsyncLoadingCache(_aident, ttl=1e9, maxsize=None)
        for k in keys:
            await cache.get(k)
        d, m = plain, monotonic

        async def lookup(k: int) -> int:
            value = d[k]
            m()
            return value

        get = lookup if floor else cache.get
        t0 = time.perf_counter()
        for _ in range(passes):
            for k in keys:
                await get(k)
        return (time.perf_counter() - t0) / (passes * n) * 1e9

    floor, subject = interleaved(
        lambda: asyncio.run(body(True)), lambda: asyncio.run(body(False)), reps
    )
    return Figure("async-hit (ns/get) / async fn doing the same", "ns", floor, subject, None)


async def _aident(k: int) -> int:
    return k


def bench_cached_hit(n: int, passes: int, reps: int) -> Figure:
    keys = _keys(n)
    plain = {k: k for k in keys}

    @cached(ttl=1e9, maxsize=None)
    def square(x: int) -> int:
        return x * x

    for k in keys:
        square(k)

    def floor() -> float:
        d, m = plain, monotonic
        t0 = time.perf_counter()
        for _ in range(passes):
            for k in keys:
                d[k]
                m()
        return (time.perf_counter() - t0) / (passes * n) * 1e9

    def subject() -> float:
        f = square
        t0 = time.perf_counter()
        for _ in range(passes):
            for k in keys:
                f(k)
        return (time.perf_counter() - t0) / (passes * n) * 1e9

    floor_ns, subject_ns = interleaved(floor, subject, reps)
    return Figure(
        "cached-hit (ns/call) / dict[k]+monotonic() inline", "ns", floor_ns, subject_ns, None
    )


# -- the hit path in CPU instructions (callgrind) --------------------------------------------

CALLGRIND_CASES = ["floor", "hit", "fleet-hit", "async-floor", "async-hit"]


def _callgrind_subject(case: str) -> Any:
    """The warmed-up callable of ``case``: each call is one hit of key 7."""
    d, m, until = {7: 7}, monotonic, float("inf")
    if case == "floor":

        def floor(key: int) -> int | None:
            value = d[key]
            if m() < until:
                return value
            return None

        return floor
    if case == "async-floor":

        async def afloor(key: int) -> int | None:
            value = d[key]
            if m() < until:
                return value
            return None

        return afloor
    if case == "async-hit":
        return AsyncLoadingCache(_aident, ttl=1e9).get
    cache: LoadingCache[int, int]
    if case == "hit":
        cache = LoadingCache(lambda k: k, ttl=1e9)
    elif case == "fleet-hit":
        import redis

        from singleflight.redis import Fleet

        fleet = Fleet(redis.Redis(host="127.0.0.1", port=6379), namespace=f"bench-{os.getpid()}")
        cache = LoadingCache(lambda k: k, ttl=1e9, fleet=fleet)
        if not fleet.wait_trusted(10):  # the L1 is used once the channel is subscribed
            raise SystemExit("fleet-hit: no invalidation channel (is redis-server running?)")
        cache.invalidate(7)
    else:
        raise SystemExit(f"unknown case {case!r}")
    cache.get(7)
    get = cache.get
    get(7)
    assert cache.stats().hits == 1, "not an L1 hit"
    return get


def run_callgrind_case(case: str, n: int) -> None:
    """Make ``n`` hits of ``case`` (the child process of --callgrind)."""
    fn = _callgrind_subject(case)
    if case.startswith("async"):

        async def main() -> None:
            for _ in range(1000):  # warm up (specialise) before the counted calls
                await fn(7)
            for _ in range(n):
                await fn(7)

        asyncio.run(main())
    else:
        for _ in range(1000):
            fn(7)
        for _ in range(n):
            fn(7)
    os._exit(0)  # no teardown (a fleet's threads) in the count


def bench_callgrind(cases: list[str], n: int) -> list[Figure]:
    counts = {case: instructions_per_call(__file__, case, n) for case in cases}
    figures = []
    for name, floor, subject in [
        ("LoadingCache.get hit (instructions)", "floor", "hit"),
        ("fleet= L1 hit (instructions)", "floor", "fleet-hit"),
        ("AsyncLoadingCache.get hit (instructions)", "async-floor", "async-hit"),
    ]:
        if floor in counts and subject in counts:
            figures.append(Figure(name, "i", counts[floor], counts[subject], 1.3))
    return figures


# -- the TTL-boundary simulation ----------------------------------------------------------------


class SimClock:
    """Simulated seconds.  A loader calls ``took(s)``: the cache's next clock read in
    that thread (its end-of-load stamp) sees the load as having taken ``s``, which
    is the delta XFetch scales by, while the simulation's time goes on unchanged."""

    def __init__(self) -> None:
        self.now = 0.0
        self._local = threading.local()

    def __call__(self) -> float:
        extra = getattr(self._local, "extra", 0.0)
        if extra:
            self._local.extra = 0.0
        return self.now + extra

    def took(self, seconds: float) -> None:
        self._local.extra = seconds


@dataclass
class SimResult:
    name: str
    peak: int  # highest loads in one simulated second near the first TTL boundary
    boundary_loads: int  # loads within the boundary window
    boundary_waits: int  # reads that waited for a load within the window
    hot_waits: int  # ...of them, reads of the 100 hottest keys
    mean: float  # loads per second over the whole run after the initial fill
    early: int


def simulate(
    name: str,
    *,
    jitter: float,
    early_refresh: float | None,
    n_keys: int = 10_000,
    rate: int = 20_000,
    ttl: float = 60.0,
    load_time: float = 0.05,
    duration: float = 150.0,
    zipf: float = 1.0,
    seed: int = 1,
) -> SimResult:
    clock = SimClock()
    loads: Counter[int] = Counter()
    lock = threading.Lock()

    def load(key: int) -> int:
        with lock:
            loads[int(clock.now)] += 1
        clock.took(load_time)
        return key

    cache: LoadingCache[int, int] = LoadingCache(
        load,
        ttl=ttl,
        jitter=jitter,
        early_refresh=early_refresh,
        maxsize=n_keys,
        clock=clock,
        random=random.Random(seed).random,
        refresh_workers=1,
    )
    for key in range(n_keys):  # a cold start: everything loaded together at t=0
        cache.get(key)
    rng = random.Random(seed)
    cum = list(itertools.accumulate(1.0 / (i + 1) ** zipf for i in range(n_keys)))
    total = int(duration * rate)
    lo, hi = int(ttl * 0.85), int(ttl * 1.15)
    # Loads are instant in real time here, so a read that missed stands for the
    # load on the caller's path, and the reads of that key in the next load_time
    # seconds stand for the callers that would have joined it and waited.
    busy_until: dict[int, float] = {}
    waits = hot_waits = 0
    store = cache._store
    chunk = 200_000
    i = 0
    get = cache.get
    while i < total:
        sampled = rng.choices(range(n_keys), cum_weights=cum, k=min(chunk, total - i))
        for key in sampled:
            now = clock.now = i / rate
            misses, refreshes = store.misses, store.early_refreshes
            get(key)
            i += 1
            if store.early_refreshes != refreshes:
                # Let the background refresh finish before simulated time moves on
                # (real threads would otherwise lag it by a GIL switch interval).
                pool = cache._background._executor
                assert pool is not None
                pool.submit(int).result()
            waited = store.misses != misses
            if waited:
                busy_until[key] = now + load_time
            elif now < busy_until.get(key, -1.0):
                waited = True
            if waited and lo <= now < hi + 1:
                waits += 1
                hot_waits += key < 100
    cache.close()
    window = range(lo, hi + 1)
    peak = max(loads[s] for s in window)
    boundary_loads = sum(loads[s] for s in window)
    after_fill = sum(loads[s] for s in range(1, int(duration)))
    return SimResult(
        name,
        peak,
        boundary_loads,
        waits,
        hot_waits,
        after_fill / (duration - 1),
        cache.stats().early_refreshes,
    )


def bench_sim(quick: bool) -> tuple[list[Figure], list[SimResult]]:
    options = {"duration": 80.0, "rate": 10_000} if quick else {}
    configs = [
        ("jitter=0", 0.0, None),
        ("jitter=0.1 (default)", 0.1, None),
        ("jitter=0, early_refresh=1", 0.0, 1.0),
        ("jitter=0.1, early_refresh=1", 0.1, 1.0),
    ]
    results = [
        simulate(name, jitter=jitter, early_refresh=beta, **options)  # type: ignore[arg-type]
        for name, jitter, beta in configs
    ]
    base = results[0]
    figures = [
        Figure(f"sim peak loads/s: {r.name} / jitter=0", "/s", base.peak, r.peak, None)
        for r in results[1:]
    ]
    return figures, results


def print_sim(results: list[SimResult]) -> None:
    print()
    print("TTL-boundary simulation: 10,000 keys loaded together at t=0, Zipf(1.0) reads,")
    print("TTL 60 s, loads take 0.05 s; window = 51..69 s (the first boundary +-15%)")
    width = max(len(r.name) for r in results)
    print(
        f"{'configuration':<{width}}  {'peak loads/s':>12}  {'loads in window':>15}"
        f"  {'reads waiting':>13}  {'top-100 keys':>12}  {'mean loads/s':>12}  {'early':>6}"
    )
    for r in results:
        print(
            f"{r.name:<{width}}  {r.peak:>12}  {r.boundary_loads:>15}  {r.boundary_waits:>13}"
            f"  {r.hot_waits:>12}  {r.mean:>12.1f}  {r.early:>6}"
        )
    print("(reads waiting: reads in the window that found their key loading, i.e. a miss")
    print(" or a read within 0.05 s after one; top-100 keys: those reads of the hottest keys)")


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions, shorter simulation"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--only", help="comma-separated figure groups to run (hit,sim)")
    parser.add_argument(
        "--callgrind", action="store_true", help="CPU instructions per hit (needs valgrind)"
    )
    parser.add_argument("--run", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        run_callgrind_case(args.run[0], int(args.run[1]))
    if args.callgrind:
        if shutil.which("valgrind") is None:
            raise SystemExit("--callgrind needs valgrind")
        cases = CALLGRIND_CASES if args.only is None else args.only.split(",")
        figures = bench_callgrind(cases, 2000)
        print(f"Python {sys.version.split()[0]}; CPU instructions per hit (callgrind)")
        report(figures, args.json)
        return figures
    reps = 5 if args.quick else 11
    passes = 20 if args.quick else 50
    only = args.only.split(",") if args.only else ["hit", "sim"]
    figures: list[Figure] = []
    sim_results: list[SimResult] = []
    if "hit" in only:
        figures.extend(bench_hit(2000, passes, reps))
        figures.append(bench_async_hit(2000, passes // 2, reps))
        figures.append(bench_cached_hit(2000, passes, reps))
    if "sim" in only:
        sim_figures, sim_results = bench_sim(args.quick)
        figures.extend(sim_figures)
    print(
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; medians of interleaved repetitions"
    )
    report(figures, args.json)
    if sim_results and not args.json:
        print_sim(sim_results)
    return figures


if __name__ == "__main__":
    main()
