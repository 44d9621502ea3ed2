"""Cache events (on_event=): what each read becomes, for both caches, on an injected clock."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from singleflight import AsyncLoadingCache, LoadingCache, cached
from singleflight.events import CacheHit, CacheMiss, Event, RefreshStarted, StaleServed


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def kinds(events: list[Event]) -> list[str]:
    return [type(e).__name__ for e in events]


@pytest.mark.timeout(10)
def test_sync_cache_events_miss_hit_stale_refresh() -> None:
    """Miss, hit, stale-while-revalidate (stale served + refresh started), named."""
    clock = Clock()
    events: list[Event] = []
    cache = LoadingCache(
        lambda k: k * 2, ttl=10, jitter=0, stale=5, clock=clock, on_event=events.append, name="u"
    )
    try:
        assert cache.get(1) == 2
        assert cache.get(1) == 2
        clock.now = 12
        assert cache.get(1) == 2  # stale: the old value at once, a refresh behind it
        assert kinds(events)[:4] == ["CacheMiss", "CacheHit", "StaleServed", "RefreshStarted"]
        assert all(e.cache == "u" and e.key == 1 for e in events)  # type: ignore[union-attr]
        stale = events[2]
        assert isinstance(stale, StaleServed) and stale.age == pytest.approx(2.0)
        refresh = events[3]
        assert isinstance(refresh, RefreshStarted) and refresh.early is False
    finally:
        cache.close()


@pytest.mark.timeout(10)
def test_sync_cache_early_refresh_is_told_as_early() -> None:
    """An XFetch refresh before expiry: a hit, then RefreshStarted(early=True)."""
    clock = Clock()
    events: list[Event] = []

    def load(k: int) -> int:
        clock.now += 0.5  # the load takes time on the cache's clock: XFetch's delta
        return k

    cache = LoadingCache(
        load,
        ttl=10,
        jitter=0,
        early_refresh=1.0,
        clock=clock,
        random=lambda: 0.999999,
        on_event=events.append,
    )
    try:
        cache.get(1)
        clock.now = 10.0  # before expiry (10.5); random() ~ 1 makes XFetch fire
        cache.get(1)
        assert isinstance(events[1], CacheHit)
        assert isinstance(events[2], RefreshStarted) and events[2].early is True
    finally:
        cache.close()


@pytest.mark.timeout(10)
def test_sync_cache_stale_if_error_is_stale_served() -> None:
    """A failed load answered from the old value (stale-if-error) is told as StaleServed."""
    clock = Clock()
    events: list[Event] = []
    fail = [False]

    def load(k: int) -> int:
        if fail[0]:
            raise ValueError("down")
        return k

    cache = LoadingCache(
        load, ttl=10, jitter=0, stale_if_error=30, clock=clock, on_event=events.append
    )
    try:
        cache.get(1)
        clock.now = 15
        fail[0] = True
        assert cache.get(1) == 1
        assert kinds(events) == ["CacheMiss", "CacheMiss", "StaleServed"]
    finally:
        cache.close()


@pytest.mark.timeout(10)
def test_a_cache_with_a_hook_is_of_the_plain_class_and_still_tells_its_hits() -> None:
    """on_event changes no class: type() and repr name the public class, hits are told."""
    events: list[Event] = []
    cache = LoadingCache(lambda k: k, on_event=events.append)
    with cache:
        assert type(cache) is LoadingCache
        assert repr(cache).startswith("<LoadingCache ")
        assert cache.get(1) == 1 and cache.get(1) == 1
        assert kinds(events) == ["CacheMiss", "CacheHit"]
        assert cache.stats().hits == 1

    async def aload(k: int) -> int:
        return k

    async def main() -> None:
        acache = AsyncLoadingCache(aload, on_event=events.append)
        async with acache:
            assert type(acache) is AsyncLoadingCache
            assert repr(acache).startswith("<AsyncLoadingCache ")
            assert await acache.get(2) == 2 and await acache.get(2) == 2

    events.clear()
    asyncio.run(main())
    assert kinds(events) == ["CacheMiss", "CacheHit"]


@pytest.mark.timeout(10)
def test_cache_without_hook_keeps_the_plain_class_and_a_raising_hook_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No hook: the plain LoadingCache; a hook that raises is logged and the read answers."""
    assert type(LoadingCache(lambda k: k)) is LoadingCache

    def broken(event: Any) -> None:
        raise RuntimeError("exporter down")

    caplog.set_level(logging.ERROR, logger="singleflight")
    cache = LoadingCache(lambda k: k + 1, on_event=broken)
    try:
        assert isinstance(cache, LoadingCache)
        assert cache.get(1) == 2
        assert cache.get(1) == 2
    finally:
        cache.close()
    assert any("on_event hook raised" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(10)
def test_async_cache_events() -> None:
    """AsyncLoadingCache tells the same events: miss, hit, stale served, refresh started."""

    async def main() -> list[Event]:
        clock = Clock()
        events: list[Event] = []

        async def load(k: int) -> int:
            await asyncio.sleep(0)
            return k * 3

        cache = AsyncLoadingCache(
            load, ttl=10, jitter=0, stale=5, clock=clock, on_event=events.append, name="a"
        )
        assert type(cache) is AsyncLoadingCache
        async with asyncio.timeout(5):
            assert await cache.get(2) == 6
            assert await cache.get(2) == 6
            clock.now = 11
            assert await cache.get(2) == 6
            await cache.aclose()
        return events

    events = asyncio.run(main())
    assert kinds(events) == ["CacheMiss", "CacheHit", "StaleServed", "RefreshStarted"]
    assert isinstance(events[0], CacheMiss) and events[0].cache == "a"


@pytest.mark.timeout(10)
def test_cached_decorator_tells_every_read_hits_included() -> None:
    """@cached(on_event=...) reports hits too (its inlined hit path is bypassed), named."""
    clock = Clock()
    events: list[Event] = []
    calls: list[int] = []

    @cached(ttl=10, jitter=0, clock=clock, on_event=events.append)
    def double(n: int) -> int:
        calls.append(n)
        return n * 2

    try:
        assert double(4) == 8
        assert double(4) == 8
        clock.now = 11
        assert double(4) == 8
        assert calls == [4, 4]
        assert kinds(events) == ["CacheMiss", "CacheHit", "CacheRemoved", "CacheMiss"]
        name = f"{__name__}.test_cached_decorator_tells_every_read_hits_included.<locals>.double"
        assert all(e.cache == name for e in events)  # type: ignore[union-attr]
        assert double.cache.stats().hits == 1  # type: ignore[attr-defined]
    finally:
        double.cache.close()  # type: ignore[attr-defined]


@pytest.mark.timeout(10)
def test_cached_decorator_unhashable_arguments_and_name_with_on_event() -> None:
    """Arguments are frozen into the key as without on_event; name= labels the events."""
    events: list[Event] = []

    @cached(name="totals", on_event=events.append)
    def total(values: list[int]) -> int:
        return sum(values)

    try:
        assert total([1, 2]) == 3
        assert total([1, 2]) == 3
        assert kinds(events) == ["CacheMiss", "CacheHit"]
        assert {e.cache for e in events} == {"totals"}  # type: ignore[union-attr]
    finally:
        total.cache.close()  # type: ignore[attr-defined]


@pytest.mark.timeout(10)
def test_cached_decorator_async_tells_hits() -> None:
    events: list[Event] = []
    calls: list[int] = []

    @cached(name="sq", on_event=events.append)
    async def square(n: int) -> int:
        calls.append(n)
        await asyncio.sleep(0)
        return n * n

    async def main() -> None:
        async with asyncio.timeout(5):
            results = await asyncio.gather(*(square(3) for _ in range(5)))
            assert results == [9] * 5
            assert await square(3) == 9
            await square.cache.aclose()  # type: ignore[attr-defined]

    asyncio.run(main())
    assert calls == [3]
    assert kinds(events)[-1] == "CacheHit"
    assert kinds(events).count("CacheMiss") >= 1
    assert {e.cache for e in events} == {"sq"}  # type: ignore[union-attr]


def test_cached_decorator_without_on_event_is_named_after_the_function() -> None:
    @cached
    def plain(n: int) -> int:
        return n

    try:
        assert plain.cache.name.endswith("<locals>.plain")  # type: ignore[attr-defined]
    finally:
        plain.cache.close()  # type: ignore[attr-defined]


def test_cached_decorator_rejects_a_bad_hook() -> None:
    with pytest.raises(TypeError, match="on_event must be a callable"):

        @cached(on_event=42)  # type: ignore[arg-type]
        def f(n: int) -> int:
            return n
