"""@cached, @coalesce and AsyncLoadingCache under asyncio and trio (anyio's pytest plugin)."""

from __future__ import annotations

import gc
import warnings
from typing import Any

import anyio
import pytest

from singleflight import AsyncLoadingCache, cached, coalesce
from singleflight.anyio import AnyIOGroup

from .conftest import FakeClock

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

WAIT = 5.0


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


async def test_coalesce_shares_one_call() -> None:
    calls: list[int] = []
    gate = anyio.Event()

    @coalesce
    async def load(x: int) -> int:
        calls.append(x)
        await gate.wait()
        return x * 2

    results: list[int] = []

    async def call() -> None:
        results.append(await load(3))

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(call)
            while len(load.group) < 1 or load.group.stats().joins < 4:
                await anyio.sleep(0.001)
            gate.set()
    assert results == [6] * 5 and calls == [3]


async def test_cached_hits_misses_and_refresh() -> None:
    calls: list[int] = []

    @cached(ttl=60)
    async def load(x: int) -> int:
        calls.append(x)
        await anyio.sleep(0)
        return x + len(calls)

    with anyio.fail_after(WAIT):
        assert await load(1) == 2
        assert await load(1) == 2
        assert await load.refresh(1) == 3
        assert await load(1) == 3
        assert await load.cache.refresh(load.cache_key(1)) == 4
        assert await load.uncached(1) == 5
    assert load.cache_info().hits == 2
    assert calls == [1, 1, 1, 1]


async def test_stale_read_refreshes_in_the_background() -> None:
    clock = FakeClock()
    calls: list[int] = []
    refreshed = anyio.Event()

    @cached(ttl=10, jitter=0, stale=100, clock=clock)
    async def load(x: int) -> int:
        calls.append(x)
        if len(calls) > 1:
            refreshed.set()
        return len(calls)

    with anyio.fail_after(WAIT):
        assert await load(1) == 1
        clock.advance(11)
        assert await load(1) == 1  # stale: answered at once, a refresh starts
        await refreshed.wait()
        while load.cache._data[1].value != 2:
            await anyio.sleep(0.001)
        assert await load(1) == 2
        await load.cache.aclose()


async def test_an_anyio_group_serves_stale_reads_without_leaking_coroutines() -> None:
    clock = FakeClock()
    calls: list[int] = []

    @cached(ttl=10, jitter=0, stale=100, clock=clock, group=AnyIOGroup())
    async def load(x: int) -> int:
        calls.append(x)
        return len(calls)

    # Garbage of earlier tests of this process (a socket of a closed server's client) is
    # collected first, under the usual filters: only this test's own is checked.
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited"
        with anyio.fail_after(WAIT):
            assert await load(1) == 1
            clock.advance(11)
            assert await load(1) == 1
            while len(calls) < 2:
                await anyio.sleep(0.001)
            await load.cache.aclose()
        gc.collect()


async def test_async_loading_cache_aclose_stops_background_refreshes() -> None:
    clock = FakeClock()
    started = anyio.Event()
    never = anyio.Event()

    async def load(key: str) -> str:
        if started.is_set() or key != "k":
            return key
        return key

    async def slow(key: str) -> str:
        started.set()
        await never.wait()
        return key

    cache: AsyncLoadingCache[str, str] = AsyncLoadingCache(
        load, ttl=10, jitter=0, stale=100, clock=clock
    )
    with anyio.fail_after(WAIT):
        assert await cache.get("k") == "k"
        clock.advance(11)
        cache._load = slow  # the refresh blocks until aclose cancels it
        assert await cache.get("k") == "k"
        await started.wait()
        await cache.aclose()
    assert "k" in cache._data


async def test_trio_needs_no_asyncio_loop_for_many_callers(anyio_backend: str) -> None:
    @cached(ttl=60)
    async def load(x: int) -> int:
        await anyio.sleep(0)
        return x

    async def many(results: list[Any]) -> None:
        results.extend([await load(i % 3) for i in range(30)])

    results: list[Any] = []
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(many, results)
    assert sorted(set(results)) == [0, 1, 2]
    assert load.cache.stats().loads == 3  # one load per key, whoever asked
