"""Hostile conditions for the caches and decorators: finalizers and predicates calling
the cache, ``os.fork()`` during a batch load, exception context between readers of a
cached error, functions sharing a qualified name, a clock stepping back, and instances
that die while their method's entries are cached.

Every wait is bounded (:func:`bounded` joins a daemon thread with a timeout), so a
deadlock is a failure within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from singleflight import AsyncGroup, Group, LoadingCache, cached, coalesce

from .._support import run_in_child
from .conftest import FakeClock

pytestmark = pytest.mark.timeout(60)

WAIT = 5.0


def bounded(fn: Callable[[], Any], timeout: float = WAIT, what: str = "") -> Any:
    """Run ``fn`` in a daemon thread and return its result (or raise its exception);
    still running after ``timeout`` seconds, it hung: the test fails."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"hung: {what or fn} did not finish within {timeout}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@contextlib.contextmanager
def gc_threshold(*threshold: int) -> Iterator[None]:
    saved = gc.get_threshold()
    gc.set_threshold(*threshold)
    try:
        yield
    finally:
        gc.set_threshold(*saved)


class Private(Exception):
    """An exception one reader handles on its own."""


# -- 7. user code run under the cache's lock ------------------------------------------------


class _ReadsOnCollect:
    """Cyclic garbage whose finalizer reads the cache (a pool returning a connection)."""

    def __init__(self, cache: LoadingCache[Any, Any], key: object) -> None:
        self.cache = cache
        self.key = key
        self.me = self

    def __del__(self) -> None:
        self.cache.get(self.key)
        self.cache.invalidate(self.key)


class Uncoalesced:
    """A group that runs every call itself: the cache's own lock, without a group's."""

    def do(self, key: Any, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


@pytest.mark.parametrize("group", ["default", "uncoalesced"])
def test_finalizer_reading_the_cache_during_gc_does_not_deadlock(group: str) -> None:
    cache: LoadingCache[Any, Any] = LoadingCache(
        lambda key: key,
        ttl=60,
        maxsize=100,
        group=Uncoalesced() if group == "uncoalesced" else None,  # type: ignore[arg-type]
    )

    def churn() -> None:
        with gc_threshold(1, 1000, 1000):  # young collections only: fast
            for i in range(3000):
                _ReadsOnCollect(cache, ("finalizer", i))
                cache.get(i)
                cache.invalidate(i)
                cache.put(i, i)
                cache.stats()

    try:
        bounded(churn, 20, "reads with finalizers reading the cache")
    finally:
        gc.collect()


def test_negative_predicate_reading_the_cache_does_not_deadlock() -> None:
    cache: LoadingCache[str, Any]

    def is_negative(value: object) -> bool:
        # A predicate may look at the cache: its stats, another key.
        cache.stats()
        return value is None and cache.get("other") == "other"

    cache = LoadingCache(
        lambda key: None if key == "missing" else key, negative=is_negative, negative_ttl=5
    )
    assert bounded(lambda: cache.get("missing")) is None
    assert bounded(lambda: cache.get("present")) == "present"
    assert cache.stats().size == 3


def test_clock_and_random_may_read_the_cache() -> None:
    cache: LoadingCache[str, Any]
    clock = FakeClock()

    def reading_clock() -> float:
        with contextlib.suppress(NameError):  # the cache reads the clock while it is made
            cache.stats()
        return clock()

    def reading_random() -> float:
        cache.stats()
        return 0.5

    cache = LoadingCache(str.upper, ttl=10, clock=reading_clock, random=reading_random)
    assert bounded(lambda: cache.get("a")) == "A"
    assert bounded(lambda: cache.get_many(["a", "b"])) == {"a": "A", "b": "B"}


# -- 5. os.fork() during a load --------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads running
def test_fork_during_a_batch_load_resets_it_in_the_child() -> None:
    started = threading.Event()
    gate = threading.Event()

    def load_many(keys: list[str]) -> dict[str, str]:
        if not started.is_set():
            started.set()
            gate.wait(WAIT)
        return {k: k.upper() for k in keys}

    cache: LoadingCache[str, str] = LoadingCache(str.upper, load_many=load_many, ttl=60)
    batch = threading.Thread(target=lambda: cache.get_many(["a", "b"]), daemon=True)
    batch.start()
    assert started.wait(WAIT)

    def child() -> None:
        assert cache.get("a") == "A"
        assert cache.get_many(["a", "b", "c"]) == {"a": "A", "b": "B", "c": "C"}
        assert cache.stats().in_flight == 0

    try:
        run_in_child(child)
    finally:
        gate.set()
        batch.join(WAIT)


# -- 9. a negatively cached error read by several callers -------------------------------------


def test_negatively_cached_error_carries_no_reader_context_to_another() -> None:
    cache: LoadingCache[str, str] = LoadingCache(
        lambda key: (_ for _ in ()).throw(KeyError(key)), negative=KeyError, negative_ttl=60
    )
    caught: list[BaseException] = []
    for _ in range(2):  # the load, then a read of the cached error
        try:
            cache.get("k")
        except KeyError as exc:
            caught.append(exc)
    try:
        raise Private("the other reader's own")
    except Private:
        with contextlib.suppress(KeyError):
            cache.get("k")
    for exc in caught:
        context = exc.__context__
        while context is not None:
            assert not isinstance(context, Private), "one reader's exception leaked to another"
            context = context.__context__


# -- 10. functions with the same qualified name on one shared group -------------------------


def _factory(factor: int, gate: threading.Event, decorate: Callable[..., Any]) -> Any:
    @decorate
    def scaled(x: int) -> int:
        gate.wait(WAIT)
        return x * factor

    return scaled


@pytest.mark.parametrize("decorator", ["coalesce", "cached"])
def test_shared_group_keeps_closures_with_one_qualname_apart(decorator: str) -> None:
    group: Group[Any, Any] = Group()
    gate = threading.Event()
    make = coalesce if decorator == "coalesce" else cached
    double = _factory(2, gate, make(group=group))
    triple = _factory(3, gate, make(group=group))
    assert double.__qualname__ == triple.__qualname__
    results: dict[str, Any] = {}
    first = threading.Thread(target=lambda: results.setdefault("double", double(10)))
    first.start()
    while len(group) < 1:
        first.join(0.002)
    second = threading.Thread(target=lambda: results.setdefault("triple", triple(10)))
    second.start()
    while len(group) < 2 and not group.stats().joins:
        second.join(0.002)
    gate.set()
    first.join(WAIT)
    second.join(WAIT)
    assert results == {"double": 20, "triple": 30}


def test_shared_group_keeps_lambdas_apart() -> None:
    group: Group[Any, Any] = Group()
    gate = threading.Event()
    first_fn = coalesce(group=group)(lambda x: gate.wait(WAIT) and x + 1)
    second_fn = coalesce(group=group)(lambda x: gate.wait(WAIT) and x - 1)
    results: dict[str, Any] = {}
    first = threading.Thread(target=lambda: results.setdefault("plus", first_fn(10)))
    first.start()
    while len(group) < 1:
        first.join(0.002)
    second = threading.Thread(target=lambda: results.setdefault("minus", second_fn(10)))
    second.start()
    while len(group) < 2 and not group.stats().joins:
        second.join(0.002)
    gate.set()
    first.join(WAIT)
    second.join(WAIT)
    assert results == {"plus": 11, "minus": 9}


def test_shared_async_group_keeps_closures_with_one_qualname_apart() -> None:
    group: AsyncGroup[Any, Any] = AsyncGroup()

    def factory(factor: int, gate: asyncio.Event) -> Any:
        @coalesce(group=group)
        async def scaled(x: int) -> int:
            await gate.wait()
            return x * factor

        return scaled

    async def main() -> list[int]:
        gate = asyncio.Event()
        double, triple = factory(2, gate), factory(3, gate)
        tasks = [asyncio.ensure_future(double(10)), asyncio.ensure_future(triple(10))]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), WAIT)

    assert bounded(lambda: asyncio.run(main())) == [20, 30]


# -- 12. a clock that steps back during a load -------------------------------------------------


def test_clock_stepping_back_during_a_load_never_makes_an_entry_fresh_past_expiry() -> None:
    clock = FakeClock()
    loads: list[str] = []

    def load(key: str) -> str:
        loads.append(key)
        if len(loads) == 1:
            clock.advance(-10.0)  # NTP steps the clock back while the load runs
        return f"{key}{len(loads)}"

    cache: LoadingCache[str, str] = LoadingCache(
        load, ttl=60, jitter=0, early_refresh=1.0, clock=clock, random=lambda: 0.5
    )
    assert cache.get("k") == "k1"
    entry = cache._data["k"]
    assert entry.fresh_until <= entry.expires_at
    assert entry.delta >= 0
    clock.set(entry.expires_at + 300)
    assert "k" not in cache
    assert cache.get("k") == "k2", "an expired entry was served as fresh"


# -- 19. entries of dead instances ---------------------------------------------------------------


@pytest.mark.parametrize("maxsize", [None, 10_000])
def test_cached_method_drops_the_entries_of_dead_instances(maxsize: int | None) -> None:
    class Client:
        @cached(maxsize=maxsize)
        def fetch(self, path: str) -> str:
            return path.upper()

    for i in range(500):
        assert Client().fetch(f"/{i}") == f"/{i}".upper()
    gc.collect()
    live = Client()
    assert live.fetch("/live") == "/LIVE"  # a miss: a chance to drop what died
    assert len(Client.fetch.cache) <= 1  # type: ignore[attr-defined]
    assert live.fetch("/live") == "/LIVE"


def test_async_cached_method_drops_the_entries_of_dead_instances() -> None:
    class Client:
        @cached(maxsize=None)
        async def fetch(self, path: str) -> str:
            return path.upper()

    async def main() -> int:
        for i in range(500):
            await Client().fetch(f"/{i}")
        gc.collect()
        await Client().fetch("/last")
        gc.collect()
        live = Client()
        await live.fetch("/live")
        return len(Client.fetch.cache)  # type: ignore[attr-defined]

    assert bounded(lambda: asyncio.run(main())) <= 2
