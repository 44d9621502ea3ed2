"""Fleet caches (``fleet=``) on a Redis Cluster, across real processes.

The session's private three-master cluster (see _redis_cluster.py): the entries
are hash-tagged per key, so they spread over the masters; the invalidation
channel is a sharded one (``SSUBSCRIBE``/``SPUBLISH``) in the namespace's slot.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster
from _redis_cluster import Cluster
from _redis_fleet import Worker, started

from singleflight import LoadingCache
from singleflight.redis import Fleet

pytestmark = pytest.mark.timeout(120)

WORKER = str(Path(__file__).with_name("_redis_fleet_cache_worker.py"))
ASYNC_WORKER = str(Path(__file__).with_name("_redis_fleet_cache_async_worker.py"))

CHANNEL_TIMEOUT = 0.5
BOUND = CHANNEL_TIMEOUT + 0.5  # propagation bound, with room for a loaded machine
NAMESPACE = "fleet-test"


def ask(worker: Worker, line: str, timeout: float = 20.0) -> Any:
    worker.send(line)
    reply = json.loads(worker._line(timeout))
    if isinstance(reply, dict) and "error" in reply:
        raise AssertionError(f"worker {worker.pid}: {reply['error']}")
    return reply


def everywhere(workers: list[Worker], key: str, want: str) -> None:
    """Every worker serves ``want`` for ``key`` within ``BOUND`` of now (the change just
    sent): asked again until they all do, never longer than the bound."""
    deadline = time.monotonic() + BOUND
    while True:
        seen = [ask(w, f"get {key}")["v"] for w in workers]
        if set(seen) == {want}:
            return
        assert time.monotonic() < deadline, (key, want, seen)
        time.sleep(0.01)


def _client(cluster: Cluster) -> redis.cluster.RedisCluster:
    return redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.ports[0])


@pytest.fixture
def workers(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[list[Worker]]:
    n, side, options = getattr(request, "param", (4, "sync", {}))
    script = WORKER if side == "sync" else ASYNC_WORKER
    config = {"port": cluster.ports[0], "cluster": True, "ttl": 30.0}
    config |= {"channel_timeout": CHANNEL_TIMEOUT, "namespace": NAMESPACE, **options}
    with started([(config, script)] * n) as made:
        yield made


def loads(cluster: Cluster, key: str) -> int:
    client = _client(cluster)
    try:
        return int(client.get(f"loads:{key}") or 0)
    finally:
        client.close()


def set_source(cluster: Cluster, key: str, value: str) -> None:
    client = _client(cluster)
    try:
        client.set(f"src:{key}", value)
    finally:
        client.close()


def entry_port(cluster: Cluster, key: str) -> int:
    return cluster.port_of(f"sf:{{{NAMESPACE}:{key}}}")


@pytest.mark.parametrize("workers", [(4, "sync", {}), (3, "async", {})], indirect=True)
def test_one_load_for_the_fleet_on_a_cluster(cluster: Cluster, workers: list[Worker]) -> None:
    set_source(cluster, "k", "one")
    first = [ask(w, "get k") for w in workers]
    assert {v["v"] for v in first} == {"one"}
    assert len({v["t"] for v in first}) == 1  # one load's value everywhere
    assert loads(cluster, "k") == 1
    stats = [ask(w, "stats") for w in workers]
    assert sum(s["l2_misses"] for s in stats) == 1
    assert sum(s["l2_hits"] for s in stats) == len(workers) - 1
    assert [ask(w, "get k") for w in workers] == first  # L1 hits now
    assert sum(ask(w, "stats")["hits"] for w in workers) == len(workers)


@pytest.mark.parametrize("workers", [(4, "sync", {}), (3, "async", {})], indirect=True)
def test_invalidate_put_tags_and_clear_reach_every_process_on_a_cluster(
    cluster: Cluster, workers: list[Worker]
) -> None:
    keys = ("a1", "a2", "b1")
    # the entries live on more than one master, the channel on one of them
    assert len({entry_port(cluster, key) for key in keys}) >= 2
    for key in keys:
        set_source(cluster, key, "old")
        assert {ask(w, f"get {key}")["v"] for w in workers} == {"old"}
    set_source(cluster, "a1", "new")
    ask(workers[0], "inv a1")
    everywhere(workers, "a1", "new")
    assert loads(cluster, "a1") == 2
    ask(workers[1], "put a2 put")
    everywhere(workers, "a2", "put")
    for key in keys:
        set_source(cluster, key, "tagged")
    ask(workers[2], "tags tag-a")
    everywhere(workers, "a1", "tagged")
    everywhere(workers, "a2", "tagged")
    assert {ask(w, "get b1")["v"] for w in workers} == {"old"}
    ask(workers[0], "clear")  # its entries, on every master
    everywhere(workers, "b1", "tagged")
    assert loads(cluster, "b1") == 2
    received = [ask(w, "stats")["invalidations_received"] for w in workers]
    assert all(r >= 3 for r in received), received


@pytest.mark.parametrize(
    "workers",
    [(3, "sync", {"max_wait": 2.0, "redis_timeout": 0.3, "retry_budget": 0.3, "lease": 1.0})],
    indirect=True,
)
def test_a_master_killed_no_caller_past_its_deadline(
    cluster: Cluster, workers: list[Worker]
) -> None:
    """The master holding a key's entry dies: every process's miss of that key
    ends within max_wait + redis_timeout (plus its own load), with a value."""
    channel_port = cluster.port_of(f"sf:{{{NAMESPACE}}}:inv")
    key = next(k for k in (f"m{i}" for i in range(100)) if entry_port(cluster, k) != channel_port)
    owner = entry_port(cluster, key)
    set_source(cluster, key, "v")  # src:<key> may live on the owner too: then None
    assert {ask(w, f"get {key}")["v"] for w in workers} == {"v"}
    try:
        cluster.kill(owner)
        bound = 2.0 + 0.3 + 1.0
        for worker in workers:
            worker.send(f"inv {key}")  # reaches nobody: it raises, within its budget
        for worker in workers:
            started = time.monotonic()
            reply = json.loads(worker._line(20))
            assert time.monotonic() - started <= bound
            assert "RedisUnavailableError" in reply["error"], reply
        for worker in workers:
            started = time.monotonic()
            worker.send(f"get {key}")
            reply = json.loads(worker._line(20))
            assert time.monotonic() - started <= bound, reply
            assert "error" not in reply or "Redis" in reply["error"], reply
    finally:
        if owner not in cluster.processes:
            cluster.restart(owner)


def test_a_cluster_fleet_in_this_process(cluster: Cluster) -> None:
    client = _client(cluster)
    calls: list[str] = []

    def load(key: str) -> str:
        calls.append(key)
        return key.upper()

    fleet = Fleet(client, namespace="fleet-here")
    cache: LoadingCache[str, str] = LoadingCache(load, ttl=30.0, fleet=fleet)
    try:
        assert fleet.wait_trusted(10)
        assert [cache.get(k) for k in ("x", "y", "z")] == ["X", "Y", "Z"]
        cache.clear()
        assert cache.get("x") == "X"
        assert calls == ["x", "y", "z", "x"]
    finally:
        cache.close()
        client.close()


@pytest.mark.parametrize("workers", [(2, "sync", {})], indirect=True)
def test_the_channels_master_killed_drops_the_l1_until_it_is_back(
    cluster: Cluster, workers: list[Worker]
) -> None:
    """The sharded channel's master dies: each process stops using its L1 within the
    channel timeout; once the master is back, it subscribes again and invalidations
    reach every process."""
    channel_port = cluster.port_of(f"sf:{{{NAMESPACE}}}:inv")
    key = next(k for k in (f"c{i}" for i in range(100)) if entry_port(cluster, k) != channel_port)
    set_source(cluster, key, "old")
    assert {ask(w, f"get {key}")["v"] for w in workers} == {"old"}
    try:
        cluster.kill(channel_port)
        deadline = time.monotonic() + 20
        while any(ask(w, "stats")["trusted"] for w in workers):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stats = [ask(w, "stats") for w in workers]
        assert all(s["l1_drops"] >= 1 and s["l1"] == [] for s in stats), stats
    finally:
        if channel_port not in cluster.processes:
            cluster.restart(channel_port)
    deadline = time.monotonic() + 30
    while not all(ask(w, "stats")["trusted"] for w in workers):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert {ask(w, f"get {key}")["v"] for w in workers} == {"old"}
    set_source(cluster, key, "new")
    ask(workers[0], f"inv {key}")
    everywhere(workers, key, "new")
