"""One worker process of the LoadingCache + Redis group tests (test_redis_cache.py).

    python _redis_cache_worker.py '<json config>'

Builds a LoadingCache over a RedisGroup (``"mode": "sync"``, callers are
threads) or an AsyncLoadingCache over an AsyncRedisGroup (``"async"``, tasks
of one loop), prints ``ready``, then answers one JSON command per stdin line
with one JSON line on stdout: ``get``/``start`` (``key``, or ``keys`` for
``get_many``; ``callers`` concurrent reads; ``start`` returns at once),
``join`` (the outcomes of the reads started), ``behave`` (``error``,
``gated``), ``release``, ``invalidate``, ``contains``, ``state``; every reply
carries the loader and group call counts and the stats.  The loader appends
``start``/``end`` lines (pid, time) to ``loads_file``, so loads are counted
across processes outside Redis; it can be told to wait for a ``release`` and
to raise instead of returning.  Group calls are counted by a subclass of the
group, so a test can tell a read answered from the cache from one that went
to Redis.
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

import redis
import redis.asyncio

from singleflight import AsyncLoadingCache, LoadingCache
from singleflight.redis import AsyncRedisGroup, RedisGroup


class NotFound(LookupError):
    """A not-found error of the "application": ``__main__.NotFound`` in every worker."""


class MissingProfile(NotFound):
    """A subclass: negative=NotFound catches it by name too."""


ERRORS: dict[str, type[Exception]] = {
    "NotFound": NotFound,
    "MissingProfile": MissingProfile,
    "ValueError": ValueError,
    "KeyError": KeyError,
}


def _note(path: str, what: str) -> None:
    # One small O_APPEND write per line: lines from many processes never interleave.
    line = f"{what} {os.getpid()} {time.monotonic():.6f}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _outcome(value: Any = None, error: BaseException | None = None) -> dict[str, Any]:
    return {
        "value": value,
        "error": None if error is None else type(error).__name__,
        "type_name": getattr(error, "type_name", None),
        "message": None if error is None else str(error),
    }


def _group_options(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "namespace": config.get("namespace", "test"),
        "result_ttl": config.get("result_ttl", 0.0),
        "max_wait": config.get("max_wait", 30.0),
    }


def _cache_options(config: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {
        "ttl": config.get("ttl", 60.0),
        "jitter": 0.0,
        "stale_if_error": config.get("stale_if_error", 0.0),
    }
    if config.get("negative"):
        options["negative"] = NotFound
        options["negative_ttl"] = 60.0
    return options


class Behaviour:
    """What the loader does next: raise ``error`` (a name in ERRORS), wait for a release."""

    def __init__(self) -> None:
        self.error: str | None = None
        self.gated = False
        self.calls = 0

    def finish(self, key: str) -> dict[str, Any]:
        if self.error is not None:
            raise ERRORS[self.error](f"no {key}")
        return {"key": key, "pid": os.getpid(), "n": self.calls}


def _stats(cache: Any, group: Any, behaviour: Behaviour) -> dict[str, Any]:
    stats = cache.stats()
    return {
        "loader_calls": behaviour.calls,
        "group_calls": group.calls,
        "group": dataclasses.asdict(group.stats()),
        "cache": {
            name: getattr(stats, name)
            for name in ("hits", "misses", "loads", "load_failures", "stale_served", "size")
        },
    }


def run_sync(config: dict[str, Any]) -> None:
    class CountingGroup(RedisGroup[str, Any]):
        calls = 0

        def do(self, key: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            type(self).calls += 1
            return super().do(key, fn, *args, **kwargs)

    client = redis.Redis(port=config["port"])
    group = CountingGroup(client, **_group_options(config))
    behaviour = Behaviour()
    gate = threading.Event()

    def load(key: str) -> Any:
        behaviour.calls += 1
        _note(config["loads_file"], "start")
        if behaviour.gated:
            assert gate.wait(30)
        _note(config["loads_file"], "end")
        return behaviour.finish(key)

    cache: LoadingCache[str, Any] = LoadingCache(load, group=group, **_cache_options(config))
    pending: list[threading.Thread] = []
    outcomes: list[dict[str, Any]] = []
    lock = threading.Lock()

    def get(key: str) -> None:
        try:
            outcome = _outcome(cache.get(key))
        except Exception as exc:
            outcome = _outcome(error=exc)
        with lock:
            outcomes.append(outcome)

    def get_many(keys: list[str]) -> None:
        try:
            outcome = _outcome(cache.get_many(keys))
        except Exception as exc:
            outcome = _outcome(error=exc)
        with lock:
            outcomes.append(outcome)

    print("ready", flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        reply: dict[str, Any] = {}
        if op in ("get", "start"):
            read, arg = (get, command["key"]) if "key" in command else (get_many, command["keys"])
            threads = [
                threading.Thread(target=read, args=(arg,)) for _ in range(command.get("callers", 1))
            ]
            for thread in threads:
                thread.start()
            pending += threads
        if op in ("get", "join"):
            for thread in pending:
                thread.join(30)
            pending = []
            with lock:
                reply["outcomes"], outcomes = outcomes, []
        elif op == "behave":
            behaviour.error = command.get("error")
            behaviour.gated = command.get("gated", False)
            gate.clear()
        elif op == "release":
            gate.set()
        elif op == "invalidate":
            cache.invalidate(command["key"])
        elif op == "contains":
            reply["contains"] = command["key"] in cache
        elif op == "quit":
            break
        reply |= _stats(cache, group, behaviour)
        print(json.dumps(reply), flush=True)
    cache.close()
    group.close()
    client.close()


async def run_async(config: dict[str, Any]) -> None:
    class CountingGroup(AsyncRedisGroup[str, Any]):
        calls = 0

        async def do(self, key: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            type(self).calls += 1
            return await super().do(key, fn, *args, **kwargs)

    client = redis.asyncio.Redis(port=config["port"])
    group = CountingGroup(client, **_group_options(config))
    behaviour = Behaviour()
    gate = asyncio.Event()

    async def load(key: str) -> Any:
        behaviour.calls += 1
        _note(config["loads_file"], "start")
        if behaviour.gated:
            await asyncio.wait_for(gate.wait(), 30)
        _note(config["loads_file"], "end")
        return behaviour.finish(key)

    cache: AsyncLoadingCache[str, Any] = AsyncLoadingCache(
        load, group=group, **_cache_options(config)
    )
    pending: list[asyncio.Task[dict[str, Any]]] = []

    async def get(key: str) -> dict[str, Any]:
        try:
            return _outcome(await cache.get(key))
        except Exception as exc:
            return _outcome(error=exc)

    async def get_many(keys: list[str]) -> dict[str, Any]:
        try:
            return _outcome(await cache.get_many(keys))
        except Exception as exc:
            return _outcome(error=exc)

    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = json.loads(line)
        op = command["op"]
        reply: dict[str, Any] = {}
        if op in ("get", "start"):
            for _ in range(command.get("callers", 1)):
                read = get(command["key"]) if "key" in command else get_many(command["keys"])
                pending.append(loop.create_task(read))
            await asyncio.sleep(0)  # let them reach the group before the next command
        if op in ("get", "join"):
            reply["outcomes"] = list(await asyncio.wait_for(asyncio.gather(*pending), 30))
            pending = []
        elif op == "behave":
            behaviour.error = command.get("error")
            behaviour.gated = command.get("gated", False)
            gate.clear()
        elif op == "release":
            gate.set()
        elif op == "invalidate":
            cache.invalidate(command["key"])
        elif op == "contains":
            reply["contains"] = command["key"] in cache
        elif op == "quit":
            break
        reply |= _stats(cache, group, behaviour)
        print(json.dumps(reply), flush=True)
    await cache.aclose()
    await group.aclose()
    await client.aclose()


def main() -> None:
    config = json.loads(sys.argv[1])
    if config["mode"] == "sync":
        run_sync(config)
    else:
        asyncio.run(run_async(config))


if __name__ == "__main__":
    main()
