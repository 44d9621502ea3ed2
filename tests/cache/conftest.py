"""Shared fixtures: an injectable clock, and one harness that drives both caches.

Scenario tests are written once against :class:`Harness`: with ``kind ==
"sync"`` it calls a :class:`LoadingCache` from the test thread (and starts
concurrent calls on threads); with ``kind == "async"`` it runs an
:class:`AsyncLoadingCache` on an event loop in a thread of its own, and the
test's sync loaders run through ``asyncio.to_thread`` so that both caches see
the same loader, gates included.  Background refreshes are real threads and
tasks in both cases.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from singleflight import AsyncLoadingCache, LoadingCache

from .._support import WAIT, wait_for

__all__ = ["WAIT", "FakeClock", "Harness", "Recorder", "wait_for"]


class FakeClock:
    """A clock that moves only when told to; ``clock.advance(s)`` inside a loader sets its delta."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds

    def set(self, now: float) -> None:
        self.now = now


class Recorder:
    """A loader that records its calls, optionally waits at a gate, and returns ``fn(key)``.

    The gate and ``fn`` are read when a call starts, so a test can hold one load
    while later loads go through, or make later loads return something else.
    """

    def __init__(self, fn: Callable[[Any], Any] = lambda key: f"v{key}") -> None:
        self.fn = fn
        self.calls: list[Any] = []
        self.gate: threading.Event | None = None
        self._lock = threading.Lock()

    def hold(self) -> threading.Event:
        """Make the loads that start from now on block until the returned event is set."""
        self.gate = threading.Event()
        return self.gate

    def let_through(self) -> None:
        """Loads that start from now on do not block (held ones stay held)."""
        self.gate = None

    def __call__(self, key: Any) -> Any:
        fn, gate = self.fn, self.gate
        with self._lock:
            self.calls.append(key)
        if gate is not None:
            assert gate.wait(WAIT), "gate never opened"
        return fn(key)

    def wait_calls(self, n: int) -> None:
        wait_for(lambda: len(self.calls) >= n, what=f"{n} loader calls")


class Harness:
    """Drives a LoadingCache or an AsyncLoadingCache with the same blocking calls."""

    kind: str

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.pool = ThreadPoolExecutor(32, thread_name_prefix="harness")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.caches: list[Any] = []
        if kind == "async":
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=self.loop.run_forever, name="harness-loop")
            self.thread.start()

    @property
    def is_async(self) -> bool:
        return self.kind == "async"

    def make(
        self,
        load: Callable[[Any], Any],
        *,
        load_many: Callable[[list[Any]], Any] | None = None,
        **options: Any,
    ) -> Any:
        """A cache of this harness's kind around the sync loaders ``load`` and ``load_many``."""
        if not self.is_async:
            cache: Any = LoadingCache(load, load_many=load_many, **options)
        else:

            async def aload(key: Any) -> Any:
                return await asyncio.to_thread(load, key)

            aload_many = None
            if load_many is not None:
                sync_many = load_many

                async def aload_many(keys: list[Any]) -> Any:
                    return await asyncio.to_thread(sync_many, keys)

            cache = self.run(lambda: AsyncLoadingCache(aload, load_many=aload_many, **options))
        self.caches.append(cache)
        return cache

    def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` where the cache lives (the loop's thread for the async cache)."""
        if not self.is_async:
            return fn()

        async def call() -> Any:
            return fn()

        return self.call(call())

    def call(self, coro: Any) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def start(self, cache: Any, method: str, *args: Any) -> Future[Any]:
        """Start ``cache.method(*args)`` concurrently; the future holds its outcome."""
        if not self.is_async:
            return self.pool.submit(getattr(cache, method), *args)
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(getattr(cache, method)(*args), self.loop)

    def get(self, cache: Any, key: Any) -> Any:
        return self.start(cache, "get", key).result(WAIT)

    def get_many(self, cache: Any, keys: list[Any]) -> Any:
        return self.start(cache, "get_many", keys).result(WAIT)

    def refresh(self, cache: Any, key: Any) -> Any:
        return self.start(cache, "refresh", key).result(WAIT)

    def invalidate(self, cache: Any, key: Any) -> None:
        self.run(lambda: cache.invalidate(key))

    def clear(self, cache: Any) -> None:
        self.run(cache.clear)

    def put(self, cache: Any, key: Any, value: Any) -> None:
        self.run(lambda: cache.put(key, value))

    def close(self, cache: Any) -> None:
        if self.is_async:
            self.call(cache.aclose())
        else:
            cache.close()

    def shutdown(self) -> None:
        for cache in self.caches:
            self.close(cache)
        self.pool.shutdown(wait=True)
        if self.loop is not None:
            assert self.thread is not None
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT)
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def h(request: pytest.FixtureRequest) -> Iterator[Harness]:
    harness = Harness(request.param)
    try:
        yield harness
    finally:
        harness.shutdown()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
