"""The Redis clients a group talks through, configured for bounded waits.

A group never sends its commands through the caller's client as it is: that
client's timeouts and retries are tuned for other work (redis-py's default
retry turned a stopped server into a 4.1 s stall per call).  From the caller's
client we make two of our own, reaching the same server(s) with the same
credentials and TLS settings:

* *commands*: ``socket_timeout = socket_connect_timeout = redis_timeout``;
* *blocking reads* (``XREAD BLOCK``): each read is bounded by its own block
  plus ``redis_timeout`` (a per-call bound); the socket timeout is
  ``redis_timeout`` for RedisGroup (whose reads wait for their reply apart),
  the longest wait slice (``lease`` + 20 ms) + ``redis_timeout`` for
  AsyncRedisGroup;

both with redis-py's retry switched off (``Retry(NoBackoff(), 0)``): the group
retries by itself, within its retry budget and the caller's deadline.  They
also speak RESP2 and return bytes whatever the caller's client does.

What a copy needs, by client:

* ``Redis`` over a ``ConnectionPool`` or ``BlockingConnectionPool``: a pool of
  the same class, connection class and size, over the caller pool's
  ``connection_kwargs`` (address, database, credentials, TLS...) minus the
  entries redis-py keeps there for itself (see ``_INTERNAL_PREFIXES``);
* ``Redis`` from ``Sentinel(...).master_for(name)`` (a
  ``SentinelConnectionPool``): the same, as a ``SentinelConnectionPool`` of the
  same service and ``Sentinel`` (its ``service_name`` and
  ``sentinel_manager``), so it follows failovers as the caller's does; a
  replica's pool (``slave_for``) is refused, since a group writes;
* ``RedisCluster``: a new ``RedisCluster`` started from the caller's nodes,
  with the caller's credentials, client name, keepalive and TLS options
  (``_CLUSTER_OPTIONS``); other cluster options (``address_remap``,
  ``read_from_replicas``, a load balancing strategy) are not copied.

Any other pool is refused: pass ``configure_client=False`` to use the client
as given (then its ``socket_timeout``, ``socket_connect_timeout`` and ``retry``
are yours to set).
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff

from ._protocol import Settings

# Entries redis-py keeps among a pool's connection kwargs for itself (its
# maintenance notifications, the original address, a sentinel pool's proxy...):
# a new pool makes its own.
_INTERNAL_PREFIXES = (
    "maint",
    "orig_",
    "oss_cluster",
    "himport",
    "event_dispatcher",
    "connection_pool",
)
_OVERRIDDEN = (
    "socket_timeout",
    "socket_connect_timeout",
    "retry",
    "retry_on_timeout",
    "retry_on_error",
    "decode_responses",
    "protocol",
)
# What a RedisCluster copy keeps of the caller's connection options (besides
# every ``ssl_*`` one); the rest is redis-py's own or set by the group.
_CLUSTER_OPTIONS = (
    "username",
    "password",
    "credential_provider",
    "client_name",
    "driver_info",
    "encoding",
    "encoding_errors",
    "health_check_interval",
    "socket_keepalive",
    "socket_keepalive_options",
    "socket_read_size",
)

_CONFIGURE_FALSE = (
    "pass configure_client=False to use the client as it is (then set its socket_timeout, "
    "socket_connect_timeout and retry yourself)"
)


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is a RedisCluster (sync or asyncio)."""
    return isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster))


def _kwargs(pool: Any, socket_timeout: float, connect_timeout: float, retry: Any) -> dict[str, Any]:
    kwargs = {
        name: value
        for name, value in pool.connection_kwargs.items()
        if not name.startswith(_INTERNAL_PREFIXES) and name not in _OVERRIDDEN
    }
    kwargs.update(_bounded(socket_timeout, connect_timeout, retry))
    return kwargs


def _bounded(socket_timeout: float, connect_timeout: float, retry: Any) -> dict[str, Any]:
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": retry,
        "decode_responses": False,
        "protocol": 2,
    }


def _check_unconfigured(client: Any, kind: str) -> None:
    if client.get_encoder().decode_responses:
        raise ValueError(
            f"a {kind} used with configure_client=False must have decode_responses=False: "
            "payloads are bytes"
        )


def _timeouts(settings: Settings, blocking_read_timeout: float | None) -> tuple[float, float]:
    timeout = min(settings.redis_timeout, settings.max_wait)
    return timeout, blocking_read_timeout or timeout


def _clone(
    client: Any,
    settings: Settings,
    client_type: type[Any],
    pools: tuple[type[Any], type[Any], type[Any]],
    retry_type: type[Any],
    blocking_read_timeout: float | None,
) -> tuple[Any, Any]:
    plain, blocking, sentinel = pools
    pool = client.connection_pool
    if type(pool) not in pools:
        raise TypeError(
            f"cannot copy a {type(pool).__name__} to set bounded timeouts; {_CONFIGURE_FALSE}"
        )
    if type(pool) is sentinel and not pool.is_master:
        raise TypeError(
            "a Redis group writes: give it Sentinel(...).master_for(...), not slave_for(...)"
        )
    timeout, read_timeout = _timeouts(settings, blocking_read_timeout)
    made = []
    for socket_timeout in (timeout, read_timeout):
        kwargs = _kwargs(pool, socket_timeout, timeout, retry_type(NoBackoff(), 0))
        kwargs.update(connection_class=pool.connection_class, max_connections=pool.max_connections)
        if type(pool) is blocking:
            # Waiting for a free connection counts against the same bound.
            new_pool = blocking(timeout=timeout, **kwargs)
        elif type(pool) is sentinel:
            new_pool = sentinel(
                pool.service_name,
                pool.sentinel_manager,
                is_master=True,
                check_connection=pool.check_connection,
                **kwargs,
            )
        else:
            new_pool = plain(**kwargs)
        made.append(client_type(connection_pool=new_pool))
    return made[0], made[1]


def cluster_nodes(client: Any) -> list[Any]:
    """The nodes a RedisCluster knows, or (an asyncio client not yet initialized)
    the ones it was given."""
    return list(client.get_nodes() or client.nodes_manager.startup_nodes.values())


def cluster_options(client: Any) -> dict[str, Any]:
    """What a copy of a RedisCluster (or a client of one of its nodes) keeps of its
    connection options: credentials, client name, keepalive, TLS."""
    options = {
        name: value
        for name, value in client.get_connection_kwargs().items()
        if name in _CLUSTER_OPTIONS or name.startswith("ssl")
    }
    connection_class = client.get_connection_kwargs().get("connection_class")
    if connection_class is not None and issubclass(connection_class, redis.asyncio.SSLConnection):
        options["ssl"] = True
    return options


def _clone_cluster(
    client: Any,
    settings: Settings,
    cluster_type: type[Any],
    node_type: type[Any],
    retry_type: type[Any],
    blocking_read_timeout: float | None,
) -> tuple[Any, Any]:
    nodes = cluster_nodes(client)
    options = cluster_options(client)
    timeout, read_timeout = _timeouts(settings, blocking_read_timeout)
    made = tuple(
        cluster_type(
            startup_nodes=[node_type(node.host, node.port) for node in nodes],
            **options,
            **_bounded(socket_timeout, timeout, retry_type(NoBackoff(), 0)),
        )
        for socket_timeout in (timeout, read_timeout)
    )
    return made[0], made[1]


def clone_cluster_sync(client: Any, settings: Settings) -> Any:
    """A sync ``RedisCluster`` with the group's bounded timeouts, from a sync or
    asyncio RedisCluster ``client`` (a fleet's invalidations are sent by a thread)."""
    from redis.retry import Retry

    made = _clone_cluster(
        client, settings, redis.cluster.RedisCluster, redis.cluster.ClusterNode, Retry, None
    )
    return made[0]


def configure_sync(client: Any, settings: Settings, configure: bool) -> tuple[Any, Any]:
    """The (commands, blocking reads) clients for a :class:`RedisGroup`: ``redis.Redis``
    or ``redis.cluster.RedisCluster`` clients, like ``client``."""
    cluster = isinstance(client, redis.cluster.RedisCluster)
    if not cluster and (
        not isinstance(client, redis.Redis) or isinstance(client, redis.asyncio.Redis)
    ):
        raise TypeError(
            f"RedisGroup needs a redis.Redis or redis.cluster.RedisCluster client; "
            f"got {type(client).__name__}" + (" (use AsyncRedisGroup)" if _is_async(client) else "")
        )
    if not configure:
        _check_unconfigured(client, type(client).__name__)
        return client, client
    from redis.retry import Retry

    if cluster:
        return _clone_cluster(
            client, settings, redis.cluster.RedisCluster, redis.cluster.ClusterNode, Retry, None
        )
    # Its blocking reads wait for their reply with a bound of their own (see
    # read_blocking): the socket timeout bounds everything else, the connection's
    # handshake included.
    return _clone(
        client,
        settings,
        redis.Redis,
        (redis.ConnectionPool, redis.BlockingConnectionPool, redis.sentinel.SentinelConnectionPool),
        Retry,
        None,
    )


def configure_async(client: Any, settings: Settings, configure: bool) -> tuple[Any, Any]:
    """The (commands, blocking reads) clients for an :class:`AsyncRedisGroup`:
    ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster`` clients, like ``client``."""
    cluster = isinstance(client, redis.asyncio.cluster.RedisCluster)
    if not cluster and not isinstance(client, redis.asyncio.Redis):
        raise TypeError(
            f"AsyncRedisGroup needs a redis.asyncio.Redis or redis.asyncio.cluster.RedisCluster "
            f"client; got {type(client).__name__}"
            + ("" if _is_async(client) else " (use RedisGroup)")
        )
    if not configure:
        _check_unconfigured(client, type(client).__name__)
        return client, client
    from redis.asyncio.retry import Retry

    if cluster:
        return _clone_cluster(
            client,
            settings,
            redis.asyncio.cluster.RedisCluster,
            redis.asyncio.cluster.ClusterNode,
            Retry,
            settings.blocking_timeout,
        )
    return _clone(
        client,
        settings,
        redis.asyncio.Redis,
        (
            redis.asyncio.ConnectionPool,
            redis.asyncio.BlockingConnectionPool,
            redis.asyncio.sentinel.SentinelConnectionPool,
        ),
        Retry,
        settings.blocking_timeout,
    )


def _is_async(client: Any) -> bool:
    return isinstance(client, (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster))
