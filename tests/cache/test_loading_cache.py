"""Scenarios every loading cache must pass, run on LoadingCache and AsyncLoadingCache.

Each test takes the ``h`` harness (see conftest.py), parametrised over both
drivers, and an injected clock, so TTL decisions are exact rather than slept.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
import traceback
from typing import Any

import pytest

from singleflight import AbortedError, AsyncGroup, Group

from .conftest import WAIT, FakeClock, Harness, Recorder, wait_for

pytestmark = pytest.mark.timeout(30)


class NotFound(Exception):
    pass


# -- the basics ------------------------------------------------------------------------


def test_get_loads_once_then_hits(h: Harness, clock: FakeClock) -> None:
    rec = Recorder()
    cache = h.make(rec, ttl=10.0, clock=clock)
    assert h.get(cache, 1) == "v1"
    assert h.get(cache, 1) == "v1"
    assert h.get(cache, 2) == "v2"
    assert rec.calls == [1, 2]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.loads, stats.size) == (1, 2, 2, 2)
    assert stats.hit_ratio == pytest.approx(1 / 3)


def test_concurrent_misses_share_one_load(h: Harness, clock: FakeClock) -> None:
    rec = Recorder()
    gate = rec.hold()
    cache = h.make(rec, ttl=10.0, clock=clock)
    futures = [h.start(cache, "get", 7) for _ in range(20)]
    rec.wait_calls(1)
    wait_for(lambda: cache.stats().misses == 20, what="20 callers waiting")
    gate.set()
    assert [f.result(WAIT) for f in futures] == ["v7"] * 20
    assert rec.calls == [7]
    assert cache.stats().loads == 1


def test_error_reaches_every_caller_and_is_not_cached(h: Harness, clock: FakeClock) -> None:
    failures = [ValueError("backend down")]

    def load(key: int) -> str:
        if failures:
            raise failures[0]
        return f"v{key}"

    rec = Recorder(load)
    gate = rec.hold()
    cache = h.make(rec, ttl=10.0, clock=clock)
    futures = [h.start(cache, "get", 1) for _ in range(5)]
    rec.wait_calls(1)
    wait_for(lambda: cache.stats().misses == 5)
    gate.set()
    for future in futures:
        with pytest.raises(ValueError, match="backend down"):
            future.result(WAIT)
    assert rec.calls == [1]
    failures.clear()
    rec.let_through()
    assert h.get(cache, 1) == "v1"  # the error was not cached
    assert rec.calls == [1, 1]
    stats = cache.stats()
    assert (stats.loads, stats.load_failures) == (1, 1)


def test_unhashable_keys_get_a_clear_error(h: Harness) -> None:
    cache = h.make(Recorder())
    for call in (
        lambda: h.get(cache, [1]),
        lambda: h.get_many(cache, [1, [2]]),
        lambda: h.refresh(cache, {}),
        lambda: h.invalidate(cache, [1]),
        lambda: h.put(cache, [1], 2),
    ):
        with pytest.raises(TypeError, match=r"cache keys must be hashable; got (list|dict)"):
            call()


# -- TTL, jitter, size -------------------------------------------------------------------


def test_ttl_expires_exactly(h: Harness, clock: FakeClock) -> None:
    rec = Recorder()
    cache = h.make(rec, ttl=10.0, jitter=0.0, clock=clock)
    h.get(cache, 1)
    clock.advance(9.999)
    h.get(cache, 1)
    assert rec.calls == [1]
    assert 1 in cache
    clock.advance(0.001)
    assert 1 not in cache
    h.get(cache, 1)
    assert rec.calls == [1, 1]


def test_no_ttl_means_no_expiry(h: Harness, clock: FakeClock) -> None:
    rec = Recorder()
    cache = h.make(rec, clock=clock)
    h.get(cache, 1)
    clock.advance(1e9)
    h.get(cache, 1)
    assert rec.calls == [1]


@pytest.mark.parametrize(("draw", "lifetime"), [(0.0, 9.0), (0.5, 10.0), (0.75, 10.5)])
def test_jitter_spreads_the_lifetime(
    h: Harness, clock: FakeClock, draw: float, lifetime: float
) -> None:
    rec = Recorder()
    cache = h.make(rec, ttl=10.0, jitter=0.1, clock=clock, random=lambda: draw)
    h.get(cache, 1)
    clock.advance(lifetime - 1e-9)
    h.get(cache, 1)
    assert len(rec.calls) == 1
    clock.advance(2e-9)
    h.get(cache, 1)
    assert len(rec.calls) == 2


def test_default_jitter_keeps_a_batch_from_expiring_together(h: Harness, clock: FakeClock) -> None:
    n = 400
    cache = h.make(
        Recorder(),
        load_many=lambda keys: {k: k for k in keys},
        ttl=100.0,
        maxsize=None,
        clock=clock,
        random=random.Random(7).random,
    )
    h.get_many(cache, list(range(n)))
    expired_at: dict[int, float] = {}
    # Walk the clock through the +-10% window and record when each key stops being held.
    for step in range(0, 2201):
        now = 1000.0 + 89.0 + step * 0.01
        clock.set(now)
        for key in range(n):
            if key not in expired_at and key not in cache:
                expired_at[key] = now
    assert len(expired_at) == n
    times = sorted(expired_at.values())
    assert times[0] >= 1000.0 + 90.0 - 0.01 and times[-1] <= 1000.0 + 110.0 + 0.01
    # Spread over the window, not bunched: every 2-second slice of it sees expiries.
    for lo in range(90, 110, 2):
        assert any(1000.0 + lo < t <= 1000.0 + lo + 2 for t in times), lo


def test_maxsize_bounds_the_cache_and_keeps_recently_read_keys(
    h: Harness, clock: FakeClock
) -> None:
    rec = Recorder()
    cache = h.make(rec, maxsize=3, clock=clock)
    for key in (1, 2, 3):
        h.get(cache, key)
    h.get(cache, 1)  # read again: 1 gets a second chance, 2 is the least recently used
    h.get(cache, 4)
    assert len(cache) == 3
    assert 2 not in cache and {1, 3, 4} <= {k for k in (1, 2, 3, 4) if k in cache}
    for key in range(5, 50):
        h.get(cache, key)
        assert len(cache) <= 3
    assert cache.stats().evictions == 49 - 3


def test_dead_entries_are_dropped_and_counted(h: Harness, clock: FakeClock) -> None:
    cache = h.make(Recorder(), ttl=1.0, jitter=0.0, clock=clock)
    h.get(cache, 1)
    clock.advance(5)
    h.get(cache, 1)
    assert cache.stats().evictions == 1
    assert len(cache) == 1


# -- stale-while-revalidate ------------------------------------------------------------------


def test_stale_hit_returns_at_once_and_starts_one_refresh(h: Harness, clock: FakeClock) -> None:
    rec = Recorder()
    cache = h.make(rec, ttl=10.0, jitter=0.0, stale=5.0, clock=clock)
    assert h.get(cache, 1) == "v1"
    rec.fn = lambda key: f"new{key}"
    gate = rec.hold()
    clock.advance(12.0)
    for _ in range(20):
        assert h.get(cache, 1) == "v1"  # the refresh is held at its gate: nobody waits on it
    rec.wait_calls(2)
    time.sleep(0.05)
    assert rec.calls == [1, 1]  # one refresh, however many stale reads
    gate.set()
    wait_for(lambda: h.get(cache, 1) == "new1", what="the refreshed value")
    stats = cache.stats()
    assert (stats.refreshes, stats.loads) == (1, 2)
    assert stats.stale_served >= 20


def test_after_the_stale_window_callers_wait_for_the_load(h: Harness, clock: FakeClock) -> None:
    rec = Recorder()
    cache = h.make(rec, ttl=10.0, jitter=0.0, stale=5.0, clock=clock)
    h.get(cache, 1)
    rec.fn = lambda key: "new"
    clock.advance(15.0)
    assert h.get(cache, 1) == "new"
    assert cache.stats().stale_served == 0


def test_failed_background_refresh_keeps_the_value(
    h: Harness, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(key: int) -> str:
        raise ConnectionError("refresh failed")

    rec = Recorder()
    cache = h.make(rec, ttl=10.0, jitter=0.0, stale=5.0, clock=clock)
    h.get(cache, 1)
    rec.fn = boom
    clock.advance(11.0)
    with caplog.at_level(logging.WARNING, logger="singleflight.cache"):
        assert h.get(cache, 1) == "v1"
        rec.wait_calls(2)
        wait_for(lambda: cache.stats().load_failures == 1)
        wait_for(lambda: any("keeps serving" in r.getMessage() for r in caplog.records))
    # The cache counts and logs the failure inside the refresh's flight: a get before
    # that flight has left the group would join it, not start another attempt.
    wait_for(lambda: cache.stats().in_flight == 0, what="the failed refresh's flight to end")
    # The failed refresh neither evicted the value nor blocked another attempt.
    assert h.get(cache, 1) == "v1"
    rec.wait_calls(3)
    rec.fn = lambda key: "fixed"
    clock.advance(3.0)  # still inside the stale window
    wait_for(lambda: h.get(cache, 1) == "fixed", what="a later refresh to succeed")


def test_failed_explicit_refresh_raises_and_keeps_the_value(h: Harness, clock: FakeClock) -> None:
    rec = Recorder()
    cache = h.make(rec, ttl=10.0, jitter=0.0, clock=clock)
    h.get(cache, 1)

    def boom(key: int) -> str:
        raise ConnectionError("nope")

    rec.fn = boom
    with pytest.raises(ConnectionError):
        h.refresh(cache, 1)
    assert h.get(cache, 1) == "v1"
    assert rec.calls == [1, 1]
    rec.fn = lambda key: "again"
    assert h.refresh(cache, 1) == "again"
    assert h.get(cache, 1) == "again"
    assert cache.stats().refreshes == 2


# -- stale-if-error --------------------------------------------------------------------------


def test_stale_if_error_serves_the_old_value_and_logs(
    h: Harness, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    cache = h.make(rec, ttl=10.0, jitter=0.0, stale_if_error=30.0, clock=clock)
    h.get(cache, 1)

    def boom(key: int) -> str:
        raise TimeoutError("backend timeout")

    rec.fn = boom
    clock.advance(25.0)
    with caplog.at_level(logging.WARNING, logger="singleflight.cache"):
        assert h.get(cache, 1) == "v1"
    assert rec.calls == [1, 1]  # it did try to load
    stats = cache.stats()
    assert (stats.load_failures, stats.stale_served, stats.misses) == (1, 1, 2)
    [record] = [r for r in caplog.records if "keeps serving" in r.getMessage()]
    assert record.exc_info is not None and isinstance(record.exc_info[1], TimeoutError)
    clock.advance(15.1)  # 40.1 s after the load: past expiry + stale_if_error
    with pytest.raises(TimeoutError):
        h.get(cache, 1)


def test_stale_if_error_does_not_hide_not_found(h: Harness, clock: FakeClock) -> None:
    rec = Recorder()
    cache = h.make(
        rec,
        ttl=10.0,
        jitter=0.0,
        stale_if_error=30.0,
        negative=NotFound,
        negative_ttl=5.0,
        clock=clock,
    )
    h.get(cache, 1)

    def gone(key: int) -> str:
        raise NotFound(key)

    rec.fn = gone
    clock.advance(11.0)
    with pytest.raises(NotFound):
        h.get(cache, 1)  # a not-found answer is an answer, not a failure
    with pytest.raises(NotFound):
        h.get(cache, 1)
    assert len(rec.calls) == 2


# -- XFetch ----------------------------------------------------------------------------------


def test_early_refresh_follows_the_xfetch_formula(h: Harness, clock: FakeClock) -> None:
    draws: list[float] = []

    def rand() -> float:
        return draws.pop(0)

    def load(key: int) -> str:
        clock.advance(2.0)  # this load takes 2 s: delta = 2
        return f"v{len(rec.calls)}"

    rec = Recorder(load)
    cache = h.make(rec, ttl=100.0, jitter=0.0, early_refresh=1.0, clock=clock, random=rand)
    start = clock()
    assert h.get(cache, 1) == "v1"
    expiry = start + 2.0 + 100.0
    # Far from expiry no draw is made at all (the hit path's one comparison).
    clock.set(expiry - 2.0 * 36.8)
    assert h.get(cache, 1) == "v1"
    # 3 s before expiry: refresh iff delta * beta * -ln(u) >= 3, with u = 1 - draw.
    clock.set(expiry - 3.0)
    draws.append(1.0 - math.exp(-1.0))  # -ln(u) = 1: 2 < 3, no refresh
    assert h.get(cache, 1) == "v1"
    assert draws == [] and len(rec.calls) == 1
    draws.append(1.0 - math.exp(-1.6))  # -ln(u) = 1.6: 3.2 >= 3, refresh
    assert h.get(cache, 1) == "v1"  # served at once; the refresh runs behind it
    rec.wait_calls(2)
    wait_for(lambda: cache.stats().loads == 2)
    assert h.get(cache, 1) == "v2"
    stats = cache.stats()
    assert (stats.early_refreshes, stats.refreshes, stats.stale_served) == (1, 0, 0)


def test_without_early_refresh_no_draws_and_no_refresh(h: Harness, clock: FakeClock) -> None:
    def rand() -> float:
        raise AssertionError("no draw expected")

    rec = Recorder()
    cache = h.make(rec, ttl=10.0, jitter=0.0, early_refresh=None, clock=clock, random=rand)
    h.get(cache, 1)
    clock.advance(9.99999)
    h.get(cache, 1)
    assert rec.calls == [1]
    assert cache.stats().early_refreshes == 0


# -- negative caching ------------------------------------------------------------------------


def test_negative_values_are_cached_for_negative_ttl(h: Harness, clock: FakeClock) -> None:
    rec = Recorder(lambda key: None if key < 0 else key)
    cache = h.make(
        rec, ttl=100.0, jitter=0.0, negative=lambda v: v is None, negative_ttl=5.0, clock=clock
    )
    assert h.get(cache, -1) is None
    assert h.get(cache, 1) == 1
    clock.advance(4.0)
    assert h.get(cache, -1) is None
    assert rec.calls == [-1, 1]
    clock.advance(1.0)
    assert h.get(cache, -1) is None  # not-found expired after negative_ttl
    assert h.get(cache, 1) == 1  # the found value lives for ttl
    assert rec.calls == [-1, 1, -1]


def test_not_found_errors_are_cached_and_reraised_without_growing(
    h: Harness, clock: FakeClock
) -> None:
    def load(key: int) -> str:
        raise NotFound(f"no user {key}")

    rec = Recorder(load)
    cache = h.make(
        rec, ttl=100.0, jitter=0.0, negative=(NotFound, LookupError), negative_ttl=5.0, clock=clock
    )
    lengths = []
    for _ in range(20):
        with pytest.raises(NotFound, match="no user 3") as info:
            h.get(cache, 3)
        lengths.append(len(traceback.extract_tb(info.value.__traceback__)))
    assert rec.calls == [3]
    assert max(lengths) - min(lengths) <= 1, lengths
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.loads, stats.load_failures) == (19, 1, 1, 0)
    clock.advance(5.0)
    with pytest.raises(NotFound):
        h.get(cache, 3)
    assert rec.calls == [3, 3]


def test_other_errors_are_never_cached(h: Harness, clock: FakeClock) -> None:
    def load(key: int) -> str:
        raise RuntimeError("transient")

    rec = Recorder(load)
    cache = h.make(rec, ttl=100.0, negative=NotFound, negative_ttl=5.0, clock=clock)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            h.get(cache, 1)
    assert rec.calls == [1, 1, 1]


# -- bulk loads --------------------------------------------------------------------------------


def test_get_many_batches_the_misses(h: Harness, clock: FakeClock) -> None:
    batches: list[list[int]] = []

    def load_many(keys: list[int]) -> dict[int, str]:
        batches.append(list(keys))
        return {k: f"b{k}" for k in keys}

    rec = Recorder()
    cache = h.make(rec, load_many=load_many, ttl=10.0, clock=clock)
    assert h.get(cache, 2) == "v2"
    result = h.get_many(cache, [3, 2, 1, 3])
    assert list(result.items()) == [(3, "b3"), (2, "v2"), (1, "b1")]
    assert batches == [[3, 1]]
    assert h.get_many(cache, [1, 2, 3]) == {1: "b1", 2: "v2", 3: "b3"}
    assert batches == [[3, 1]]
    stats = cache.stats()
    assert (stats.misses, stats.loads) == (3, 2)


def test_get_many_without_load_many_loads_each_key(h: Harness, clock: FakeClock) -> None:
    rec = Recorder()
    cache = h.make(rec, ttl=10.0, clock=clock)
    assert h.get_many(cache, [1, 2, 1]) == {1: "v1", 2: "v2"}
    assert sorted(rec.calls) == [1, 2]


def test_get_many_joins_a_load_in_flight(h: Harness, clock: FakeClock) -> None:
    batches: list[list[int]] = []

    def load_many(keys: list[int]) -> dict[int, str]:
        batches.append(list(keys))
        return {k: f"b{k}" for k in keys}

    rec = Recorder()
    gate = rec.hold()
    cache = h.make(rec, load_many=load_many, ttl=10.0, clock=clock)
    single = h.start(cache, "get", 1)
    rec.wait_calls(1)
    many = h.start(cache, "get_many", [1, 2])
    wait_for(lambda: batches == [[2]], what="the batch of the other key")
    assert not many.done()  # it waits for the single load of key 1
    gate.set()
    assert many.result(WAIT) == {1: "v1", 2: "b2"}
    assert single.result(WAIT) == "v1"
    assert rec.calls == [1]


def test_get_joins_a_batch_in_flight(h: Harness, clock: FakeClock) -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def load_many(keys: list[int]) -> dict[int, str]:
        batches.append(list(keys))
        assert gate.wait(WAIT)
        return {k: f"b{k}" for k in keys}

    rec = Recorder()
    cache = h.make(rec, load_many=load_many, ttl=10.0, clock=clock)
    many = h.start(cache, "get_many", [1, 2])
    wait_for(lambda: batches == [[1, 2]])
    single = h.start(cache, "get", 2)
    other_batch = h.start(cache, "get_many", [2, 3])
    wait_for(lambda: batches == [[1, 2], [3]], what="a second batch without key 2")
    gate.set()
    assert single.result(WAIT) == "b2"
    assert many.result(WAIT) == {1: "b1", 2: "b2"}
    assert other_batch.result(WAIT) == {2: "b2", 3: "b3"}
    assert rec.calls == []  # nobody loaded key 2 on its own


def test_a_key_the_batch_leaves_out(h: Harness, clock: FakeClock) -> None:
    gate = threading.Event()

    def load_many(keys: list[int]) -> dict[int, str]:
        assert gate.wait(WAIT)
        return {k: f"b{k}" for k in keys if k != 404}

    rec = Recorder()
    cache = h.make(rec, load_many=load_many, ttl=10.0, clock=clock)
    many = h.start(cache, "get_many", [1, 404])
    wait_for(lambda: cache.stats().misses == 2)
    joined = h.start(cache, "get", 404)
    wait_for(lambda: cache.stats().misses == 3)
    gate.set()
    assert many.result(WAIT) == {1: "b1"}  # left out of the dict
    with pytest.raises(KeyError) as info:
        joined.result(WAIT)  # a get that joined the batch raises KeyError
    assert info.value.args == (404,)
    assert 404 not in cache  # not cached without negative caching
    assert h.get(cache, 404) == "v404"  # so the next get loads it on its own


def test_a_left_out_key_is_cached_as_not_found_with_negative_ttl(
    h: Harness, clock: FakeClock
) -> None:
    calls: list[list[int]] = []

    def load_many(keys: list[int]) -> dict[int, str]:
        calls.append(list(keys))
        return {k: f"b{k}" for k in keys if k != 404}

    rec = Recorder()
    cache = h.make(
        rec,
        load_many=load_many,
        ttl=10.0,
        jitter=0.0,
        negative=NotFound,
        negative_ttl=5.0,
        clock=clock,
    )
    assert h.get_many(cache, [1, 404]) == {1: "b1"}
    with pytest.raises(KeyError):
        h.get(cache, 404)
    assert h.get_many(cache, [404, 1]) == {1: "b1"}
    assert calls == [[1, 404]] and rec.calls == []
    clock.advance(5.0)
    assert h.get_many(cache, [404]) == {}
    assert calls == [[1, 404], [404]]


def test_a_failed_batch_reaches_its_joiners_and_stale_if_error_applies(
    h: Harness, clock: FakeClock
) -> None:
    fail = [False]

    def load_many(keys: list[int]) -> dict[int, str]:
        if fail[0]:
            raise ConnectionError("batch down")
        return {k: f"b{k}" for k in keys}

    cache = h.make(
        Recorder(), load_many=load_many, ttl=10.0, jitter=0.0, stale_if_error=60.0, clock=clock
    )
    h.get_many(cache, [1])
    fail[0] = True
    clock.advance(11.0)
    # Key 1 has an old value to stand in; key 2 has none, so its error is raised.
    with pytest.raises(ConnectionError):
        h.get_many(cache, [1, 2])
    assert h.get_many(cache, [1]) == {1: "b1"}
    stats = cache.stats()
    assert stats.load_failures == 2 and stats.stale_served == 2


def test_load_many_must_return_a_mapping(h: Harness) -> None:
    cache = h.make(Recorder(), load_many=lambda keys: [1, 2])
    with pytest.raises(TypeError, match="load_many must return a mapping"):
        h.get_many(cache, [1, 2])
    assert cache.stats().load_failures == 1


# -- leases: a load that started before a write never overwrites it --------------------------


@pytest.mark.parametrize("how", ["invalidate", "clear"])
def test_a_load_older_than_an_invalidation_is_not_written(
    h: Harness, clock: FakeClock, how: str
) -> None:
    rec = Recorder(lambda key: "old")
    gate = rec.hold()
    cache = h.make(rec, ttl=10.0, clock=clock)
    first = h.start(cache, "get", 1)
    rec.wait_calls(1)
    if how == "invalidate":
        h.invalidate(cache, 1)
    else:
        h.clear(cache)
    rec.let_through()
    rec.fn = lambda key: "new"
    # A caller after the invalidation does not join the old load: it loads anew.
    assert h.get(cache, 1) == "new"
    gate.set()
    assert first.result(WAIT) == "old"  # the old load still answers its own caller
    assert h.get(cache, 1) == "new"  # ...but did not overwrite the newer value
    assert rec.calls == [1, 1]


def test_invalidate_during_a_load_leaves_the_key_empty(h: Harness, clock: FakeClock) -> None:
    rec = Recorder(lambda key: "old")
    gate = rec.hold()
    cache = h.make(rec, ttl=10.0, clock=clock)
    first = h.start(cache, "get", 1)
    rec.wait_calls(1)
    h.invalidate(cache, 1)
    gate.set()
    assert first.result(WAIT) == "old"
    assert 1 not in cache
    rec.let_through()
    rec.fn = lambda key: "new"
    assert h.get(cache, 1) == "new"


def test_put_during_a_load_wins(h: Harness, clock: FakeClock) -> None:
    rec = Recorder(lambda key: "loaded")
    gate = rec.hold()
    cache = h.make(rec, ttl=10.0, clock=clock)
    first = h.start(cache, "get", 1)
    rec.wait_calls(1)
    h.put(cache, 1, "written")
    gate.set()
    assert first.result(WAIT) == "loaded"
    assert h.get(cache, 1) == "written"


def test_refresh_during_a_load_discards_the_older_load(h: Harness, clock: FakeClock) -> None:
    rec = Recorder(lambda key: "old")
    gate = rec.hold()
    cache = h.make(rec, ttl=10.0, clock=clock)
    first = h.start(cache, "get", 1)
    rec.wait_calls(1)
    rec.let_through()
    rec.fn = lambda key: "new"
    assert h.refresh(cache, 1) == "new"  # a new load, not the one in flight
    gate.set()
    assert first.result(WAIT) == "old"
    assert h.get(cache, 1) == "new"
    assert rec.calls == [1, 1]


def test_refresh_serves_the_current_value_meanwhile(h: Harness, clock: FakeClock) -> None:
    rec = Recorder()
    cache = h.make(rec, ttl=10.0, clock=clock)
    h.get(cache, 1)
    rec.fn = lambda key: "new"
    gate = rec.hold()
    refreshing = h.start(cache, "refresh", 1)
    rec.wait_calls(2)
    assert h.get(cache, 1) == "v1"
    gate.set()
    assert refreshing.result(WAIT) == "new"
    assert h.get(cache, 1) == "new"


def test_invalidate_during_a_batch_discards_that_key_only(h: Harness, clock: FakeClock) -> None:
    gate = threading.Event()

    def load_many(keys: list[int]) -> dict[int, str]:
        assert gate.wait(WAIT)
        return {k: f"b{k}" for k in keys}

    rec = Recorder(lambda key: f"single{key}")
    cache = h.make(rec, load_many=load_many, ttl=10.0, clock=clock)
    many = h.start(cache, "get_many", [1, 2])
    wait_for(lambda: cache.stats().misses == 2)
    h.invalidate(cache, 2)
    assert h.get(cache, 2) == "single2"  # not joined to the batch any more
    gate.set()
    assert many.result(WAIT) == {1: "b1", 2: "b2"}
    assert h.get(cache, 1) == "b1"
    assert h.get(cache, 2) == "single2"


def test_the_leader_checks_the_cache_again_before_loading(h: Harness, clock: FakeClock) -> None:
    """A caller that missed, then lost the race to a load that finished meanwhile,
    must not load a second time (groupcache's re-check inside the flight)."""
    release = threading.Event()
    paused = threading.Event()
    rec = Recorder()
    if h.is_async:

        class LateAsyncGroup(AsyncGroup[Any, Any]):
            async def do(self, key: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
                if not paused.is_set():
                    paused.set()
                    await asyncio.to_thread(release.wait, WAIT)
                return await super().do(key, fn, *args, **kwargs)

        group: Any = h.run(LateAsyncGroup)
    else:

        class LateGroup(Group[Any, Any]):
            def do(self, key: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
                if not paused.is_set():
                    paused.set()
                    release.wait(WAIT)
                return super().do(key, fn, *args, **kwargs)

        group = LateGroup()
    cache = h.make(rec, ttl=10.0, clock=clock, group=group)
    late = h.start(cache, "get", 1)  # misses, then stalls on its way into the group
    assert paused.wait(WAIT)
    assert h.get(cache, 1) == "v1"  # another caller loads and writes meanwhile
    release.set()
    assert late.result(WAIT) == "v1"
    assert rec.calls == [1]


# -- closing ----------------------------------------------------------------------------------


def test_after_close_entries_past_their_lifetime_load_in_the_caller(
    h: Harness, clock: FakeClock
) -> None:
    rec = Recorder()
    cache = h.make(rec, ttl=10.0, jitter=0.0, stale=100.0, clock=clock)
    h.get(cache, 1)
    h.close(cache)
    h.close(cache)  # idempotent
    rec.fn = lambda key: "new"
    clock.advance(11.0)
    assert h.get(cache, 1) == "new"  # no stale serving without background refreshes
    assert cache.stats().stale_served == 0


def test_context_manager_closes(h: Harness, clock: FakeClock) -> None:
    cache = h.make(Recorder(), ttl=1.0, clock=clock)
    if h.is_async:

        async def use() -> bool:
            async with cache as same:
                assert same is cache
            return bool(cache._closed)

        assert h.call(use())
    else:
        with cache as same:
            assert same is cache
        assert cache._closed


def test_stats_is_a_snapshot_with_every_counter(h: Harness, clock: FakeClock) -> None:
    cache = h.make(Recorder(), clock=clock)
    stats = cache.stats()
    assert stats.hit_ratio == 0.0
    assert set(type(stats).__dataclass_fields__) == {
        "hits",
        "misses",
        "loads",
        "load_failures",
        "stale_served",
        "refreshes",
        "early_refreshes",
        "evictions",
        "size",
        "l2_hits",
        "l2_misses",
        "fleet_refreshes",
        "invalidations_sent",
        "invalidations_received",
        "l1_drops",
        "calls",
        "flights",
        "joins",
        "shared",
        "errors",
        "aborted",
        "timeouts",
        "rejected",
        "in_flight",
        "wait_seconds",
    }
    with pytest.raises(AttributeError):
        stats.hits = 3  # type: ignore[misc]


def test_stats_carry_the_group_counters_of_its_loads(h: Harness, clock: FakeClock) -> None:
    """calls = reads; flights, joins, shared, errors, in_flight, wait_seconds: its group's."""
    rec = Recorder()
    gate = rec.hold()
    cache = h.make(rec, ttl=10.0, clock=clock)
    readers = [h.start(cache, "get", 1) for _ in range(4)]
    rec.wait_calls(1)
    wait_for(lambda: cache.stats().misses == 4 and cache.stats().joins == 3)
    during = cache.stats()
    assert (during.in_flight, during.flights, during.calls) == (1, 1, 4)
    time.sleep(0.02)
    gate.set()
    assert [r.result(WAIT) for r in readers] == ["v1"] * 4
    assert h.get(cache, 1) == "v1"  # a hit: a read, not a group call
    stats = cache.stats()
    assert (stats.calls, stats.hits, stats.misses) == (5, 1, 4)
    assert (stats.flights, stats.joins, stats.shared, stats.in_flight) == (1, 3, 1, 0)
    assert stats.errors == stats.aborted == 0
    assert stats.wait_seconds >= 3 * 0.02  # three joiners waited at least that long

    def fail(key: int) -> str:
        raise ValueError("down")

    rec.fn = fail
    rec.let_through()
    with pytest.raises(ValueError, match="down"):
        h.get(cache, 2)
    after = cache.stats()
    assert (after.errors, after.flights, after.calls, after.load_failures) == (1, 2, 6, 1)


def test_a_leader_interrupted_by_a_base_exception_does_not_poison_the_key(
    h: Harness, clock: FakeClock
) -> None:
    class Stop(BaseException):
        pass

    def load(key: int) -> str:
        raise Stop()

    rec = Recorder(load)
    gate = rec.hold()
    cache = h.make(rec, ttl=10.0, clock=clock)
    leader = h.start(cache, "get", 1)
    rec.wait_calls(1)
    waiter = h.start(cache, "get", 1)
    wait_for(lambda: cache.stats().misses == 2)
    gate.set()
    with pytest.raises(BaseException) as info:
        leader.result(WAIT)
    assert isinstance(info.value, Stop | AbortedError)
    with pytest.raises(AbortedError):
        waiter.result(WAIT)
    rec.fn = lambda key: "ok"
    rec.let_through()
    assert h.get(cache, 1) == "ok"
    assert cache.stats().load_failures == 0  # an interruption is not a load failure


# -- LoadingCache only: threads ------------------------------------------------------------

from singleflight import LoadingCache  # noqa: E402


def _refresh_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("singleflight-refresh")]


def test_threads_released_together_share_one_load(clock: FakeClock) -> None:
    rec = Recorder()
    cache = LoadingCache(rec, ttl=10.0, clock=clock)
    barrier = threading.Barrier(100)
    results: list[str] = []

    def caller() -> None:
        barrier.wait(WAIT)
        results.append(cache.get(1))

    threads = [threading.Thread(target=caller) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert results == ["v1"] * 100
    assert rec.calls == [1]


def test_close_waits_for_a_running_refresh_and_leaves_no_threads(clock: FakeClock) -> None:
    rec = Recorder()
    cache = LoadingCache(rec, ttl=10.0, jitter=0.0, stale=10.0, clock=clock, refresh_workers=2)
    for key in range(5):
        cache.get(key)
    gate = rec.hold()
    clock.advance(11.0)
    for key in range(5):
        assert cache.get(key) == f"v{key}"
    rec.wait_calls(5 + 2)  # two refreshes run (two workers); three wait in the queue
    assert len(_refresh_threads()) == 2
    closer = threading.Thread(target=cache.close)
    closer.start()
    time.sleep(0.05)
    assert closer.is_alive()  # close() waits for the running refreshes...
    gate.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert len(rec.calls) == 7  # ...and drops the queued ones
    assert _refresh_threads() == []


def test_refresh_workers_bound_the_refresh_threads(clock: FakeClock) -> None:
    rec = Recorder()
    with LoadingCache(rec, ttl=1.0, jitter=0.0, stale=10.0, clock=clock, refresh_workers=3) as c:
        for key in range(10):
            c.get(key)
        gate = rec.hold()
        clock.advance(2.0)
        for key in range(10):
            c.get(key)
        rec.wait_calls(13)
        time.sleep(0.02)
        assert len(_refresh_threads()) == 3
        gate.set()
        wait_for(lambda: len(rec.calls) == 20)
    assert _refresh_threads() == []


def test_a_cache_that_never_refreshes_starts_no_thread(clock: FakeClock) -> None:
    before = threading.active_count()
    cache = LoadingCache(Recorder(), ttl=1.0, clock=clock)
    cache.get(1)
    assert threading.active_count() == before
    cache.close()


def test_hits_are_counted_exactly_under_threads(clock: FakeClock) -> None:
    cache = LoadingCache(Recorder(), clock=clock)
    cache.get(1)
    barrier = threading.Barrier(8)

    def reader() -> None:
        barrier.wait(WAIT)
        for _ in range(20_000):
            cache.get(1)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 4)
    assert cache.stats().hits == 8 * 20_000


def test_stress_many_threads_small_cache_expiring_keys() -> None:
    """Reads, loads, evictions, refreshes and invalidations racing: every answer is right."""
    clock = FakeClock()

    def load(key: int) -> tuple[int, str]:
        return (key, "ok")

    cache = LoadingCache(
        load, ttl=0.05, stale=0.05, early_refresh=1.0, maxsize=20, clock=clock, refresh_workers=2
    )
    stop = threading.Event()
    errors: list[BaseException] = []

    def ticker() -> None:
        while not stop.is_set():
            clock.advance(0.001)
            time.sleep(0.0005)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(3000):
                key = rng.randrange(50)
                op = rng.random()
                if op < 0.9:
                    assert cache.get(key) == (key, "ok")
                elif op < 0.95:
                    got = cache.get_many([key, (key + 1) % 50])
                    assert got == {key: (key, "ok"), (key + 1) % 50: ((key + 1) % 50, "ok")}
                elif op < 0.99:
                    cache.invalidate(key)
                else:
                    assert cache.refresh(key) == (key, "ok")
                assert len(cache) <= 20
        except BaseException as exc:
            errors.append(exc)

    tick = threading.Thread(target=ticker)
    tick.start()
    workers = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(20)
    stop.set()
    tick.join(WAIT)
    cache.close()
    assert errors == []
    assert len(cache) <= 20
    assert not any(t.is_alive() for t in workers)


def test_loading_cache_refuses_async_loaders_and_groups() -> None:
    async def aload(key: int) -> int:
        return key

    with pytest.raises(TypeError, match="async function; LoadingCache calls it from threads"):
        LoadingCache(aload)
    with pytest.raises(TypeError, match=r"load_many=.* is an async function"):
        LoadingCache(lambda k: k, load_many=aload)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="LoadingCache needs a thread Group"):
        LoadingCache(lambda k: k, group=AsyncGroup())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="group must have a do"):
        LoadingCache(lambda k: k, group=object())  # type: ignore[arg-type]


def test_load_many_asking_for_a_key_of_its_own_batch_is_told_so() -> None:
    holder: list[LoadingCache[int, str]] = []

    def load_many(keys: list[int]) -> dict[int, str]:
        with pytest.raises(RuntimeError, match="a key of its own batch: it would wait"):
            holder[0].get(keys[0])
        with pytest.raises(RuntimeError, match="a key of its own batch"):
            holder[0].get_many([keys[1]])
        return {k: f"b{k}" for k in keys}

    cache = LoadingCache(Recorder(), load_many=load_many)
    holder.append(cache)
    assert cache.get_many([1, 2]) == {1: "b1", 2: "b2"}


# -- bad options, both constructors --------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"load": 3}, TypeError, "load must be callable"),
        ({"load_many": "x"}, TypeError, "load_many must be callable or None"),
        ({"maxsize": 0}, ValueError, "maxsize must be at least 1"),
        ({"maxsize": 2.5}, TypeError, r"maxsize must be an int \(or None for no bound\)"),
        ({"maxsize": True}, TypeError, "maxsize must be an int"),
        ({"clock": 5}, TypeError, "clock must be callable"),
        ({"clock": lambda: "now"}, TypeError, r"clock\(\) must return a number of seconds"),
        ({"ttl": -5}, ValueError, "ttl must be > 0 seconds"),
        ({"stale": 3}, ValueError, "stale= only applies to entries that expire"),
        ({"negative": KeyError}, ValueError, "give negative_ttl= too"),
        ({"random": None}, TypeError, "random must be callable"),
    ],
)
def test_bad_options_fail_where_the_cache_is_made(
    kind: str, options: dict[str, Any], error: type[Exception], match: str
) -> None:
    from singleflight import AsyncLoadingCache

    async def aload(key: int) -> int:
        return key

    cls: Any = LoadingCache if kind == "sync" else AsyncLoadingCache
    options = dict(options)
    load = options.pop("load", (lambda key: key) if kind == "sync" else aload)
    with pytest.raises(error, match=match):
        cls(load, **options)


def test_refresh_workers_must_be_a_positive_int() -> None:
    with pytest.raises(ValueError, match="refresh_workers must be at least 1"):
        LoadingCache(lambda k: k, refresh_workers=0)
    with pytest.raises(TypeError, match="refresh_workers must be an int"):
        LoadingCache(lambda k: k, refresh_workers=2.0)  # type: ignore[arg-type]


def test_contains_len_and_repr_do_not_count_as_reads(h: Harness, clock: FakeClock) -> None:
    cache = h.make(Recorder(), ttl=5.0, jitter=0.0, clock=clock)
    h.get(cache, 1)
    assert 1 in cache and 2 not in cache and len(cache) == 1
    assert "size=1" in repr(cache)
    clock.advance(5.0)
    assert 1 not in cache and len(cache) == 1  # expired, not yet dropped
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (0, 1)
    h.close(cache)
    assert "closed" in repr(cache)


def test_get_many_reads_an_iterator_once(h: Harness) -> None:
    cache = h.make(Recorder())
    assert h.get_many(cache, iter([2, 1, 2])) == {2: "v2", 1: "v1"}
    with pytest.raises(TypeError, match="cache keys must be hashable; got list"):
        h.get_many(cache, (k for k in [3, [4]]))
