"""A loading cache in front of a group that crosses processes, without Redis.

The group here answers as a RedisGroup does in a process that waited on
another's flight: with the other process's value (or a RemoteError), never
calling the cache's loader.  The real thing, across processes and Redis, is
tests/redis/test_redis_cache.py; these cover the paths that are hard to reach
there (refreshes, cancellation, bad groups).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from singleflight import AsyncLoadingCache, LoadingCache, RemoteError

from .conftest import FakeClock, wait_for

pytestmark = pytest.mark.timeout(30)


class Remote(RemoteError):
    def __init__(self, name: str) -> None:
        super().__init__(f"the loader raised {name} elsewhere")
        self.type_name = name


class Elsewhere:
    """Answers every ``do`` with ``outcome``, loaded "in another process": ``fn`` never runs."""

    crosses_processes = True

    def __init__(self, outcome: Any = "theirs") -> None:
        self.outcome = outcome
        self.calls = 0
        self.forgotten: list[Any] = []

    def _answer(self) -> Any:
        self.calls += 1
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def do(self, key: Any, fn: Callable[..., Any], /, *args: Any) -> Any:
        return self._answer()

    def forget(self, key: Any) -> None:
        self.forgotten.append(key)


class AsyncElsewhere(Elsewhere):
    """The asyncio twin; ``do`` waits for ``gate`` when one is set."""

    def __init__(self, outcome: Any = "theirs", gate: asyncio.Event | None = None) -> None:
        super().__init__(outcome)
        self.gate = gate

    async def do(self, key: Any, fn: Callable[..., Any], /, *args: Any) -> Any:  # type: ignore[override]
        if self.gate is not None:
            await self.gate.wait()
        return self._answer()


def never(key: Any) -> Any:
    raise AssertionError(f"the loader ran here for {key!r}")


async def anever(key: Any) -> Any:
    raise AssertionError(f"the loader ran here for {key!r}")


def test_a_group_that_crosses_processes_needs_forget() -> None:
    class NoForget:
        crosses_processes = True

        def do(self, key: Any, fn: Callable[..., Any], /, *args: Any) -> Any:
            return fn(*args)

    class AsyncNoForget:
        crosses_processes = True

        async def do(self, key: Any, fn: Callable[..., Any], /, *args: Any) -> Any:
            return await fn(*args)

    with pytest.raises(TypeError, match="crosses processes but has no forget"):
        LoadingCache(never, group=NoForget())
    with pytest.raises(TypeError, match="crosses processes but has no forget"):
        AsyncLoadingCache(anever, group=AsyncNoForget())


def test_a_value_from_elsewhere_is_cached_with_the_ttl_of_a_local_load() -> None:
    clock = FakeClock()
    group = Elsewhere()
    cache: LoadingCache[str, Any] = LoadingCache(
        never, ttl=10.0, jitter=0.0, clock=clock, group=group
    )
    assert cache.get("k") == "theirs"
    assert cache.get("k") == "theirs" and group.calls == 1
    clock.advance(9.9)
    assert "k" in cache
    clock.advance(0.2)
    assert "k" not in cache
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.loads, stats.load_failures) == (1, 1, 0, 0)


def test_a_stale_refresh_and_refresh_write_back_values_from_elsewhere() -> None:
    clock = FakeClock()
    group = Elsewhere("new")
    with LoadingCache(never, ttl=10.0, jitter=0.0, stale=10.0, clock=clock, group=group) as cache:
        cache.put("k", "old")
        clock.advance(11.0)
        assert cache.get("k") == "old"  # served stale; the refresh runs in the background
        wait_for(lambda: cache.get("k") == "new", what="the refresh written back")
        group.outcome = "newer"
        assert cache.refresh("k") == "newer"
        assert cache.get("k") == "newer"
        assert group.calls == 2 and cache.stats().loads == 0


def test_a_remote_key_error_is_raised_by_get_and_left_out_by_get_many() -> None:
    group = Elsewhere(Remote("KeyError"))
    cache: LoadingCache[str, Any] = LoadingCache(never, group=group)
    with pytest.raises(Remote):
        cache.get("gone")
    group.outcome = "here"
    assert "gone" not in cache
    group.outcome = Remote("KeyError")
    assert cache.get_many(["gone"]) == {}
    group.outcome = Remote("ValueError")
    with pytest.raises(Remote, match="ValueError"):
        cache.get_many(["broken"])
    assert cache.stats().load_failures == 0


def test_negative_caching_of_a_remote_key_error() -> None:
    clock = FakeClock()
    group = Elsewhere(Remote("KeyError"))
    cache: LoadingCache[str, Any] = LoadingCache(
        never, negative=KeyError, negative_ttl=5.0, jitter=0.0, clock=clock, group=group
    )
    for _ in range(3):
        with pytest.raises(Remote):
            cache.get("gone")
    assert group.calls == 1
    clock.advance(5.0)
    with pytest.raises(Remote):
        cache.get("gone")
    assert group.calls == 2


def test_cancelling_every_caller_of_a_remote_flight_leaves_no_lease() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        group = AsyncElsewhere(gate=gate)
        cache: AsyncLoadingCache[str, Any] = AsyncLoadingCache(anever, group=group)
        callers = [asyncio.create_task(cache.get("k")) for _ in range(3)]
        await asyncio.sleep(0)
        assert len(cache._store.leases) == 1  # held by the three waiting callers
        for caller in callers:
            caller.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        assert (cache._store.leases, cache._store.holders) == ({}, {})
        # The next caller takes a lease of its own and writes what it gets.
        gate.set()
        assert await cache.get("k") == "theirs"
        assert "k" in cache and cache._store.leases == {}

    asyncio.run(asyncio.wait_for(main(), 10))


def test_an_invalidate_while_an_async_caller_waits_keeps_its_value_out() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        group = AsyncElsewhere("old", gate=gate)
        cache: AsyncLoadingCache[str, Any] = AsyncLoadingCache(anever, group=group)
        caller = asyncio.create_task(cache.get("k"))
        await asyncio.sleep(0)
        cache.invalidate("k")
        gate.set()
        assert await caller == "old"
        assert "k" not in cache and group.forgotten == ["k"]

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_local_group_is_left_as_it_was() -> None:
    """A group without the marker: the cache takes no lease before calling it."""
    calls: list[Any] = []
    seen: list[dict[Any, int]] = []

    class Local:
        def do(self, key: Any, fn: Callable[..., Any], /, *args: Any) -> Any:
            calls.append(key)
            seen.append(dict(cache._store.leases))
            return "theirs"  # a group that does not run fn: nothing is written

    cache: LoadingCache[str, Any] = LoadingCache(never, group=Local())
    assert cache.get("k") == "theirs"
    assert seen == [{}] and "k" not in cache


def test_sync_elsewhere_from_threads_writes_once() -> None:
    group = Elsewhere()
    cache: LoadingCache[str, Any] = LoadingCache(never, group=group)
    barrier = threading.Barrier(8)

    def read() -> Any:
        barrier.wait(5)
        return cache.get("k")

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert "k" in cache and len(cache) == 1
    assert (cache._store.leases, cache._store.holders) == ({}, {})
