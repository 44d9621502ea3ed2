"""Fixtures of the Redis suite: private servers, and failing (not skipping) under CI.

Every test talks to a redis-server of its own making on 127.0.0.1 (see
_redis_server.py), never to a shared one.  Without redis-py or a redis-server
binary the suite is skipped, unless SINGLEFLIGHT_REQUIRE_REDIS is set (as CI
does): then it fails with the reason.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REQUIRED = bool(os.environ.get("SINGLEFLIGHT_REQUIRE_REDIS"))

sys.path.insert(0, str(Path(__file__).parent))
if str(Path(__file__).parents[2]) not in sys.path:  # for ``tests._support``
    sys.path.insert(0, str(Path(__file__).parents[2]))

try:
    import redis  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    if REQUIRED:
        raise ImportError(
            "SINGLEFLIGHT_REQUIRE_REDIS is set but redis-py is missing: pip install -e '.[test]'"
        ) from None
    collect_ignore_glob = ["test_*.py"]
else:
    from _redis_cluster import Cluster, SentinelServer
    from _redis_server import RedisServer, find_server


def _binary(kind: str) -> str:
    binary = find_server(kind)
    if binary is None:
        reason = f"no {kind}-server binary found"
        if kind == "redis" and REQUIRED:
            pytest.fail(
                f"{reason}, and SINGLEFLIGHT_REQUIRE_REDIS is set: install redis-server "
                "(apt-get install redis-server) or unset the variable",
                pytrace=False,
            )
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="session", params=["redis", "valkey"])
def server_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def redis_binary() -> str:
    return _binary("redis")


@pytest.fixture(scope="session")
def shared_server(redis_binary: str) -> Iterator[RedisServer]:
    """One private redis-server for the tests that only read and write keys."""
    with RedisServer(redis_binary) as server:
        yield server


@pytest.fixture
def server(shared_server: RedisServer) -> RedisServer:
    """The session's private server, emptied, with fresh command statistics."""
    client = shared_server.client()
    try:
        client.flushall()
        client.config_resetstat()
        client.script_flush()
    finally:
        client.close()
    return shared_server


@pytest.fixture(scope="session")
def cluster_session(redis_binary: str) -> Iterator[Cluster]:
    """One private Redis Cluster (three masters) for the session: started once."""
    with Cluster(redis_binary) as cluster:
        yield cluster


@pytest.fixture
def cluster(cluster_session: Cluster) -> Cluster:
    """The session's cluster, every master up, emptied, with fresh command statistics."""
    for port in cluster_session.ports:
        if port not in cluster_session.processes:  # a test killed it and failed
            cluster_session.restart(port)
    cluster_session.flushall()
    return cluster_session


@pytest.fixture
def sentinel(redis_binary: str) -> Iterator[SentinelServer]:
    """A private master and one sentinel watching it as "mymaster"."""
    with RedisServer(redis_binary) as master, SentinelServer(redis_binary, master.port) as s:
        yield s


@pytest.fixture
def make_server(redis_binary: str) -> Iterator[Callable[..., RedisServer]]:
    """Start private servers (redis, or valkey with kind="valkey") for fault tests."""
    servers: list[RedisServer] = []

    def make(kind: str = "redis") -> RedisServer:
        server = RedisServer(redis_binary if kind == "redis" else _binary(kind))
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def own_server(make_server: Callable[..., RedisServer]) -> RedisServer:
    """A private server of this test alone (to restart, pause or kill)."""
    return make_server()


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sides(mode: str) -> Iterator[Callable[..., Any]]:
    """Make stand-ins for processes (RedisGroup or AsyncRedisGroup per ``mode``)."""
    from _redis_sides import make_side

    made: list[Any] = []

    def make(port: int, **options: Any) -> Any:
        side = make_side(mode)(port, **options)
        made.append(side)
        return side

    yield make
    for side in made:
        side.close()
