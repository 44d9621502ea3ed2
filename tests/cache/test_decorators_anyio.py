"""@cached, @coalesce and AsyncLoadingCache under asyncio and trio (anyio's pytest plugin)."""

from __future__ import annotations

import gc
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from singleflight import AbortedError, AsyncLoadingCache, cached, coalesce
from singleflight.anyio import AnyIOGroup

from .._support import until
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


# -- get_many with load_many: the batch runs in a task of its own (a system task under trio)


class _Loaders:
    """``load`` and ``load_many`` recording their calls; ``load_many`` waits for ``gate``
    and raises ``error`` if one is set."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.batches: list[list[int]] = []
        self.gate = anyio.Event()
        self.error: Exception | None = None

    async def load(self, key: int) -> str:
        self.calls.append(key)
        return f"v{key}"

    async def load_many(self, keys: list[int]) -> dict[int, str]:
        self.batches.append(keys)
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return {k: f"b{k}" for k in keys}

    def cache(self) -> AsyncLoadingCache[int, str]:
        return AsyncLoadingCache(self.load, load_many=self.load_many)


async def _outcome(results: dict[str, Any], name: str, call: Any) -> None:
    try:
        results[name] = await call()
    except Exception as exc:
        results[name] = exc


@asynccontextmanager
async def _a_batch_and_a_joiner(
    cache: AsyncLoadingCache[int, str], loaders: _Loaders, results: dict[str, Any]
) -> AsyncIterator[None]:
    """``get_many([1, 2])`` (outcome in ``results["many"]``) runs its batch, and ``get(1)``
    (``results["joiner"]``) has joined it; both have ended when the block exits."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_outcome, results, "many", lambda: cache.get_many([1, 2]))
        await until(lambda: loaders.batches)
        tg.start_soon(_outcome, results, "joiner", lambda: cache.get(1))
        await until(lambda: cache.stats().misses == 3)
        yield


async def test_get_many_batches_the_misses_and_get_joins_the_batch() -> None:
    loaders = _Loaders()
    cache = loaders.cache()
    results: dict[str, Any] = {}
    with anyio.fail_after(WAIT):
        assert await cache.get(3) == "v3"
        async with anyio.create_task_group() as tg:
            tg.start_soon(_outcome, results, "many", lambda: cache.get_many([1, 2, 3]))
            await until(lambda: loaders.batches)
            tg.start_soon(_outcome, results, "joiner", lambda: cache.get(2))
            await until(lambda: cache.stats().misses == 4)  # 3, then 1 and 2, then 2
            loaders.gate.set()
        assert results == {"many": {1: "b1", 2: "b2", 3: "v3"}, "joiner": "b2"}
        assert await cache.get_many([1, 2]) == {1: "b1", 2: "b2"}  # cached
    assert loaders.batches == [[1, 2]] and loaders.calls == [3]


async def test_a_failed_batch_reaches_every_waiter() -> None:
    loaders = _Loaders()
    loaders.error = ValueError("the database is down")
    cache = loaders.cache()
    results: dict[str, Any] = {}
    with anyio.fail_after(WAIT):
        async with _a_batch_and_a_joiner(cache, loaders, results):
            loaders.gate.set()
        assert [type(results[name]) for name in ("many", "joiner")] == [ValueError] * 2
        assert str(results["joiner"]) == "the database is down"
        loaders.error = None
        assert await cache.get_many([1, 2]) == {1: "b1", 2: "b2"}  # nothing cached, no lease left
    assert loaders.batches == [[1, 2], [1, 2]]


async def test_cancelling_get_many_keeps_its_batch_for_the_joiners() -> None:
    loaders = _Loaders()
    cache = loaders.cache()
    results: dict[str, Any] = {}
    scopes: list[anyio.CancelScope] = []

    async def many() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            results["many"] = await cache.get_many([1, 2])
        results["cancelled"] = scope.cancelled_caught

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(many)
            await until(lambda: loaders.batches)
            tg.start_soon(_outcome, results, "joiner", lambda: cache.get(2))
            await until(lambda: cache.stats().misses == 3)
            scopes[0].cancel()
            await until(lambda: "cancelled" in results)
            loaders.gate.set()
        assert results == {"cancelled": True, "joiner": "b2"}
        assert await cache.get(1) == "b1"  # the batch ran on and was cached
    assert loaders.batches == [[1, 2]] and loaders.calls == []


async def test_aclose_cancels_a_batch_and_releases_its_keys() -> None:
    loaders = _Loaders()
    cache = loaders.cache()
    results: dict[str, Any] = {}
    with anyio.fail_after(WAIT):
        async with _a_batch_and_a_joiner(cache, loaders, results):
            await cache.aclose()
        assert [type(results[name]) for name in ("many", "joiner")] == [AbortedError] * 2
        assert "batch load was cancelled" in str(results["joiner"])
        assert await cache.get(1) == "v1"  # nothing of the batch is left in the way
    assert loaders.calls == [1]


async def test_a_batch_cancelled_before_it_ran_releases_its_keys() -> None:
    loaders = _Loaders()
    cache = loaders.cache()
    results: dict[str, Any] = {}
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_outcome, results, "many", lambda: cache.get_many([1, 2]))
            await until(lambda: cache.stats().misses == 2)  # its batch is made, maybe not run
            await cache.aclose()
        assert type(results["many"]) is AbortedError
        assert cache._store.batches == {} and cache._store.leases == {}
        loaders.gate.set()
        assert await cache.get_many([1, 2]) == {1: "b1", 2: "b2"}
    assert loaders.batches in ([[1, 2]], [[1, 2], [1, 2]])


async def test_load_many_asking_for_a_key_of_its_own_batch_is_told_so() -> None:
    told: list[str] = []

    async def load_many(keys: list[int]) -> dict[int, str]:
        try:
            await cache.get(keys[0])
        except RuntimeError as exc:
            told.append(str(exc))
        return {k: f"b{k}" for k in keys}

    cache = AsyncLoadingCache(_Loaders().load, load_many=load_many)
    with anyio.fail_after(WAIT):
        assert await cache.get_many([1, 2]) == {1: "b1", 2: "b2"}
    assert len(told) == 1 and "a key of its own batch: it would wait" in told[0]


async def test_two_acloses_at_once_both_return() -> None:
    """Before, under trio: each aclose made a new "idle" event and waited on it; the
    last background task set only the newest, so the first aclose waited forever."""
    loaders = _Loaders()
    cache = loaders.cache()
    results: dict[str, Any] = {}
    closed: list[int] = []

    async def close(n: int) -> None:
        await cache.aclose()
        closed.append(n)

    with anyio.fail_after(WAIT):
        async with (
            _a_batch_and_a_joiner(cache, loaders, results),
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(close, 1)
            tg.start_soon(close, 2)
    assert sorted(closed) == [1, 2]
