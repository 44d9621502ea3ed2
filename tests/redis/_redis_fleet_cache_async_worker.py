"""The asyncio twin of _redis_fleet_cache_worker.py: an AsyncLoadingCache with a
``redis.asyncio`` fleet, driven by the same commands on stdin (one JSON reply
line each); ``inv``, ``put``, ``clear`` and ``tags`` await the Broadcast."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[2] / "src"))

import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from singleflight import AsyncLoadingCache
from singleflight.redis import Fleet


async def main() -> None:
    config: dict[str, Any] = json.loads(sys.argv[1])
    port = config["port"]
    cluster = config.get("cluster", False)
    bounded: dict[str, Any] = {
        "socket_timeout": 0.3,
        "socket_connect_timeout": 0.3,
        "retry": Retry(NoBackoff(), 0),
    }
    raw: Any = (
        redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=port, **bounded)
        if cluster
        else redis.asyncio.Redis(port=port, **bounded)
    )
    load_seconds = config.get("load_seconds", 0.0)

    async def server_time() -> float:
        seconds, micros = await raw.time()
        return float(seconds + micros / 1e6)

    async def load(key: str) -> dict[str, Any]:
        try:
            await raw.incr(f"loads:{key}")
        except redis.RedisError:
            return {"v": None, "t": None}
        while await raw.exists(f"gate:{key}"):
            await asyncio.sleep(0.005)
        started = await server_time()
        source = await raw.get(f"src:{key}")
        if load_seconds:
            await asyncio.sleep(load_seconds)
        return {"v": source.decode() if source else None, "t": started}

    fleet = Fleet(
        redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=port)
        if cluster
        else redis.asyncio.Redis(port=port),
        namespace=config.get("namespace", "fleet-test"),
        channel_timeout=config.get("channel_timeout", 0.5),
        redis_timeout=config.get("redis_timeout", 0.5),
        retry_budget=config.get("retry_budget", 0.2),
        max_wait=config.get("max_wait", 5.0),
    )
    cache: AsyncLoadingCache[str, dict[str, Any]] = AsyncLoadingCache(
        load,
        ttl=config["ttl"],
        jitter=0,
        fleet=fleet,
        tags=lambda key, value: [f"tag-{key[0]}"],
    )
    deadline = time.monotonic() + 5
    while not fleet.trusted and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[Any]] = set()

    async def serve(words: list[str]) -> None:
        command, args = words[0], words[1:]
        reply: Any = None
        try:
            if command == "get":
                reply = await cache.get(args[0])
            elif command == "inv":
                await cache.invalidate(args[0])
            elif command == "put":
                await cache.put(args[0], {"v": args[1], "t": await server_time()})
            elif command == "clear":
                await cache.clear()
            elif command == "tags":
                await cache.invalidate_tags(*args)
            elif command == "stats":
                stats = cache.stats()
                reply = {name: getattr(stats, name) for name in type(stats).__dataclass_fields__}
                reply["trusted"] = fleet.trusted
                reply["l1"] = sorted(cache._data)
            else:
                reply = {"error": f"unknown command {command}"}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)

    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        words = line.split()
        if not line or words == ["quit"]:
            break
        if not words:
            continue
        # Commands run as tasks, so a held load does not stop the next command.
        task = loop.create_task(serve(words))
        pending.add(task)
        task.add_done_callback(pending.discard)
        await asyncio.sleep(0)
    await cache.aclose()


if __name__ == "__main__":
    asyncio.run(main())
