"""The Redis clients a group talks through, configured for bounded waits.

A group never sends its commands through the caller's client as it is: that
client's timeouts and retries are tuned for other work (redis-py's default
retry turned a stopped server into a 4.1 s stall per call).  From the caller's
connection pool we make two of our own, with the same address, credentials
and TLS settings:

* *commands*: ``socket_timeout = socket_connect_timeout = redis_timeout``;
* *blocking reads* (``XREAD BLOCK``): each read is bounded by its own block
  plus ``redis_timeout`` (a per-call bound); the pool's ``socket_timeout`` is
  ``redis_timeout`` for RedisGroup (whose reads wait for their reply apart),
  the longest wait slice (``lease`` + 20 ms) + ``redis_timeout`` for
  AsyncRedisGroup;

both with redis-py's retry switched off (``Retry(NoBackoff(), 0)``): the group
retries by itself, within its retry budget and the caller's deadline.  They
also speak RESP2 and return bytes whatever the caller's client does.

Only the plain pools (``ConnectionPool``, ``BlockingConnectionPool``) can be
copied that way.  For any other (Sentinel's, say) pass
``configure_client=False``: the client is then used as given, and its
``socket_timeout``, ``socket_connect_timeout`` and ``retry`` are yours to set.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
from redis.backoff import NoBackoff

from ._protocol import Settings

__all__ = ["configure_async", "configure_sync"]

# Pool internals some redis-py versions keep among the connection kwargs; a
# new pool makes its own.
_INTERNAL_PREFIXES = ("maint", "orig_", "oss_cluster", "himport", "event_dispatcher")
_OVERRIDDEN = (
    "socket_timeout",
    "socket_connect_timeout",
    "retry",
    "retry_on_timeout",
    "retry_on_error",
    "decode_responses",
    "protocol",
)

_CONFIGURE_FALSE = (
    "pass configure_client=False to use the client as it is (then set its socket_timeout, "
    "socket_connect_timeout and retry yourself)"
)


def _kwargs(pool: Any, socket_timeout: float, connect_timeout: float, retry: Any) -> dict[str, Any]:
    kwargs = {
        name: value
        for name, value in pool.connection_kwargs.items()
        if not name.startswith(_INTERNAL_PREFIXES) and name not in _OVERRIDDEN
    }
    kwargs.update(
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=retry,
        decode_responses=False,
        protocol=2,
    )
    return kwargs


def _check_unconfigured(client: Any, kind: str) -> None:
    if client.get_encoder().decode_responses:
        raise ValueError(
            f"a {kind} used with configure_client=False must have decode_responses=False: "
            "payloads are bytes"
        )


def _clone(
    client: Any,
    settings: Settings,
    client_type: type[Any],
    pools: tuple[type[Any], type[Any]],
    retry_type: type[Any],
    blocking_read_timeout: float | None,
) -> tuple[Any, Any]:
    plain, blocking = pools
    pool = client.connection_pool
    if type(pool) not in (plain, blocking):
        raise TypeError(
            f"cannot copy a {type(pool).__name__} to set bounded timeouts; {_CONFIGURE_FALSE}"
        )
    timeout = min(settings.redis_timeout, settings.max_wait)
    made = []
    for read_timeout in (timeout, blocking_read_timeout or timeout):
        kwargs = _kwargs(pool, read_timeout, timeout, retry_type(NoBackoff(), 0))
        if type(pool) is blocking:
            # Waiting for a free connection counts against the same bound.
            new_pool = blocking(
                connection_class=pool.connection_class,
                max_connections=pool.max_connections,
                timeout=timeout,
                **kwargs,
            )
        else:
            new_pool = plain(
                connection_class=pool.connection_class,
                max_connections=pool.max_connections,
                **kwargs,
            )
        made.append(client_type(connection_pool=new_pool))
    return made[0], made[1]


def configure_sync(
    client: redis.Redis, settings: Settings, configure: bool
) -> tuple[redis.Redis, redis.Redis]:
    """The (commands, blocking reads) clients for a :class:`RedisGroup`."""
    if not isinstance(client, redis.Redis) or isinstance(client, redis.asyncio.Redis):
        raise TypeError(
            f"RedisGroup needs a redis.Redis client; got {type(client).__name__}"
            + (" (use AsyncRedisGroup)" if isinstance(client, redis.asyncio.Redis) else "")
        )
    if not configure:
        _check_unconfigured(client, "redis.Redis")
        return client, client
    from redis.retry import Retry

    # Its blocking reads wait for their reply with a bound of their own (see
    # read_blocking): the socket timeout bounds everything else, the connection's
    # handshake included.
    return _clone(
        client,
        settings,
        redis.Redis,
        (redis.ConnectionPool, redis.BlockingConnectionPool),
        Retry,
        None,
    )


def configure_async(
    client: redis.asyncio.Redis, settings: Settings, configure: bool
) -> tuple[redis.asyncio.Redis, redis.asyncio.Redis]:
    """The (commands, blocking reads) clients for an :class:`AsyncRedisGroup`."""
    if not isinstance(client, redis.asyncio.Redis):
        raise TypeError(
            f"AsyncRedisGroup needs a redis.asyncio.Redis client; got {type(client).__name__}"
            + (" (use RedisGroup)" if isinstance(client, redis.Redis) else "")
        )
    if not configure:
        _check_unconfigured(client, "redis.asyncio.Redis")
        return client, client
    from redis.asyncio.retry import Retry

    return _clone(
        client,
        settings,
        redis.asyncio.Redis,
        (redis.asyncio.ConnectionPool, redis.asyncio.BlockingConnectionPool),
        Retry,
        settings.blocking_timeout,
    )
