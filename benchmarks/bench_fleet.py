"""Fleet workload: N processes started at staggered times over one TTL, hot keys, a slow loader.

    python benchmarks/bench_fleet.py [--ttl 4] [--processes 8] [--keys 20] [--periods 4]
                                     [--impl ours ...]

For each implementation it reports loads per key per TTL, the oldest value
served as fresh (now - when its load began; ``oldest_after_its_load_s``: now -
when its load ended, so a slow load does not count), and the latency of reads
(p50/p99; a hit for all but a few).  Loads per key per TTL: the loader records when each
load began (in Redis); for each key, the loads that began within ``--periods``
whole TTLs from its first load, divided by that number of TTLs.  One load per
TTL is 1.00: a key is loaded first, then again each time its entry expired, a
TTL (plus a load) later, so the load that would begin the next period falls
after the window.  ``early_reloads`` counts loads that began less than a TTL
after the key's previous load (a fresh value was there to serve); the workers
read until every key's window has ended.  For
``ours`` it also measures how long an ``invalidate()`` takes to reach every
process's L1 (p50/p99).  Implementations:

* ``ours``: ``LoadingCache(ttl=T, jitter=0, fleet=Fleet(redis))``
* ``redisgroup``: ``LoadingCache(ttl=T, jitter=0, group=RedisGroup(redis))``, the
  two-tier-less baseline
* ``cashews``: ``@cache(ttl=T, lock=True)`` on Redis (asyncio)
* ``dogpile``: dogpile.cache's Redis backend, ``distributed_lock=True``

A private redis-server (``redis-server`` on PATH) is started on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

LOAD_SECONDS = 0.05


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _loader(raw: Any, key: str) -> dict[str, Any]:
    started = time.time()
    raw.rpush(f"bench:loads:{key}", repr(started))
    time.sleep(LOAD_SECONDS)
    return {"k": key, "t": started, "d": time.time() - started}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def worker(
    impl: str, port: int, ttl: float, keys: list[str], start: float, until: float, out: Any
) -> None:
    import redis

    raw = redis.Redis(port=port)
    oldest = since_load = 0.0
    latencies: list[float] = []
    while time.monotonic() < start:
        time.sleep(0.001)

    def account(value: dict[str, Any], took: float) -> None:
        nonlocal oldest, since_load
        age = time.time() - value["t"]
        oldest = max(oldest, age)
        since_load = max(since_load, age - value["d"])
        latencies.append(took)

    if impl == "cashews":
        from cashews import cache

        cache.setup(f"redis://127.0.0.1:{port}/0")

        @cache(ttl=ttl, lock=True, key="bench:cashews:{key}")
        async def get(key: str) -> dict[str, Any]:
            return await asyncio.to_thread(_loader, raw, key)

        async def run() -> None:
            while time.monotonic() < until:
                for key in keys:
                    t = time.perf_counter()
                    value = await get(key)
                    account(value, time.perf_counter() - t)
                await asyncio.sleep(0.001)

        asyncio.run(run())
    else:
        if impl == "dogpile":
            from dogpile.cache import make_region

            region = make_region().configure(
                "dogpile.cache.redis",
                expiration_time=ttl,
                arguments={
                    "host": "127.0.0.1",
                    "port": port,
                    "distributed_lock": True,
                    "thread_local_lock": False,
                    "lock_timeout": 5,
                    "redis_expiration_time": int(ttl * 2) + 1,
                },
            )

            def read(key: str) -> dict[str, Any]:
                return region.get_or_create(key, lambda: _loader(raw, key))  # type: ignore[no-any-return]
        else:
            from singleflight import LoadingCache
            from singleflight.redis import Fleet, RedisGroup

            client = redis.Redis(port=port)
            if impl == "ours":
                cache: Any = LoadingCache(
                    lambda key: _loader(raw, key),
                    ttl=ttl,
                    jitter=0,
                    fleet=Fleet(client, namespace="bench"),
                )
                cache._fleet.wait_trusted(5)
            else:
                cache = LoadingCache(
                    lambda key: _loader(raw, key),
                    ttl=ttl,
                    jitter=0,
                    group=RedisGroup(client, namespace="bench"),
                )
            read = cache.get
        while time.monotonic() < until:
            for key in keys:
                t = time.perf_counter()
                value = read(key)
                account(value, time.perf_counter() - t)
            time.sleep(0.001)
    out.put(
        {
            "oldest": oldest,
            "since_load": since_load,
            "latencies": latencies[:: max(1, len(latencies) // 20000)],
        }
    )


def invalidation_worker(port: int, ready: Any, drops: Any, stop: Any) -> None:
    import redis

    from singleflight import LoadingCache
    from singleflight.events import InvalidationReceived
    from singleflight.redis import Fleet

    def received(event: object) -> None:  # told once the L1 entry is gone
        if isinstance(event, InvalidationReceived):
            drops.put((event.name, time.monotonic()))

    cache: Any = LoadingCache(
        lambda key: key,
        ttl=600,
        fleet=Fleet(redis.Redis(port=port), namespace="inv"),
        on_event=received,
    )
    cache._fleet.wait_trusted(5)
    ready.put(os.getpid())
    stop.wait(120)


def load_counts(starts: dict[str, list[float]], ttl: float, periods: int) -> dict[str, Any]:
    """Loads per key per TTL over ``periods`` whole TTLs from each key's first load
    (``starts``: when each load of each key began), and the loads that began less
    than a TTL after the key's previous one."""
    counts = []
    early = 0
    for began in starts.values():
        began = sorted(began)
        counts.append(sum(1 for t in began if t < began[0] + periods * ttl))
        early += sum(1 for a, b in itertools.pairwise(began) if b - a < ttl)
    return {
        "loads_per_key_per_ttl": sum(counts) / len(counts) / periods,
        "loads_per_key": [min(counts), max(counts)],
        "early_reloads": early,
    }


def fleet_run(
    impl: str, port: int, ttl: float, processes: int, nkeys: int, periods: int
) -> dict[str, Any]:
    import redis

    raw = redis.Redis(port=port)
    raw.flushall()
    keys = [f"hot{i}" for i in range(nkeys)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    t0 = time.monotonic() + 5.0  # time for the interpreters to start
    # Staggered starts over the first TTL; each key's window is the ``periods``
    # TTLs from its first load (the first process loads them one by one, in
    # ``nkeys`` loads' time): one more TTL covers every key's.
    window = (periods + 1) * ttl
    until = t0 + window
    procs = [
        ctx.Process(
            target=worker, args=(impl, port, ttl, keys, t0 + i * ttl / processes, until, out)
        )
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    reports = [out.get(timeout=window + 120) for _ in procs]
    for p in procs:
        p.join(30)
    starts = {k: [float(t) for t in raw.lrange(f"bench:loads:{k}", 0, -1)] for k in keys}
    last_read = time.time() - (time.monotonic() - until)
    if any(not s or min(s) + periods * ttl > last_read for s in starts.values()):
        raise RuntimeError("the workers stopped before a key's window ended: a slow start?")
    latencies = [x for r in reports for x in r["latencies"]]
    return {
        "impl": impl,
        "ttl": ttl,
        **load_counts(starts, ttl, periods),
        "oldest_fresh_s": max(r["oldest"] for r in reports),
        "oldest_after_its_load_s": max(r["since_load"] for r in reports),
        "read_p50_us": _pct(latencies, 0.5) * 1e6,
        "read_p99_us": _pct(latencies, 0.99) * 1e6,
    }


def invalidation_run(port: int, processes: int, rounds: int = 100) -> dict[str, Any]:
    import redis

    from singleflight import LoadingCache
    from singleflight.redis import Fleet

    ctx = mp.get_context("spawn")
    ready, drops, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=invalidation_worker, args=(port, ready, drops, stop))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    cache: Any = LoadingCache(
        lambda key: key, ttl=600, fleet=Fleet(redis.Redis(port=port), namespace="inv")
    )
    cache._fleet.wait_trusted(5)
    each: list[float] = []
    last: list[float] = []
    for i in range(rounds):
        key = f"k{i}"
        start = time.monotonic()
        cache.invalidate(key)
        times = []
        while len(times) < len(procs):
            arg, at = drops.get(timeout=10)
            if arg == key:
                times.append(at)
        each += [t - start for t in times]
        last.append(max(times) - start)
        time.sleep(0.01)
    stop.set()
    for p in procs:
        p.join(10)
    return {
        "invalidation_p50_ms": statistics.median(each) * 1e3,
        "invalidation_p99_ms": _pct(each, 0.99) * 1e3,
        "all_processes_p50_ms": statistics.median(last) * 1e3,
        "all_processes_p99_ms": _pct(last, 0.99) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ttl", type=float, action="append")
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--periods", type=int, default=4, help="TTLs measured per key")
    parser.add_argument(
        "--impl", action="append", choices=["ours", "redisgroup", "cashews", "dogpile"]
    )
    parser.add_argument("--no-invalidation", action="store_true")
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not on PATH")
    port = _free_port()
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        results = []
        for ttl in args.ttl or [4.0]:
            for impl in args.impl or ["ours", "redisgroup", "cashews", "dogpile"]:
                result = fleet_run(impl, port, ttl, args.processes, args.keys, args.periods)
                print(json.dumps(result), flush=True)
                results.append(result)
        if not args.no_invalidation:
            time.sleep(1.0)
            print(json.dumps(invalidation_run(port, args.processes)), flush=True)
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
