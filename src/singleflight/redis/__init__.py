"""Coalescing across processes and machines on Redis (or Valkey).

Install with ``pip install 'pysingleflight[redis]'``::

    from singleflight.redis import RedisGroup, AsyncRedisGroup

    users = RedisGroup(redis.Redis(), namespace="users")
    user = users.do("user:42", load_user, 42)        # one load across every process

    ausers = AsyncRedisGroup(redis.asyncio.Redis(), namespace="users")
    user = await ausers.do("user:42", fetch_user, 42)

Each process coalesces its own callers first (a :class:`singleflight.Group` /
:class:`singleflight.AsyncGroup` in front), then one Lua script per key
decides who leads across processes.  Waiters block on the leader's completion
stream (``XREAD BLOCK``) rather than polling; leases are short and renewed by a
watchdog; completions are fenced.  See the documentation's "Redis" page.

A :class:`Fleet` turns a loading cache into a two-level one shared by every
process (``@cached(ttl=60, fleet=redis.Redis())``): see the documentation's
"Fleet caches" page.
"""

from .._options import missing

try:
    import redis as _redis
except ImportError as exc:  # pragma: no cover - exercised without redis-py installed
    raise missing("redis", "redis", "redis-py") from exc

if int(_redis.__version__.split(".")[0]) < 5:  # pragma: no cover
    raise missing("redis", "redis", f"redis-py >= 5 (found {_redis.__version__})")

from ..stats import RedisGroupStats
from ._async import AsyncRedisGroup
from ._core import FlightInfo, current_flight
from ._errors import LoaderError, RedisUnavailableError
from ._fleet import Fleet
from ._sync import RedisGroup
from .codecs import (
    Codec,
    CodecError,
    JsonCodec,
    MsgpackCodec,
    PayloadTooLargeError,
    SignedPickleCodec,
)

__all__ = [
    "AsyncRedisGroup",
    "Codec",
    "CodecError",
    "FlightInfo",
    "Fleet",
    "JsonCodec",
    "LoaderError",
    "MsgpackCodec",
    "PayloadTooLargeError",
    "RedisGroup",
    "RedisGroupStats",
    "RedisUnavailableError",
    "SignedPickleCodec",
    "current_flight",
]
