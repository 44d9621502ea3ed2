"""The client a test process or worker hands its group: plain, cluster or sentinel-managed.

``config["port"]`` is the server's port, a cluster node's (``"cluster": true``)
or the sentinel's (``"sentinel": "<service name>"``).
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel

__all__ = ["async_client", "sync_client"]


def sync_client(config: dict[str, Any]) -> Any:
    port = config["port"]
    if config.get("cluster"):
        return redis.cluster.RedisCluster(host="127.0.0.1", port=port)
    if config.get("sentinel"):
        sentinel = redis.sentinel.Sentinel([("127.0.0.1", port)], socket_timeout=5)
        return sentinel.master_for(config["sentinel"])
    return redis.Redis(port=port)


def async_client(config: dict[str, Any]) -> Any:
    port = config["port"]
    if config.get("cluster"):
        return redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=port)
    if config.get("sentinel"):
        sentinel = redis.asyncio.sentinel.Sentinel([("127.0.0.1", port)], socket_timeout=5)
        return sentinel.master_for(config["sentinel"])
    return redis.asyncio.Redis(port=port)
