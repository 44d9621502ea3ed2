"""AsyncLoadingCache only: cancellation, tasks and event loops.

The scenarios both caches share are in test_loading_cache.py; these need real
async loaders (they cancel them) and run each test in its own ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from singleflight import AbortedError, AsyncLoadingCache, Group

from .._support import WAIT, run, until
from .conftest import FakeClock

pytestmark = pytest.mark.timeout(30)

T = TypeVar("T")


class AsyncLoader:
    """An async loader that counts calls and, while held, waits on an event."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.gate: asyncio.Event | None = None
        self.started = 0
        self.cancelled = 0
        self.value: Callable[[Any], Any] = lambda key: f"v{key}"

    def hold(self) -> asyncio.Event:
        self.gate = asyncio.Event()
        return self.gate

    async def __call__(self, key: Any) -> Any:
        self.calls.append(key)
        gate, value = self.gate, self.value
        try:
            if gate is not None:
                await gate.wait()
            else:
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return value(key)


def test_a_thousand_tasks_share_one_load() -> None:
    async def main() -> None:
        load = AsyncLoader()
        gate = load.hold()
        cache: AsyncLoadingCache[int, str] = AsyncLoadingCache(load, ttl=10.0)
        tasks = [asyncio.create_task(cache.get(1)) for _ in range(1000)]
        await until(lambda: cache.stats().misses == 1000)
        gate.set()
        assert await asyncio.gather(*tasks) == ["v1"] * 1000
        assert load.calls == [1]
        await cache.aclose()

    run(main(), 2 * WAIT)


def test_cancelling_one_caller_leaves_the_load_to_the_others() -> None:
    async def main() -> None:
        load = AsyncLoader()
        gate = load.hold()
        cache: AsyncLoadingCache[int, str] = AsyncLoadingCache(load)
        first = asyncio.create_task(cache.get(1))
        second = asyncio.create_task(cache.get(1))
        await until(lambda: cache.stats().misses == 2)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.set()
        assert await second == "v1"
        assert load.calls == [1] and load.cancelled == 0

    run(main(), 2 * WAIT)


def test_a_lone_cancelled_caller_leaves_the_load_running_and_cached() -> None:
    async def main() -> None:
        load = AsyncLoader()
        gate = load.hold()
        cache: AsyncLoadingCache[int, str] = AsyncLoadingCache(load)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await cache.get(1)
        gate.set()
        await until(lambda: cache.stats().loads == 1)
        assert load.cancelled == 0
        assert await cache.get(1) == "v1"  # the load that outlived its caller was cached
        assert load.calls == [1]

    run(main(), 2 * WAIT)


def test_aclose_cancels_background_refreshes_and_leaves_no_task() -> None:
    async def main() -> None:
        clock = FakeClock()
        load = AsyncLoader()
        cache: AsyncLoadingCache[int, str] = AsyncLoadingCache(
            load, ttl=10.0, jitter=0.0, stale=10.0, clock=clock
        )
        for key in range(3):
            await cache.get(key)
        load.hold()
        load.value = lambda key: "new"
        clock.advance(11.0)
        for key in range(3):
            assert await cache.get(key) == f"v{key}"
        await until(lambda: len(load.calls) == 6)
        await cache.aclose()
        assert load.cancelled == 3
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert cache._background.tasks == set() and cache._background.loads == set()
        # The cancelled refreshes wrote nothing; the cache still answers.
        assert cache.stats().loads == 3
        load.gate = None
        assert await cache.get(0) == "new"  # past expiry, closed: loaded by the caller

    run(main(), 2 * WAIT)


def test_a_caller_that_joined_a_cancelled_refresh_gets_aborted_or_the_old_value() -> None:
    async def main() -> None:
        clock = FakeClock()
        load = AsyncLoader()
        cache: AsyncLoadingCache[str, str] = AsyncLoadingCache(
            load, ttl=10.0, jitter=0.0, stale=10.0, clock=clock
        )
        await cache.get("a")
        load.hold()
        clock.advance(11.0)
        assert await cache.get("a") == "va"  # starts the refresh
        await until(lambda: len(load.calls) == 2)
        clock.advance(10.0)  # past the stale window: the next caller joins the refresh
        joined = asyncio.create_task(cache.get("a"))
        await until(lambda: cache.stats().misses == 2)
        await cache.aclose()
        with pytest.raises(AbortedError):
            await joined

    run(main(), 2 * WAIT)


def test_cancelling_get_many_keeps_its_batch_for_the_joiners() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        batches: list[list[int]] = []

        async def load_many(keys: list[int]) -> dict[int, str]:
            batches.append(keys)
            await gate.wait()
            return {k: f"b{k}" for k in keys}

        cache: AsyncLoadingCache[int, str] = AsyncLoadingCache(AsyncLoader(), load_many=load_many)
        many = asyncio.create_task(cache.get_many([1, 2]))
        await until(lambda: batches)
        joiner = asyncio.create_task(cache.get(2))
        await until(lambda: cache.stats().misses == 3)
        many.cancel()
        with pytest.raises(asyncio.CancelledError):
            await many
        gate.set()
        assert await joiner == "b2"
        assert await cache.get(1) == "b1"  # the batch ran on and was cached
        assert batches == [[1, 2]]

    run(main(), 2 * WAIT)


def test_aclose_cancels_a_batch_and_releases_its_keys() -> None:
    async def main() -> None:
        batches: list[list[int]] = []
        gate = asyncio.Event()

        async def load_many(keys: list[int]) -> dict[int, str]:
            batches.append(keys)
            await gate.wait()
            return {k: f"b{k}" for k in keys}

        load = AsyncLoader()
        cache: AsyncLoadingCache[int, str] = AsyncLoadingCache(load, load_many=load_many)
        many = asyncio.create_task(cache.get_many([1, 2]))
        await until(lambda: batches)
        joiner = asyncio.create_task(cache.get(1))
        await until(lambda: cache.stats().misses == 3)
        await cache.aclose()
        with pytest.raises(AbortedError, match="batch load was cancelled"):
            await joiner
        with pytest.raises(AbortedError):
            await many
        assert await cache.get(1) == "v1"  # nothing of the batch is left in the way
        assert load.calls == [1]

    run(main(), 2 * WAIT)


def test_a_batch_cancelled_before_it_ran_releases_its_keys() -> None:
    async def main() -> None:
        batches: list[list[int]] = []

        async def load_many(keys: list[int]) -> dict[int, str]:
            batches.append(keys)
            return {k: f"b{k}" for k in keys}

        cache: AsyncLoadingCache[int, str] = AsyncLoadingCache(AsyncLoader(), load_many=load_many)
        many = asyncio.create_task(cache.get_many([1, 2]))
        await asyncio.sleep(0)  # get_many has made its batch task, which has not run yet
        await cache.aclose()
        with pytest.raises(AbortedError):
            await many
        assert batches == []
        assert cache._store.batches == {} and cache._store.leases == {}
        assert await cache.get_many([1, 2]) == {1: "b1", 2: "b2"}

    run(main(), 2 * WAIT)


def test_one_cache_over_several_event_loops_in_turn() -> None:
    load = AsyncLoader()
    cache: AsyncLoadingCache[int, str] = AsyncLoadingCache(load, ttl=100.0)

    async def use(key: int) -> str:
        return await cache.get(key)

    assert asyncio.run(use(1)) == "v1"
    assert asyncio.run(use(1)) == "v1"
    assert asyncio.run(use(2)) == "v2"
    assert load.calls == [1, 2]


def test_loaders_that_are_not_async_get_a_clear_error() -> None:
    async def main() -> None:
        cache: AsyncLoadingCache[int, int] = AsyncLoadingCache(lambda key: key)  # type: ignore[arg-type,return-value]
        with pytest.raises(TypeError, match=r"needs an async loader; .* returned int"):
            await cache.get(1)
        many: AsyncLoadingCache[int, int] = AsyncLoadingCache(
            AsyncLoader(),
            load_many=lambda keys: {k: k for k in keys},  # type: ignore[arg-type,return-value]
        )
        with pytest.raises(TypeError, match=r"needs an async loader; .* returned dict"):
            await many.get_many([1])

    run(main(), 2 * WAIT)


def test_async_cache_refuses_a_thread_group() -> None:
    with pytest.raises(TypeError, match="AsyncLoadingCache needs an AsyncGroup"):
        AsyncLoadingCache(AsyncLoader(), group=Group())  # type: ignore[arg-type]


def test_refresh_is_not_cancelled_with_its_caller() -> None:
    async def main() -> None:
        load = AsyncLoader()
        cache: AsyncLoadingCache[int, str] = AsyncLoadingCache(load)
        await cache.get(1)
        gate = load.hold()
        load.value = lambda key: "new"
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await cache.refresh(1)
        assert await cache.get(1) == "v1"
        gate.set()
        await until(lambda: cache.stats().loads == 2)
        assert await cache.get(1) == "new"

    run(main(), 2 * WAIT)


def test_background_work_of_every_kind_is_tracked(caplog: pytest.LogCaptureFixture) -> None:
    """A failing refresh is logged once and its task is gone afterwards."""

    async def main() -> None:
        clock = FakeClock()
        fail = [False]

        async def load(key: int) -> str:
            await asyncio.sleep(0)
            if fail[0]:
                raise ConnectionError("down")
            return "v"

        cache: AsyncLoadingCache[int, str] = AsyncLoadingCache(
            load, ttl=1.0, jitter=0.0, stale=5.0, clock=clock
        )
        await cache.get(1)
        fail[0] = True
        clock.advance(2.0)
        assert await cache.get(1) == "v"
        await until(lambda: not cache._background.tasks)
        assert cache.stats().load_failures == 1
        await cache.aclose()

    run(main(), 2 * WAIT)
    assert [r.levelname for r in caplog.records if "keeps serving" in r.getMessage()] == ["WARNING"]


def test_load_many_asking_for_a_key_of_its_own_batch_is_told_so() -> None:
    async def main() -> None:
        holder: list[AsyncLoadingCache[int, str]] = []

        async def load_many(keys: list[int]) -> dict[int, str]:
            with pytest.raises(RuntimeError, match="a key of its own batch: it would wait"):
                await holder[0].get(keys[0])
            return {k: f"b{k}" for k in keys}

        cache: AsyncLoadingCache[int, str] = AsyncLoadingCache(AsyncLoader(), load_many=load_many)
        holder.append(cache)
        assert await cache.get_many([1, 2]) == {1: "b1", 2: "b2"}

    run(main(), 2 * WAIT)


def test_load_many_asking_for_its_own_keys_in_bulk_is_told_so() -> None:
    async def main() -> None:
        holder: list[AsyncLoadingCache[int, str]] = []
        other = asyncio.Event()

        async def load_many(keys: list[int]) -> dict[int, str]:
            if keys == [1, 2]:
                with pytest.raises(RuntimeError, match="a key of its own batch"):
                    await holder[0].get_many([2, 3])
                other.set()
            return {k: f"b{k}" for k in keys}

        cache: AsyncLoadingCache[int, str] = AsyncLoadingCache(AsyncLoader(), load_many=load_many)
        holder.append(cache)
        assert await cache.get_many([1, 2]) == {1: "b1", 2: "b2"}
        assert other.is_set()

    run(main(), 2 * WAIT)
