"""A worker with a fleet cache, driven line by line on stdin (test_redis_fleet_cache.py).

Its loader counts each load in Redis (``INCR loads:<key>``), returns the
source's current value (``GET src:<key>``) with the server's time of the load,
and, when ``gate:<key>`` exists, waits until it is gone (a load held in flight).

Commands (one JSON reply line each): ``get K``, ``inv K``, ``put K V``,
``clear``, ``tags T``, ``stats``, ``trusted``, ``run SECONDS KEYS...`` (read the
keys in a loop; reply the oldest value served as fresh, in server seconds),
``quit``.  With ``"cluster": true`` in its configuration it talks to a Redis
Cluster (a ``RedisCluster`` started from the node at ``port``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[2] / "src"))

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from singleflight import LoadingCache
from singleflight.redis import Fleet


def main() -> None:
    config: dict[str, Any] = json.loads(sys.argv[1])
    port = config["port"]
    cluster = config.get("cluster", False)
    bounded: dict[str, Any] = {
        "socket_timeout": 0.3,
        "socket_connect_timeout": 0.3,
        "retry": Retry(NoBackoff(), 0),
    }
    raw: Any = (
        redis.cluster.RedisCluster(host="127.0.0.1", port=port, **bounded)
        if cluster
        else redis.Redis(port=port, **bounded)
    )
    load_seconds = config.get("load_seconds", 0.0)

    def server_time() -> float:
        seconds, micros = raw.time()
        return seconds + micros / 1e6

    def load(key: str) -> dict[str, Any]:
        try:
            raw.incr(f"loads:{key}")
        except redis.RedisError:  # Redis stopped: a load of its own, unseen
            return {"v": None, "t": None}
        while raw.exists(f"gate:{key}"):
            time.sleep(0.005)
        started = server_time()
        source = raw.get(f"src:{key}")
        if load_seconds:
            time.sleep(load_seconds)
        return {"v": source.decode() if source else None, "t": started}

    client: Any = (
        redis.cluster.RedisCluster(host="127.0.0.1", port=port)
        if cluster
        else redis.Redis(port=port)
    )
    fleet = Fleet(
        client,
        namespace=config.get("namespace", "fleet-test"),
        channel_timeout=config.get("channel_timeout", 0.5),
        redis_timeout=config.get("redis_timeout", 0.5),
        retry_budget=config.get("retry_budget", 0.2),
        max_wait=config.get("max_wait", 5.0),
    )
    cache: LoadingCache[str, dict[str, Any]] = LoadingCache(
        load,
        ttl=config["ttl"],
        jitter=0,
        fleet=fleet,
        tags=lambda key, value: [f"tag-{key[0]}"],
    )
    fleet.wait_trusted(5)
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        command, args = words[0], words[1:]
        reply: Any = None
        try:
            if command == "get":
                reply = cache.get(args[0])
            elif command == "inv":
                cache.invalidate(args[0])
            elif command == "put":
                cache.put(args[0], {"v": args[1], "t": server_time()})
            elif command == "clear":
                cache.clear()
            elif command == "tags":
                cache.invalidate_tags(*args)
            elif command == "stats":
                stats = cache.stats()
                reply = {name: getattr(stats, name) for name in type(stats).__dataclass_fields__}
                reply["trusted"] = fleet.trusted
                reply["l1"] = sorted(cache._data)
            elif command == "run":
                until = time.monotonic() + float(args[0])
                oldest = 0.0
                reads = 0
                ttl = config["ttl"]
                while time.monotonic() < until:
                    for key in args[1:]:
                        value = cache.get(key)
                        reads += 1
                        age = server_time() - value["t"] if reads % 50 == 0 else 0.0
                        oldest = max(oldest, age)
                    time.sleep(0.001)
                reply = {"oldest": oldest, "reads": reads, "ttl": ttl}
            elif command == "quit":
                break
            else:
                reply = {"error": f"unknown command {command}"}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
