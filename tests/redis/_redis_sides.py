"""Stand-ins for processes inside one test process, for RedisGroup and AsyncRedisGroup alike.

A *side* is one group with clients of its own (and, for asyncio, an event
loop of its own on a thread): to Redis it is a process like any other.  Tests
written against sides run unchanged for both groups.  Loaders are described
by a :class:`Loader` that records its runs and is callable both ways.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from _redis_clients import async_client, sync_client

from singleflight import Result
from singleflight.redis import AsyncRedisGroup, RedisGroup, RedisGroupStats

__all__ = ["AsyncSide", "Loader", "Outcome", "SyncSide", "make_side"]


class Loader:
    """A loader taking ``seconds``, returning ``value`` (or raising ``error``); counts runs."""

    def __init__(
        self,
        value: Any = "v",
        seconds: float = 0.0,
        error: BaseException | None = None,
        gate: threading.Event | None = None,
    ) -> None:
        self.value = value
        self.seconds = seconds
        self.error = error
        self.gate = gate
        self.runs = 0
        self.finished = 0
        self._lock = threading.Lock()

    def _enter(self) -> None:
        with self._lock:
            self.runs += 1

    def _exit(self) -> Any:
        with self._lock:
            self.finished += 1
        if self.error is not None:
            raise self.error
        return self.value

    def sync(self) -> Any:
        self._enter()
        if self.gate is not None:
            assert self.gate.wait(30)
        time.sleep(self.seconds)
        return self._exit()

    async def coro(self) -> Any:
        self._enter()
        if self.gate is not None:
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, self.gate.wait, 30)
        await asyncio.sleep(self.seconds)
        return self._exit()


class Outcome:
    __slots__ = ("elapsed", "error", "value")

    def __init__(self, value: Any, error: BaseException | None, elapsed: float) -> None:
        self.value = value
        self.error = error
        self.elapsed = elapsed

    def __repr__(self) -> str:
        return f"Outcome({self.value!r}, {self.error!r}, {self.elapsed:.3f}s)"


class SyncSide:
    mode = "sync"

    def __init__(self, port: int, cluster: bool = False, **options: Any) -> None:
        options.setdefault("namespace", "test")
        self.client = sync_client({"port": port, "cluster": cluster})
        self.group: RedisGroup[Any, Any] = RedisGroup(self.client, **options)

    def call(self, key: Any, loader: Loader, timeout: float = 30.0) -> Outcome:
        started = time.monotonic()
        try:
            value, error = self.group.do(key, loader.sync), None
        except Exception as exc:
            value, error = None, exc
        return Outcome(value, error, time.monotonic() - started)

    def call_result(self, key: Any, loader: Loader, timeout: float = 30.0) -> Result[Any]:
        return self.group.do_result(key, loader.sync)

    def submit(self, key: Any, loader: Loader) -> Future[Outcome]:
        """Call from a new thread; the future gets the outcome."""
        future: Future[Outcome] = Future()
        threading.Thread(
            target=lambda: future.set_result(self.call(key, loader)), daemon=True
        ).start()
        return future

    def submit_result(self, key: Any, loader: Loader) -> Future[Result[Any]]:
        """do_result from a new thread."""
        future: Future[Result[Any]] = Future()
        threading.Thread(
            target=lambda: future.set_result(self.call_result(key, loader)), daemon=True
        ).start()
        return future

    def forget(self, key: Any) -> None:
        self.group.forget(key)

    def forget_unshared(self, key: Any) -> bool:
        return self.group.forget_unshared(key)

    def stats(self) -> RedisGroupStats:
        return self.group.stats()

    def close(self) -> None:
        self.group.close()
        self.client.close()


class AsyncSide:
    mode = "async"

    def __init__(self, port: int, cluster: bool = False, **options: Any) -> None:
        options.setdefault("namespace", "test")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.client = async_client({"port": port, "cluster": cluster})
        self.group: AsyncRedisGroup[Any, Any] = AsyncRedisGroup(self.client, **options)

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _call(self, key: Any, loader: Loader) -> Outcome:
        started = time.monotonic()
        try:
            value, error = await self.group.do(key, loader.coro), None
        except Exception as exc:
            value, error = None, exc
        return Outcome(value, error, time.monotonic() - started)

    def call(self, key: Any, loader: Loader, timeout: float = 30.0) -> Outcome:
        return self.run(self._call(key, loader), timeout)  # type: ignore[no-any-return]

    def call_result(self, key: Any, loader: Loader, timeout: float = 30.0) -> Result[Any]:
        return self.run(self.group.do_result(key, loader.coro), timeout)  # type: ignore[no-any-return]

    def submit(self, key: Any, loader: Loader) -> Future[Outcome]:
        return asyncio.run_coroutine_threadsafe(self._call(key, loader), self.loop)

    def submit_result(self, key: Any, loader: Loader) -> Future[Result[Any]]:
        return asyncio.run_coroutine_threadsafe(self.group.do_result(key, loader.coro), self.loop)

    def forget(self, key: Any) -> None:
        async def forget() -> None:
            await self.group.aforget(key)

        self.run(forget())

    def forget_unshared(self, key: Any) -> bool:
        async def forget() -> bool:
            return self.group.forget_unshared(key)

        return self.run(forget())  # type: ignore[no-any-return]

    def stats(self) -> RedisGroupStats:
        return self.group.stats()

    def close(self) -> None:
        async def close() -> None:
            await self.group.aclose()
            await self.client.aclose()

        try:
            self.run(close(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def make_side(mode: str) -> Callable[..., SyncSide | AsyncSide]:
    return SyncSide if mode == "sync" else AsyncSide
