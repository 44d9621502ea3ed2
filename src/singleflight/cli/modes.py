"""The ways of serving a read that the demo compares, for threads and for asyncio.

Each mode answers ``get(user_id)`` from a cache in front of the database query:

``naive``
    Cache-aside by hand: look in a TTL dict; on a miss, query and store.  Every
    caller that misses queries, so a hot key that expires is queried by every
    client that asks for it before the first query returns: the stampede.
``group``
    The same TTL dict, with the misses going through a :class:`~singleflight.Group`
    (:class:`~singleflight.AsyncGroup`); the loader looks in the cache again
    (groupcache's second look: a caller that missed just before the last flight
    wrote back must not query again), queries, and writes back.  One query per
    key per expiry, in this process.
``redis``
    The same with a :class:`~singleflight.redis.RedisGroup` behind it: one
    query per key per expiry across every process (``--redis``).
``loading``
    :class:`~singleflight.LoadingCache` (:class:`~singleflight.AsyncLoadingCache`)
    with ``ttl``, ``stale`` (serve the old value while one background refresh
    runs) and ``early_refresh`` (refresh hot keys before they expire); with
    ``--redis`` its group is a RedisGroup (``group=``), so a value loaded by
    one process is cached by every process that waited for it.
``fleet``
    :class:`~singleflight.LoadingCache` with ``fleet=``
    (:class:`~singleflight.redis.Fleet`, ``--redis``): its entries are shared by
    every process in Redis, so one query per key per TTL for the whole fleet,
    and each process's copy lives only as long as the shared entry.  No jitter,
    like the TTL dict.

The TTL dict has no jitter: it is the cache people write by hand.  The
loading cache keeps its default jitter (±10%).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .. import AsyncGroup, AsyncGroupLike, AsyncLoadingCache, Group, GroupLike, LoadingCache

if TYPE_CHECKING:  # the redis extra is imported only when --redis asks for it
    from ..redis import AsyncRedisGroup, RedisGroup

__all__ = [
    "MODES",
    "AsyncMode",
    "Mode",
    "build_async",
    "build_sync",
    "mode_title",
]

Profile = dict[str, Any]
Query = Callable[[int], Profile]
AsyncQuery = Callable[[int], Awaitable[Profile]]
AsyncClosing = Callable[[], Awaitable[None]]

MODES: dict[str, str] = {
    "naive": "naive cache-aside",
    "group": "cache + Group",
    "redis": "cache + RedisGroup",
    "loading": "LoadingCache",
    "fleet": "LoadingCache + Fleet",
}


def mode_title(mode: str, redis: bool = False, asyncio: bool = False) -> str:
    """The name a mode has in the table and the chart."""
    if mode == "group" and asyncio:
        return "cache + AsyncGroup"
    if mode == "redis" and asyncio:
        return "cache + AsyncRedisGroup"
    if mode == "fleet":
        return "AsyncLoadingCache + Fleet" if asyncio else MODES[mode]
    if mode == "loading":
        name = "AsyncLoadingCache" if asyncio else "LoadingCache"
        group = "AsyncRedisGroup" if asyncio else "RedisGroup"
        return f"{name} + {group}" if redis else f"{name} (stale, early refresh)"
    return MODES[mode]


class TtlDict:
    """``key -> (value, expires_at)``: the hand-written cache of the first three modes."""

    __slots__ = ("_data", "_ttl")

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._data: dict[int, tuple[Profile, float]] = {}

    def fresh(self, key: int) -> Profile | None:
        entry = self._data.get(key)
        if entry is not None and time.monotonic() < entry[1]:
            return entry[0]
        return None

    def set(self, key: int, value: Profile) -> None:
        self._data[key] = (value, time.monotonic() + self._ttl)


# -- threads -----------------------------------------------------------------------------


class Mode:
    """A way of answering ``get(user_id)``, for threads."""

    def get(self, key: int) -> Profile:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the mode holds (background refreshes, Redis connections)."""


class _CacheAside(Mode):
    """TTL dict in front; behind it the query (naive), or a Group or RedisGroup running it."""

    def __init__(self, query: Query, ttl: float, group: Any, closing: Callable[[], None]) -> None:
        self._query = query
        self._cache = TtlDict(ttl)
        self._group = group
        self._closing = closing

    def _load(self, key: int) -> Profile:
        value = self._cache.fresh(key)
        if value is None:
            value = self._query(key)
            self._cache.set(key, value)  # written before the flight ends
        return value

    def get(self, key: int) -> Profile:
        value = self._cache.fresh(key)
        if value is None and self._group is None:
            return self._load(key)
        if value is None:
            value = self._group.do(key, self._load, key)
            if self._cache.fresh(key) is None:  # a value loaded by another process
                self._cache.set(key, value)
        return value

    def close(self) -> None:
        self._closing()


class _Loading(Mode):
    def __init__(
        self,
        load: Query,
        ttl: float,
        group: GroupLike[int, Profile] | None,
        closing: Callable[[], None],
    ) -> None:
        self._cache = LoadingCache(load, ttl=ttl, stale=ttl, early_refresh=1.0, group=group)
        self._closing = closing

    def get(self, key: int) -> Profile:
        return self._cache.get(key)

    def close(self) -> None:
        self._cache.close()
        self._closing()


def _nothing() -> None:
    return None


def _redis_group(
    redis_url: str, namespace: str, ttl: float
) -> tuple[RedisGroup[int, Profile], Callable[[], None]]:
    import redis

    from ..redis import RedisGroup

    client = redis.Redis.from_url(redis_url)
    # A process whose copy expires a little after another's takes that
    # process's result from Redis rather than querying again.
    group: RedisGroup[int, Profile] = RedisGroup(client, namespace=namespace, result_ttl=ttl / 2)

    def closing() -> None:
        group.close()
        client.close()

    return group, closing


class _Fleet(Mode):
    def __init__(self, load: Query, ttl: float, redis_url: str, namespace: str) -> None:
        import redis

        from ..redis import Fleet

        self._client = redis.Redis.from_url(redis_url)
        fleet = Fleet(self._client, namespace=namespace)
        self._cache = LoadingCache(load, ttl=ttl, jitter=0, fleet=fleet)
        fleet.wait_trusted(5)  # the L1 is used once the invalidation channel is subscribed

    def get(self, key: int) -> Profile:
        return self._cache.get(key)

    def close(self) -> None:
        self._cache.close()
        self._client.close()


def build_sync(
    mode: str, query: Query, ttl: float, redis_url: str | None = None, namespace: str = ""
) -> Mode:
    """The mode named ``mode`` in front of ``query``."""
    parts = (_Fleet, Group, _nothing, _redis_group, _Loading, _CacheAside)
    return _build(parts, mode, query, ttl, redis_url, namespace)  # type: ignore[no-any-return]


def _build(
    parts: tuple[Any, ...], mode: str, query: Any, ttl: float, redis_url: str | None, namespace: str
) -> Any:
    """build_sync and build_async: ``parts`` are the fleet mode, the group, the
    closing of no Redis group, the Redis group maker, the loading and the naive mode."""
    fleet, new_group, nothing, redis_group, loading, aside = parts
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    if mode == "fleet":
        if redis_url is None:
            raise ValueError("mode fleet needs a Redis URL")
        return fleet(query, ttl, redis_url, namespace)
    group = new_group() if mode == "group" else None
    closing = nothing
    if mode == "redis" or (mode == "loading" and redis_url is not None):
        assert redis_url is not None
        group, closing = redis_group(redis_url, namespace, ttl)
    return (loading if mode == "loading" else aside)(query, ttl, group, closing)


# -- asyncio -----------------------------------------------------------------------------


class AsyncMode:
    """A way of answering ``await get(user_id)``, for asyncio tasks."""

    async def get(self, key: int) -> Profile:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release what the mode holds (background refreshes, Redis connections)."""


class _AsyncCacheAside(AsyncMode):
    def __init__(self, query: AsyncQuery, ttl: float, group: Any, closing: AsyncClosing) -> None:
        self._query = query
        self._cache = TtlDict(ttl)
        self._group = group
        self._closing = closing

    async def _load(self, key: int) -> Profile:
        value = self._cache.fresh(key)
        if value is None:
            value = await self._query(key)
            self._cache.set(key, value)
        return value

    async def get(self, key: int) -> Profile:
        value = self._cache.fresh(key)
        if value is None and self._group is None:
            return await self._load(key)
        if value is None:
            value = await self._group.do(key, self._load, key)
            if self._cache.fresh(key) is None:
                self._cache.set(key, value)
        return value

    async def aclose(self) -> None:
        await self._closing()


class _AsyncLoading(AsyncMode):
    def __init__(
        self,
        load: AsyncQuery,
        ttl: float,
        group: AsyncGroupLike[int, Profile] | None,
        closing: AsyncClosing,
    ) -> None:
        self._cache = AsyncLoadingCache(load, ttl=ttl, stale=ttl, early_refresh=1.0, group=group)
        self._closing = closing

    async def get(self, key: int) -> Profile:
        return await self._cache.get(key)

    async def aclose(self) -> None:
        await self._cache.aclose()
        await self._closing()


async def _anothing() -> None:
    return None


def _async_redis_group(
    redis_url: str, namespace: str, ttl: float
) -> tuple[AsyncRedisGroup[int, Profile], AsyncClosing]:
    import redis.asyncio

    from ..redis import AsyncRedisGroup

    client = redis.asyncio.Redis.from_url(redis_url)
    group: AsyncRedisGroup[int, Profile] = AsyncRedisGroup(
        client, namespace=namespace, result_ttl=ttl / 2
    )

    async def closing() -> None:
        await group.aclose()
        await client.aclose()

    return group, closing


class _AsyncFleet(AsyncMode):
    def __init__(self, load: AsyncQuery, ttl: float, redis_url: str, namespace: str) -> None:
        import redis.asyncio

        from ..redis import Fleet

        self._client = redis.asyncio.Redis.from_url(redis_url)
        self._fleet = Fleet(self._client, namespace=namespace)
        self._cache = AsyncLoadingCache(load, ttl=ttl, jitter=0, fleet=self._fleet)

    async def get(self, key: int) -> Profile:
        return await self._cache.get(key)

    async def aclose(self) -> None:
        await self._cache.aclose()
        await self._client.aclose()


def build_async(
    mode: str, query: AsyncQuery, ttl: float, redis_url: str | None = None, namespace: str = ""
) -> AsyncMode:
    """The mode named ``mode`` in front of ``query``, for the running event loop."""
    parts = (
        _AsyncFleet,
        AsyncGroup,
        _anothing,
        _async_redis_group,
        _AsyncLoading,
        _AsyncCacheAside,
    )
    return _build(parts, mode, query, ttl, redis_url, namespace)  # type: ignore[no-any-return]
