"""One worker process of the multi-process Redis tests (and of benchmarks/bench_redis.py).

    python _redis_worker.py '<json config>'

Builds a RedisGroup (``"mode": "sync"``, callers are threads) or an
AsyncRedisGroup (``"async"``, callers are tasks of one loop), prints
``ready``, then reads a start time (``time.monotonic()``, which is one clock
for every process on Linux) from stdin, waits for it, and has ``callers``
callers call ``do(key, loader)`` at once.  The loader appends ``start`` and
``end`` lines (pid, time) to ``loads_file``, so runs are counted outside Redis
and survive a killed worker.  Finally one JSON line goes to stdout: every
caller's outcome and return time, and the group's stats.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import threading
import time
from typing import Any

from _redis_clients import async_client, sync_client

from singleflight.redis import AsyncRedisGroup, RedisGroup


def _note(path: str, what: str) -> None:
    # One small O_APPEND write per line: lines from many processes never interleave.
    line = f"{what} {os.getpid()} {time.monotonic():.6f}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _options(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "namespace": config.get("namespace", "test"),
        "lease": config.get("lease", 3.0),
        "result_ttl": config.get("result_ttl", 5.0),
        "max_wait": config.get("max_wait", 30.0),
        "on_redis_error": config.get("policy", "open"),
    }


def _outcome(value: Any = None, error: BaseException | None = None) -> dict[str, Any]:
    return {
        "value": value,
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "t": time.monotonic(),
    }


def _start_time() -> float:
    print("ready", flush=True)
    return float(sys.stdin.readline())


def _sleep_until(t0: float) -> None:
    delay = t0 - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def run_sync(config: dict[str, Any]) -> dict[str, Any]:
    client = sync_client(config)
    group: RedisGroup[str, Any] = RedisGroup(client, **_options(config))
    loads_file = config["loads_file"]

    def load() -> dict[str, Any]:
        _note(loads_file, "start")
        time.sleep(config["loader_seconds"])
        _note(loads_file, "end")
        return {"pid": os.getpid()}

    outcomes: list[dict[str, Any]] = []
    lock = threading.Lock()
    t0 = _start_time()

    def caller() -> None:
        _sleep_until(t0)
        try:
            outcome = _outcome(group.do(config["key"], load))
        except Exception as exc:
            outcome = _outcome(error=exc)
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=caller) for _ in range(config["callers"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(config.get("join_timeout", 60))
    return {"pid": os.getpid(), "outcomes": outcomes, "stats": dataclasses.asdict(group.stats())}


async def run_async(config: dict[str, Any]) -> dict[str, Any]:
    client = async_client(config)
    group: AsyncRedisGroup[str, Any] = AsyncRedisGroup(client, **_options(config))
    loads_file = config["loads_file"]

    async def load() -> dict[str, Any]:
        _note(loads_file, "start")
        await asyncio.sleep(config["loader_seconds"])
        _note(loads_file, "end")
        return {"pid": os.getpid()}

    t0 = await asyncio.get_running_loop().run_in_executor(None, _start_time)

    async def caller() -> dict[str, Any]:
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        try:
            return _outcome(await group.do(config["key"], load))
        except Exception as exc:
            return _outcome(error=exc)

    outcomes = await asyncio.wait_for(
        asyncio.gather(*(caller() for _ in range(config["callers"]))),
        config.get("join_timeout", 60),
    )
    stats = dataclasses.asdict(group.stats())
    await group.aclose()
    await client.aclose()
    return {"pid": os.getpid(), "outcomes": list(outcomes), "stats": stats}


def main() -> None:
    config = json.loads(sys.argv[1])
    report = run_sync(config) if config["mode"] == "sync" else asyncio.run(run_async(config))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
