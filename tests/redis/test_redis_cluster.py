"""Redis Cluster and Sentinel: the groups over RedisCluster clients and Sentinel-managed ones.

A private three-master cluster (started once per session, see _redis_cluster.py)
runs the cross-process checks: one load for 8 processes of 50 callers, a
takeover after the leader's process is SIGKILLed, and a master killed
mid-flight.  A private master with one sentinel runs the coalescing check over
``Sentinel(...).master_for(...)`` clients.  Each runs for RedisGroup and
AsyncRedisGroup.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from _redis_cluster import Cluster, SentinelServer
from _redis_fleet import Fleet, caller_errors, caller_values
from _redis_sides import Loader

from singleflight import WaitTimeoutError
from singleflight.redis import AsyncRedisGroup, RedisGroup, RedisUnavailableError

pytestmark = pytest.mark.timeout(120)

MODES = ["sync", "async"]


@pytest.mark.parametrize("mode", MODES)
def test_cluster_one_load_for_8_processes_of_50_callers(
    mode: str, cluster: Cluster, tmp_path: Path
) -> None:
    config = {"mode": mode, "port": cluster.ports[0], "cluster": True, "key": "cold"}
    config |= {"callers": 50, "loader_seconds": 0.2, "lease": 3.0}
    before = cluster.commandstats()
    with Fleet(8, config, tmp_path / "loads") as fleet:
        fleet.start(timeout=60)
        reports = fleet.reports(timeout=30)
        loads = fleet.loads()
    after = cluster.commandstats()

    assert [kind for kind, _, _ in loads] == ["start", "end"]
    leader = loads[0][1]
    assert caller_errors(reports) == []
    assert caller_values(reports) == [{"pid": leader}] * 400
    assert sum(r["stats"]["leads"] for r in reports) == 1
    assert sum(r["stats"]["redis_errors"] for r in reports) == 0
    # Everything every master ran: the flight's commands, the scripts' own,
    # connection setup and the clients' topology discovery; minus this test's INFO.
    counted = {
        name: after.get(name, 0) - before.get(name, 0)
        for name in after
        if name not in ("info", "config|resetstat")
    }
    assert sum(counted.values()) <= 400, counted
    assert "command|getkeys" not in counted  # the stream read is routed by its key, not asked


@pytest.mark.parametrize("mode", MODES)
def test_cluster_leader_sigkilled_a_waiter_takes_over_within_the_lease(
    mode: str, cluster: Cluster, tmp_path: Path
) -> None:
    lease = 1.0
    config = {"mode": mode, "port": cluster.ports[0], "cluster": True, "key": "k"}
    config |= {"callers": 3, "loader_seconds": 1.5, "lease": lease}
    with Fleet(4, config, tmp_path / "loads") as fleet:
        fleet.start(timeout=60)
        (_, leader, started), *_ = fleet.wait_for_load(1, timeout=10)
        time.sleep(max(0.0, started + 0.5 - time.monotonic()))
        killed_at = time.monotonic()
        fleet.by_pid(leader).signal(signal.SIGKILL)
        survivors = [w for w in fleet.workers if w.pid != leader]
        reports = fleet.reports(timeout=20, workers=survivors)
        loads = fleet.loads()

    starts = [(pid, t) for kind, pid, t in loads if kind == "start"]
    assert len(starts) == 2, loads
    successor, taken_over = starts[1]
    assert successor != leader
    assert taken_over - killed_at <= lease + 0.2, taken_over - killed_at
    assert caller_errors(reports) == []
    assert caller_values(reports) == [{"pid": successor}] * 9
    assert sum(r["stats"]["takeovers"] for r in reports) == 1
    assert sum(r["stats"]["redis_errors"] for r in reports) == 0


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_cluster_master_killed_mid_flight_every_caller_ends_within_its_deadline(
    sides: Any, cluster: Cluster, policy: str
) -> None:
    """The master owning the key's slot dies while a leader loads and another side
    waits on it: every caller ends by max_wait + redis_timeout (plus the loader's
    time where it runs) with the value, or (closed) the group's documented error."""
    max_wait, redis_timeout = 2.0, 0.3
    options = {
        "cluster": True,
        "lease": 1.0,
        "max_wait": max_wait,
        "redis_timeout": redis_timeout,
        "retry_budget": 0.3,
        "on_redis_error": policy,
    }
    a, b = sides(cluster.ports[0], **options), sides(cluster.ports[0], **options)
    gate = threading.Event()
    loader = Loader("v", gate=gate)
    owner = cluster.port_of("sf:{test:k}")
    try:
        leading = a.submit("k", loader)
        deadline = time.monotonic() + 10
        while loader.runs < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loader.runs == 1
        waiting = b.submit("k", loader)
        deadline = time.monotonic() + 10
        while b.stats().waits < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.stats().waits == 1  # b is blocked reading on the slot's master
        cluster.kill(owner)
        killed = time.monotonic()
        gate.set()
        first, second = leading.result(30), waiting.result(30)
    finally:
        gate.set()
        if owner not in cluster.processes:
            cluster.restart(owner)
    # The leader's caller gets its own value, its completion failing or not.
    assert (first.value, first.error) == ("v", None), first
    bound = max_wait + redis_timeout + 0.5
    assert second.elapsed <= bound, second
    if policy == "open" or second.error is None:
        assert (second.value, second.error) == ("v", None), second
    else:
        assert isinstance(second.error, (RedisUnavailableError, WaitTimeoutError)), second
    assert time.monotonic() - killed <= bound + 1.0


@pytest.mark.parametrize("mode", MODES)
def test_sentinel_managed_clients_coalesce_across_processes(
    mode: str, sentinel: SentinelServer, tmp_path: Path
) -> None:
    config = {"mode": mode, "port": sentinel.port, "sentinel": sentinel.name, "key": "k"}
    config |= {"callers": 10, "loader_seconds": 0.3, "lease": 1.0}
    with Fleet(2, config, tmp_path / "loads") as fleet:
        fleet.start(timeout=60)
        reports = fleet.reports(timeout=30)
        loads = fleet.loads()
    assert [kind for kind, _, _ in loads] == ["start", "end"]
    assert caller_errors(reports) == []
    assert caller_values(reports) == [{"pid": loads[0][1]}] * 20
    assert sum(r["stats"]["leads"] for r in reports) == 1
    assert sum(r["stats"]["redis_errors"] for r in reports) == 0


def test_copies_of_cluster_and_sentinel_clients_have_bounded_timeouts(
    cluster: Cluster, sentinel: SentinelServer
) -> None:
    user_cluster = redis.cluster.RedisCluster(
        host="127.0.0.1", port=cluster.ports[0], socket_timeout=None, client_name="mine"
    )
    group: RedisGroup[str, Any] = RedisGroup(user_cluster, namespace="n", redis_timeout=0.25)
    for client in (group._clients.commands, group._clients.blocking):
        assert isinstance(client, redis.cluster.RedisCluster) and client is not user_cluster
        kwargs = client.get_connection_kwargs()
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.25
        assert client.retry.get_retries() == 0
        assert kwargs["client_name"] == "mine"
    assert group.do("k", lambda: "v") == "v"
    group.close()
    user_cluster.close()

    manager = redis.sentinel.Sentinel([("127.0.0.1", sentinel.port)], socket_timeout=5)
    master = manager.master_for(sentinel.name, socket_timeout=None, client_name="mine")
    sgroup: RedisGroup[str, Any] = RedisGroup(master, namespace="n", redis_timeout=0.25)
    for client in (sgroup._clients.commands, sgroup._clients.blocking):
        pool = client.connection_pool
        assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
        assert pool is not master.connection_pool and pool.service_name == sentinel.name
        assert pool.connection_kwargs["socket_timeout"] == 0.25
        assert pool.connection_kwargs["retry"].get_retries() == 0
        assert pool.connection_kwargs["client_name"] == "mine"
    assert sgroup.do("k", lambda: "v") == "v"
    sgroup.close()
    with pytest.raises(TypeError, match="master_for"):
        RedisGroup(manager.slave_for(sentinel.name), namespace="n")
    amanager = redis.asyncio.sentinel.Sentinel([("127.0.0.1", sentinel.port)])
    agroup: AsyncRedisGroup[str, Any] = AsyncRedisGroup(
        amanager.master_for(sentinel.name), namespace="n"
    )
    assert agroup.namespace == "n"
    with pytest.raises(TypeError, match="master_for"):
        AsyncRedisGroup(amanager.slave_for(sentinel.name), namespace="n")
