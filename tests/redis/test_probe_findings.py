"""Findings of an adversarial pass over the Redis tier: each test failed before its fix.

Every test talks to the session's private redis-server (the ``server`` fixture,
emptied per test), or to one of its own, never to a shared one.
"""

from __future__ import annotations

import gc
import threading
from typing import Any

import pytest
import redis
import redis.asyncio
from _redis_server import RedisServer

from singleflight import AbortedError, AsyncLoadingCache, LoadingCache
from singleflight.redis import AsyncRedisGroup, Fleet, JsonCodec, RedisGroup
from tests._support import run, wait_for

WAIT = 10.0


class _EncodeFails(JsonCodec):
    """A codec whose ``encode`` has a bug (raises something other than CodecError)
    for the values (or error records) ``bad`` picks."""

    def __init__(self, error: BaseException, *, records: bool = False) -> None:
        super().__init__()
        self.error = error
        self.records = records

    def encode(self, key: bytes, value: Any) -> bytes:
        if (self.records and isinstance(value, list)) or value == "boom":
            raise self.error
        return super().encode(key, value)


class _Stop(BaseException):
    pass


def _lease_and_fence(client: redis.Redis, namespace: str, key: str) -> tuple[int, bytes | None]:
    base = f"sf:{{{namespace}:{key}}}"
    return int(client.exists(base + ":lease")), client.hget(base + ":fence", "tok")


@pytest.mark.parametrize("error", [RuntimeError("encode bug"), _Stop()], ids=["exc", "base"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_codec_that_raises_on_encode_gives_the_lease_back(
    server: RedisServer, error: BaseException, mode: str
) -> None:
    """Before: a codec's encode raising anything but CodecError (a bug, an interrupt)
    left the lease held and the fence naming the leader: every other process waited
    out the whole lease (here 20 s) before taking over."""
    client = server.client()
    codec = _EncodeFails(error)
    if mode == "sync":
        group: Any = RedisGroup(client, namespace="enc", codec=codec, lease=20.0)
        with pytest.raises(type(error)):
            group.do("k", lambda: "boom")
        group.close()
    else:

        async def main() -> None:
            aclient = redis.asyncio.Redis(port=server.port)
            agroup: AsyncRedisGroup[str, str] = AsyncRedisGroup(
                aclient, namespace="enc", codec=codec, lease=20.0
            )

            async def load() -> str:
                return "boom"

            try:
                # The leader's task was interrupted: its caller gets AbortedError.
                with pytest.raises((type(error), AbortedError)):
                    await agroup.do("k", load)
            finally:
                await agroup.aclose()
                await aclient.aclose()

        run(main(), WAIT)
    assert _lease_and_fence(client, "enc", "k") == (0, None)
    client.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_codec_that_cannot_carry_an_error_record_keeps_the_loaders_error(
    server: RedisServer, mode: str
) -> None:
    """Before: a codec raising (not CodecError) on the error record replaced the
    loader's exception with the codec's in the leader's callers, and kept the lease."""
    client = server.client()
    codec = _EncodeFails(RuntimeError("record bug"), records=True)

    if mode == "sync":
        group: Any = RedisGroup(client, namespace="rec", codec=codec, lease=20.0)

        def fail() -> str:
            raise KeyError("missing")

        with pytest.raises(KeyError):
            group.do("k", fail)
        group.close()
    else:

        async def main() -> None:
            aclient = redis.asyncio.Redis(port=server.port)
            agroup: AsyncRedisGroup[str, str] = AsyncRedisGroup(
                aclient, namespace="rec", codec=codec, lease=20.0
            )

            async def fail() -> str:
                raise KeyError("missing")

            try:
                with pytest.raises(KeyError):
                    await agroup.do("k", fail)
            finally:
                await agroup.aclose()
                await aclient.aclose()

        run(main(), WAIT)
    assert _lease_and_fence(client, "rec", "k") == (0, None)
    client.close()


def test_invalidate_tags_reaches_an_entry_put_in_its_stale_window(
    own_server: RedisServer,
) -> None:
    """Before: ``put`` tagged the key for its freshness only, so once the entry was
    stale (but still stored, for ``stale=``) ``invalidate_tags`` no longer found it:
    it returned, and the next read served the invalidated value.  (A server of its
    own: the fleet's channel thread outlives the cache, PINGing its server.)"""
    client = own_server.client()
    fleet = Fleet(client, namespace="tagged")
    cache: LoadingCache[str, dict[str, str]] = LoadingCache(
        lambda key: {"v": "loaded"},
        ttl=0.2,
        stale=60.0,
        fleet=fleet,
        tags=lambda key, value: ["org"],
    )
    try:
        assert fleet.wait_trusted(WAIT)
        cache.put("a", {"v": "put"})
        res = "sf:{tagged:a}:res"
        # Until the stored entry is past its freshness (PTTL below its stale tail).
        wait_for(lambda: 0 < client.pttl(res) < 60_000, WAIT, "the entry to turn stale")
        cache.invalidate_tags("org")
        assert not client.exists(res), "invalidate_tags left the entry in Redis"
        assert cache.get("a") == {"v": "loaded"}
    finally:
        cache.close()
        client.close()


def _subscribers(client: redis.Redis) -> int:
    """Connections of the server subscribed to a channel."""
    return sum(1 for c in client.client_list() if int(c.get("sub", 0)) + int(c.get("ssub", 0)) > 0)


@pytest.mark.parametrize("end", ["close", "collect"])
def test_the_fleet_channel_stops_with_its_last_fleet(redis_binary: str, end: str) -> None:
    """Before: the hub's thread ("singleflight fleet channel") and its subscriber
    connection outlived every fleet cache, closed or collected, PINGing forever.
    Now they end with the last fleet and start again for the next one."""
    with RedisServer(redis_binary) as own:  # its own: the clients it counts are this test's
        client = own.client()
        try:
            cache: Any = LoadingCache(str.upper, ttl=30, fleet=Fleet(client, namespace="hub"))
            assert cache._fleet.wait_trusted(WAIT)
            thread = cache._fleet._hub()._thread
            assert thread is not None and thread.is_alive()
            assert _subscribers(client) == 1
            if end == "close":
                cache.close()
            else:
                del cache
                gc.collect()
            thread.join(WAIT)
            assert not thread.is_alive()
            wait_for(lambda: _subscribers(client) == 0, WAIT, "the subscriber to go")
            if end == "close":  # still a cache: its reads ask Redis
                assert cache.get("a") == "A"
                assert not cache._fleet.trusted
                cache.invalidate("a")
            # The next fleet starts the hub again.
            again: Any = LoadingCache(str.upper, ttl=30, fleet=Fleet(client, namespace="hub2"))
            assert again._fleet.wait_trusted(WAIT)
            assert _subscribers(client) == 1
            assert again.get("b") == "B"
            again.close()
            wait_for(lambda: _subscribers(client) == 0, WAIT, "the subscriber to go again")
        finally:
            client.close()


def test_the_fleet_channel_stops_with_its_last_async_fleet(redis_binary: str) -> None:
    """As above, for an AsyncLoadingCache closed with ``aclose``; its sender thread goes too."""
    with RedisServer(redis_binary) as own:
        client = own.client()

        async def upper(key: str) -> str:
            return key.upper()

        async def main() -> None:
            aclient = redis.asyncio.Redis(port=own.port)
            cache: Any = AsyncLoadingCache(upper, ttl=30, fleet=Fleet(aclient, namespace="ahub"))
            try:
                assert cache._fleet.wait_trusted(WAIT)
                assert await cache.get("a") == "A"
                await cache.invalidate("a")  # starts the sender thread
                thread = cache._fleet._hub()._thread
                await cache.aclose()
                thread.join(WAIT)
                assert not thread.is_alive()
                assert cache._fleet._sender is None
                assert await cache.get("a") == "A"
            finally:
                await cache._fleet.group.aclose()
                await aclient.aclose()

        try:
            run(main(), WAIT)
            wait_for(lambda: _subscribers(client) == 0, WAIT, "the subscriber to go")
        finally:
            client.close()


class _SlowTrust(LoadingCache[str, str]):
    """A cache whose first "channel subscribed" notice from the hub thread waits for
    ``release``: the window between the fleet marking itself trusted and telling its
    cache, widened so that ``close`` can run inside it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.told = threading.Event()
        super().__init__(*args, **kwargs)

    def _fleet_trust(self, trusted: bool) -> None:
        if trusted and not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(WAIT)
            super()._fleet_trust(trusted)
            self.told.set()
            return
        super()._fleet_trust(trusted)


def test_a_fleet_cache_closed_while_its_channel_is_subscribed_stays_off_its_l1(
    own_server: RedisServer,
) -> None:
    """Before: ``close`` (the fleet leaves its channel) racing the hub thread telling
    the cache its channel was subscribed could end with the cache trusting its L1
    after close: it no longer hears invalidations, yet served its own copies, so a
    change made by another process was never seen."""
    client = own_server.client()
    cache = _SlowTrust(str.upper, ttl=30, fleet=Fleet(client, namespace="race"))
    other: LoadingCache[str, str] = LoadingCache(
        str.upper, ttl=30, fleet=Fleet(client, namespace="race")
    )
    try:
        assert cache.entered.wait(WAIT)  # the hub is telling the cache "trusted"
        cache.close()  # meanwhile: the fleet leaves the channel
        cache.release.set()
        assert cache.told.wait(WAIT)
        assert cache.get("a") == "A"
        assert other._fleet.wait_trusted(WAIT)
        other.put("a", "changed")
        assert cache.get("a") == "changed", "the closed cache served its stale L1 copy"
        assert cache._store.frozen
    finally:
        cache.release.set()
        other.close()
        cache.close()
        client.close()


def test_a_fleet_cache_whose_ttl_function_returns_none(server: RedisServer) -> None:
    # ttl(value) -> None means "never expire", which an entry in Redis cannot do (a
    # plain ttl=None is refused when the cache is made): each load says so clearly
    # (it raised OverflowError from deep inside), and nothing is kept or left held.
    client = server.client()
    cache: LoadingCache[str, str] = LoadingCache(
        str.upper, ttl=lambda value: None, fleet=Fleet(client, namespace="forever")
    )
    try:
        for _ in range(2):
            with pytest.raises(ValueError, match="never expire"):
                cache.get("a")
        assert "a" not in cache
        assert [key for key in client.keys("sf:{forever:*") if key.endswith(b":lease")] == []
    finally:
        cache.close()
        client.close()
