"""Decorator hit costs against their peers: CPU instructions (callgrind) and times.

    python benchmarks/bench_decorators.py              # times (ns per hit), same-run ratios
    python benchmarks/bench_decorators.py --callgrind  # instructions per hit (needs valgrind)

Every subject is a hit of ``def load(user_id, region="eu", limit=10)`` (or its async
form), called as ``load(7)`` ("positional") and ``load(user_id=7, limit=5)``
("keywords"), against ``functools.lru_cache``, ``cachetools.cached(TTLCache)`` and
``async_lru.alru_cache(ttl=...)`` (the ``bench`` extra), and ``LoadingCache.get``
against a dict lookup plus ``time.monotonic()``.

Instructions are counted by running one case in a child process under callgrind
twice, with N and 11 N hits, and dividing the difference by 10 N: interpreter start,
imports and the warm-up cancel out.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import instructions_per_call

CASES = [
    "lru",
    "lru-kw",
    "cachetools",
    "cachetools-kw",
    "cached",
    "cached-kw",
    "alru",
    "cached-async",
    "floor",
    "get",
]


def _subject(case: str) -> tuple[object, bool]:
    """The callable of ``case`` (warmed up) and whether it is called with keywords."""
    from singleflight import LoadingCache, cached

    kw = case.endswith("-kw")
    name = case.removesuffix("-kw")
    if name == "lru":

        @functools.cache  # lru_cache(maxsize=None)
        def load(user_id: int, region: str = "eu", limit: int = 10) -> int:
            return user_id

    elif name == "cachetools":
        import cachetools

        @cachetools.cached(cachetools.TTLCache(maxsize=10_000, ttl=600))
        def load(user_id: int, region: str = "eu", limit: int = 10) -> int:
            return user_id

    elif name == "cached":

        @cached(ttl=600)
        def load(user_id: int, region: str = "eu", limit: int = 10) -> int:
            return user_id

    elif name == "alru":
        from async_lru import alru_cache

        @alru_cache(maxsize=10_000, ttl=600)
        async def aload(user_id: int, region: str = "eu", limit: int = 10) -> int:
            return user_id

        return aload, kw
    elif name == "cached-async":

        @cached(ttl=600)
        async def aload2(user_id: int, region: str = "eu", limit: int = 10) -> int:
            return user_id

        return aload2, kw
    elif name == "floor":
        d, m = {7: 7}, time.monotonic

        def floor(key: int) -> int:
            value = d[key]
            m()
            return value

        return floor, False
    elif name == "get":
        cache: LoadingCache[int, int] = LoadingCache(lambda k: k, ttl=600)
        cache.get(7)
        return cache.get, False
    else:
        raise SystemExit(f"unknown case {case!r}")
    load(7)
    load(user_id=7, limit=5)
    return load, kw


def run(case: str, n: int) -> None:
    """Make ``n`` hits of ``case`` (the child process of --callgrind)."""
    fn, kw = _subject(case)
    if asyncio.iscoroutinefunction(fn):

        async def main() -> None:
            await fn(7)  # type: ignore[operator]
            for _ in range(n):
                await fn(7)  # type: ignore[operator]

        asyncio.run(main())
        return
    if kw:
        for _ in range(n):
            fn(user_id=7, limit=5)  # type: ignore[operator]
    else:
        for _ in range(n):
            fn(7)  # type: ignore[operator]


def instructions(case: str, n: int) -> float:
    return instructions_per_call(__file__, case, n)


def nanoseconds(case: str, n: int, reps: int) -> float:
    fn, kw = _subject(case)
    samples = []
    for _ in range(reps):
        if asyncio.iscoroutinefunction(fn):

            async def main() -> float:
                t0 = time.perf_counter()
                for _ in range(n):
                    await fn(7)  # type: ignore[operator]
                return time.perf_counter() - t0

            samples.append(asyncio.run(main()))
        else:
            t0 = time.perf_counter()
            if kw:
                for _ in range(n):
                    fn(user_id=7, limit=5)  # type: ignore[operator]
            else:
                for _ in range(n):
                    fn(7)  # type: ignore[operator]
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples) / n * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--run", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", choices=CASES)
    args = parser.parse_args()
    if args.run:
        run(args.run[0], int(args.run[1]))
        return
    cases = args.only or CASES
    if args.callgrind:
        if shutil.which("valgrind") is None:
            raise SystemExit("--callgrind needs valgrind")
        figures = {case: instructions(case, 2000) for case in cases}
        unit = "instructions"
    else:
        figures = {case: nanoseconds(case, 200_000, 11) for case in cases}
        unit = "ns"
    for case, value in figures.items():
        print(f"{case:16} {value:10.0f} {unit}")

    def ratio(a: str, b: str) -> None:
        if a in figures and b in figures:
            print(f"{a} / {b}: {figures[a] / figures[b]:.2f}x")

    ratio("cached", "lru")
    ratio("cached-kw", "lru-kw")
    ratio("cached", "cachetools")
    ratio("cached-kw", "cachetools-kw")
    ratio("cached-async", "alru")
    ratio("get", "floor")


if __name__ == "__main__":
    main()
