"""One worker process of bench_redis.py: many rounds, one coalescer (or the floor).

    python _redis_bench_worker.py '<json config>'

Prints ``ready``, then for each stdin line ``<t0> <key>`` runs one round:
``callers`` callers ask for ``key`` at ``t0`` (threads, or tasks for the
asyncio subjects) through the chosen subject, and one JSON line reports each
caller's return time.  Loads append ``start|end pid time key`` to
``loads_file``.  Subjects:

  floor     the least a cross-process coalescer can do: worker 0 "loads"
            (sleeps) and XADDs once; every other process does one XREAD
            BLOCK, and its other callers wait on a threading.Event
  sync      singleflight.redis.RedisGroup
  async     singleflight.redis.AsyncRedisGroup
  dogpile   dogpile.cache's Redis backend with distributed_lock=True
  cashews   cashews @cache(ttl, lock=True)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio


def note(path: str, what: str, key: str) -> None:
    line = f"{what} {os.getpid()} {time.monotonic():.6f} {key}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def threads_round(callers: int, t0: float, call: Callable[[], Any]) -> list[dict[str, Any]]:
    outcomes: list[dict[str, Any]] = []
    lock = threading.Lock()

    def caller() -> None:
        time.sleep(max(0.0, t0 - time.monotonic()))
        try:
            value, error = call(), None
        except Exception as exc:
            value, error = None, repr(exc)
        t = time.monotonic()
        with lock:
            outcomes.append({"t": t, "value": value, "error": error})

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


async def tasks_round(callers: int, t0: float, call: Callable[[], Any]) -> list[dict[str, Any]]:
    async def caller() -> dict[str, Any]:
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        try:
            value, error = await call(), None
        except Exception as exc:
            value, error = None, repr(exc)
        return {"t": time.monotonic(), "value": value, "error": error}

    return list(await asyncio.gather(*(caller() for _ in range(callers))))


def main() -> None:
    config = json.loads(sys.argv[1])
    subject, port, callers = config["subject"], config["port"], config["callers"]
    seconds, loads_file, index = config["loader_seconds"], config["loads_file"], config["index"]
    loop = asyncio.new_event_loop() if subject in ("async", "cashews") else None

    def load_sync(key: str) -> dict[str, Any]:
        note(loads_file, "start", key)
        time.sleep(seconds)
        note(loads_file, "end", key)
        return {"pid": os.getpid()}

    async def load_async(key: str) -> dict[str, Any]:
        note(loads_file, "start", key)
        await asyncio.sleep(seconds)
        note(loads_file, "end", key)
        return {"pid": os.getpid()}

    if subject == "floor":
        client = redis.Redis(port=port)
        client.ping()

        def run(key: str, t0: float) -> list[dict[str, Any]]:
            woken = threading.Event()
            first = threading.Lock()
            stream = f"floor:{key}"

            def call() -> Any:
                if not first.acquire(blocking=False):
                    woken.wait(30)
                    return "v"
                if index == 0:
                    note(loads_file, "start", key)
                    time.sleep(seconds)
                    note(loads_file, "end", key)
                    client.xadd(stream, {"v": "v"})
                else:
                    client.xread({stream: "0-0"}, count=1, block=30_000)
                woken.set()
                return "v"

            return threads_round(callers, t0, call)

    elif subject == "sync":
        from singleflight.redis import RedisGroup

        group: Any = RedisGroup(redis.Redis(port=port), namespace="bench")

        def run(key: str, t0: float) -> list[dict[str, Any]]:
            return threads_round(callers, t0, lambda: group.do(key, load_sync, key))

    elif subject == "async":
        from singleflight.redis import AsyncRedisGroup

        agroup: Any = AsyncRedisGroup(redis.asyncio.Redis(port=port), namespace="bench")

        def run(key: str, t0: float) -> list[dict[str, Any]]:
            assert loop is not None
            return loop.run_until_complete(
                tasks_round(callers, t0, lambda: agroup.do(key, load_async, key))
            )

    elif subject == "dogpile":
        from dogpile.cache import make_region

        region = make_region().configure(
            "dogpile.cache.redis",
            expiration_time=60,
            arguments={
                "host": "127.0.0.1",
                "port": port,
                "distributed_lock": True,
                "thread_local_lock": False,  # required with distributed_lock
                "lock_timeout": 5,  # the default (None) never expires
                "redis_expiration_time": 60,
            },
        )

        def run(key: str, t0: float) -> list[dict[str, Any]]:
            return threads_round(
                callers, t0, lambda: region.get_or_create(key, lambda: load_sync(key))
            )

    elif subject == "cashews":
        from cashews import cache

        assert loop is not None
        cache.setup(f"redis://127.0.0.1:{port}/0")

        @cache(ttl=60, lock=True)
        async def cached(key: str) -> dict[str, Any]:
            return await load_async(key)

        def run(key: str, t0: float) -> list[dict[str, Any]]:
            assert loop is not None
            return loop.run_until_complete(tasks_round(callers, t0, lambda: cached(key)))

    else:
        raise SystemExit(f"unknown subject {subject!r}")

    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        t0_text, key = line.split()
        outcomes = run(key, float(t0_text))
        print(json.dumps({"pid": os.getpid(), "outcomes": outcomes}), flush=True)


if __name__ == "__main__":
    main()
