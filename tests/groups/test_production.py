"""Production features of both groups: stats(), on_event, max_flights, timeout, loader_timeout.

Every check runs against `Group` (real threads) and `AsyncGroup` (real tasks, one
``asyncio.run`` per test).  Overlap between callers is made deterministic with gates
(events the test opens), plus, for threads, one white-box helper (:func:`wait_joined`)
that reads the group's private table, because a blocked ``do`` cannot say it has joined.

Every wait is bounded: threads are joined with a timeout and asserted finished, asyncio
work runs under ``asyncio.timeout``, and each test has a pytest-timeout.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from time import perf_counter
from typing import Any

import pytest

from singleflight import (
    AbortedError,
    AsyncGroup,
    AsyncLoadingCache,
    Group,
    GroupStats,
    LoadingCache,
    Result,
    TooManyFlightsError,
    WaitTimeoutError,
)
from singleflight.events import (
    Event,
    FlightAborted,
    FlightFailed,
    FlightFinished,
    FlightStarted,
    Joined,
    Rejected,
    TimedOut,
)

from .._support import (
    WAIT,
    AsyncLoader,
    Boom,
    CallThread,
    Loader,
    Stop,
    Token,
    never_called,
    no_unretrieved_exceptions,  # noqa: F401  (a fixture)
    run,
    same_error,
    spin,
    wait_for,
    wait_joined,
)

pytestmark = [pytest.mark.timeout(10), pytest.mark.usefixtures("no_unretrieved_exceptions")]
EAGER = sys.version_info >= (3, 12)  # AsyncGroup loader tasks start eagerly
PARK = 0.1  # how long joiners are kept parked when wait_seconds is measured
END_EVENTS = (FlightFinished, FlightFailed, FlightAborted)


# -- helpers shared by both drivers -------------------------------------------------------


class Recorder:
    """An on_event hook that keeps every event; safe from any thread."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def of(self, *types: type) -> list[Any]:
        with self._cond:
            return [e for e in self.events if isinstance(e, types)]

    def for_key(self, key: object) -> list[Any]:
        with self._cond:
            return [e for e in self.events if getattr(e, "key", None) == key]

    def kinds(self, key: object) -> list[type]:
        return [type(e) for e in self.for_key(key)]

    def wait_for(self, kind: type, n: int, key: object = None, timeout: float = WAIT) -> None:
        """Block (threads only) until ``n`` events of ``kind`` (for ``key``) were delivered."""

        def enough() -> bool:
            found = [e for e in self.events if isinstance(e, kind)]
            if key is not None:
                found = [e for e in found if e.key == key]
            return len(found) >= n

        with self._cond:
            assert self._cond.wait_for(enough, timeout), f"{n} {kind.__name__} never came"


def fresh_stats() -> GroupStats:
    return GroupStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0)


def counters(s: GroupStats) -> dict[str, int]:
    """Every integer field of a GroupStats (wait_seconds is checked separately)."""
    return {
        "calls": s.calls,
        "flights": s.flights,
        "joins": s.joins,
        "shared": s.shared,
        "errors": s.errors,
        "aborted": s.aborted,
        "timeouts": s.timeouts,
        "rejected": s.rejected,
        "in_flight": s.in_flight,
    }


def assert_balanced(rec: Recorder) -> None:
    """Each FlightStarted has exactly one end event with its flight id, and vice versa."""
    started = [e.flight for e in rec.of(FlightStarted)]
    ended = [e.flight for e in rec.of(*END_EVENTS)]
    assert sorted(started) == sorted(ended), rec.events


# -- thread helpers ----------------------------------------------------------------------


def wait_slot_waiters(g: Group[Any, Any], n: int, timeout: float = WAIT) -> None:
    """Wait until ``n`` callers are parked for a free slot (white-box: ``Group._slot_waiters``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with g._lock:
            if g._slot_waiters >= n:
                return
        time.sleep(0.0005)
    raise AssertionError(f"{n} callers expected to wait for a slot")


# -- asyncio helpers ---------------------------------------------------------------------


async def spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Start a caller's task and run it up to its first suspension."""
    task = asyncio.create_task(coro)
    await spin(2)
    return task


async def settle(*aws: asyncio.Future[Any]) -> None:
    """Wait (bounded) for every future or task."""
    _, pending = await asyncio.wait(aws, timeout=WAIT)
    assert not pending, f"{len(pending)} calls still pending after {WAIT}s"


# Options that switch each group to its general path without changing outcomes of a
# workload that never hits a limit or a timeout.
THREAD_OPTIONS: dict[str, dict[str, Any]] = {
    "fast-path": {},
    "on_event": {"on_event": Recorder()},
    "max_flights": {"max_flights": 8},
    "timeout": {"timeout": WAIT},
    "all": {
        "name": "all",
        "on_event": Recorder(),
        "max_flights": 8,
        "on_limit": "wait",
        "timeout": WAIT,
    },
}
ASYNC_OPTIONS: dict[str, dict[str, Any]] = {
    **THREAD_OPTIONS,
    "loader_timeout": {"loader_timeout": WAIT},
    "all": {**THREAD_OPTIONS["all"], "loader_timeout": WAIT, "cancel_orphaned": True},
}


def make_options(options: dict[str, Any]) -> dict[str, Any]:
    """A copy with a fresh Recorder, so parametrized runs never share one."""
    return {k: Recorder() if k == "on_event" else v for k, v in options.items()}


# -- stats(): exact counters after a known workload -----------------------------------


@pytest.mark.parametrize("options", THREAD_OPTIONS.values(), ids=THREAD_OPTIONS.keys())
def test_thread_stats_exact_after_known_workload(options: dict[str, Any]) -> None:
    """A (1 leader + 9 parked joiners), B (lone), C (fails, 2 callers), D (aborted, 2 callers)."""
    g: Group[str, Token] = Group(**make_options(options))
    assert g.stats() == fresh_stats()
    assert g.stats().coalesced_ratio == 0.0

    # A: joiners parked for PARK seconds; their waits are what wait_seconds sums.
    gate = threading.Event()
    a = Loader(name="a", gate=gate)
    t_a = perf_counter()
    leader = CallThread(g.do, "A", a)
    a.wait_started()
    joiners = [CallThread(g.do, "A", never_called) for _ in range(9)]
    wait_joined(g, "A", 9)
    parked = g.stats()
    assert counters(parked) == {
        **counters(fresh_stats()),
        **{"calls": 10, "flights": 1, "joins": 9, "shared": 1, "in_flight": 1},
    }
    time.sleep(PARK)
    gate.set()
    assert all(t.result() is a.value for t in [leader, *joiners])
    a_elapsed = perf_counter() - t_a
    after_a = g.stats()
    assert after_a.in_flight == 0
    # Each joiner waited at least PARK (joined before the sleep, released after it) and
    # at most the whole phase.
    assert 9 * PARK * 0.99 <= after_a.wait_seconds <= 9 * a_elapsed

    # B: a lone call.
    b = Loader(name="b")
    assert g.do("B", b) is b.value

    # C: a failing flight with 2 callers.
    c_gate = threading.Event()
    boom = Boom("c")
    c = Loader(name="c", gate=c_gate, raises=boom)
    c_leader = CallThread(g.do, "C", c)
    c.wait_started()
    c_joiner = CallThread(g.do, "C", never_called)
    wait_joined(g, "C", 1)
    c_gate.set()
    assert c_leader.exception() is boom and same_error(c_joiner.exception(), boom)

    # D: the leader's loader raises KeyboardInterrupt in a thread of ours, caught there.
    d_gate = threading.Event()
    interrupt = KeyboardInterrupt()
    d = Loader(name="d", gate=d_gate, raises=interrupt)
    d_leader = CallThread(g.do, "D", d)
    d.wait_started()
    d_joiner = CallThread(g.do, "D", never_called)
    wait_joined(g, "D", 1)
    d_gate.set()
    leader_error = d_leader.exception()
    if "timeout" in options:  # the loader ran on a worker: the leader waited like a joiner
        assert isinstance(leader_error, AbortedError) and leader_error.__cause__ is interrupt
    else:
        assert leader_error is interrupt
    joiner_error = d_joiner.exception()
    assert isinstance(joiner_error, AbortedError) and joiner_error.__cause__ is interrupt

    s = g.stats()
    assert counters(s) == {
        "calls": 15,
        "flights": 4,
        "joins": 11,
        "shared": 3,
        "errors": 1,
        "aborted": 1,
        "timeouts": 0,
        "rejected": 0,
        "in_flight": 0,
    }
    assert s.calls == s.flights + s.joins
    assert s.coalesced_ratio == pytest.approx(11 / 15)
    assert s.wait_seconds >= after_a.wait_seconds
    assert len(g) == 0


@pytest.mark.parametrize("options", ASYNC_OPTIONS.values(), ids=ASYNC_OPTIONS.keys())
def test_async_stats_exact_after_known_workload(options: dict[str, Any]) -> None:
    """A..D as for threads, plus eager flights: E (returns at once), F (fails), G (aborts)."""
    g: AsyncGroup[str, Token] = AsyncGroup(**make_options(options))
    assert g.stats() == fresh_stats()

    async def main() -> None:
        # A: 1 leader + 9 joiners parked for PARK seconds.
        gate = asyncio.Event()
        a = AsyncLoader(name="a", gate=gate)
        t_a = perf_counter()
        leader = await spawn(g.do("A", a))
        joiners = [await spawn(g.do("A", never_called)) for _ in range(9)]
        parked = g.stats()
        assert counters(parked) == {
            **counters(fresh_stats()),
            **{"calls": 10, "flights": 1, "joins": 9, "shared": 1, "in_flight": 1},
        }
        await asyncio.sleep(PARK)
        gate.set()
        await settle(leader, *joiners)
        assert all(t.result() is a.value for t in [leader, *joiners])
        a_elapsed = perf_counter() - t_a
        after_a = g.stats()
        assert after_a.in_flight == 0
        assert 9 * PARK * 0.99 <= after_a.wait_seconds <= 9 * a_elapsed

        # B: a lone call that suspends.
        b = AsyncLoader(name="b")
        assert await g.do("B", b) is b.value

        # C: a failing flight with 2 callers.
        c_gate = asyncio.Event()
        boom = Boom("c")
        c_calls = [
            await spawn(g.do("C", AsyncLoader(name="c", gate=c_gate, raises=boom))),
            await spawn(g.do("C", never_called)),
        ]
        c_gate.set()
        await settle(*c_calls)
        assert all(same_error(t.exception(), boom) for t in c_calls)

        # D: the loader task cancels itself; both callers get AbortedError.
        d_gate = asyncio.Event()
        d_calls = [
            await spawn(g.do("D", AsyncLoader(name="d", gate=d_gate, self_cancel=True))),
            await spawn(g.do("D", never_called)),
        ]
        d_gate.set()
        await settle(*d_calls)
        assert all(isinstance(t.exception(), AbortedError) for t in d_calls)

        # E, F, G: loaders that never suspend (eager flights on 3.12+).
        e = AsyncLoader(name="e", suspend=False)
        assert await g.do("E", e) is e.value
        boom_f = Boom("f")
        with pytest.raises(Boom) as info:
            await g.do("F", AsyncLoader(name="f", suspend=False, raises=boom_f))
        assert info.value is boom_f
        with pytest.raises(AbortedError):
            await g.do("G", AsyncLoader(name="g", suspend=False, raises=Stop()))

        s = g.stats()
        assert counters(s) == {
            "calls": 18,
            "flights": 7,
            "joins": 11,
            "shared": 3,
            "errors": 2,
            "aborted": 2,
            "timeouts": 0,
            "rejected": 0,
            "in_flight": 0,
        }
        assert s.calls == s.flights + s.joins
        assert s.coalesced_ratio == pytest.approx(11 / 18)
        assert s.wait_seconds >= after_a.wait_seconds
        assert len(g) == 0

    run(main())


@pytest.mark.parametrize("options", [{}, {"on_event": Recorder()}], ids=["fast-path", "on_event"])
def test_async_stats_sum_over_two_loops_run_one_after_the_other(options: dict[str, Any]) -> None:
    """stats() counts "since the group was made": a loop ending must not take its counts along."""
    g: AsyncGroup[str, Token] = AsyncGroup(**make_options(options))

    async def workload(tag: str) -> GroupStats:
        gate = asyncio.Event()
        calls = [await spawn(g.do("k", AsyncLoader(name=tag, gate=gate)))]
        calls += [await spawn(g.do("k", never_called)) for _ in range(2)]
        gate.set()
        await settle(*calls)
        # An eager success and an eager failure.
        await g.do("e", AsyncLoader(name=tag, suspend=False))
        with pytest.raises(Boom):
            await g.do("f", AsyncLoader(name=tag, suspend=False, raises=Boom()))
        return g.stats()

    in_first = run(workload("first"))
    assert counters(in_first) == {
        **counters(fresh_stats()),
        **{"calls": 5, "flights": 3, "joins": 2, "shared": 1, "errors": 1},
    }
    after_first = g.stats()  # outside any loop, the first one closed by asyncio.run
    assert counters(after_first) == counters(in_first), "counters of a finished loop were lost"
    in_second = run(workload("second"))
    assert counters(in_second) == {
        **counters(fresh_stats()),
        **{"calls": 10, "flights": 6, "joins": 4, "shared": 2, "errors": 2},
    }
    total = g.stats()
    assert counters(total) == counters(in_second)
    assert total.wait_seconds >= in_first.wait_seconds > 0


def test_async_stats_sum_over_two_live_loops_in_threads() -> None:
    """Two loops open at once (one per thread): stats() is their sum, in_flight included."""
    g: AsyncGroup[str, Token] = AsyncGroup()
    parked = threading.Barrier(3, timeout=WAIT)
    release = threading.Event()
    seen: list[GroupStats] = []

    def loop_thread(tag: str) -> None:
        async def main() -> None:
            gate = asyncio.Event()
            leader = await spawn(g.do("k", AsyncLoader(name=tag, gate=gate)))
            joiner = await spawn(g.do("k", never_called))
            await asyncio.to_thread(parked.wait)
            await asyncio.to_thread(release.wait, WAIT)
            gate.set()
            await settle(leader, joiner)
            assert joiner.result() is leader.result()
            await asyncio.to_thread(parked.wait)  # both loops done, neither closed yet
            if tag == "one":
                seen.append(g.stats())
            await asyncio.to_thread(parked.wait)

        run(main())

    threads = [CallThread(loop_thread, tag) for tag in ("one", "two")]
    parked.wait()
    both_open = g.stats()
    assert counters(both_open) == {
        **counters(fresh_stats()),
        **{"calls": 4, "flights": 2, "joins": 2, "shared": 2, "in_flight": 2},
    }
    release.set()
    parked.wait()
    parked.wait()
    for t in threads:
        t.result()
    assert counters(seen[0]) == {**counters(both_open), "in_flight": 0}


# -- on_event: the events of a flight --------------------------------------------------


def test_thread_events_of_finished_failed_and_aborted_flights() -> None:
    rec = Recorder()
    g: Group[str, Token] = Group(name="users", on_event=rec)

    # A finished flight with 3 joiners; the loader sleeps 0.05 s after its gate.
    gate = threading.Event()
    ok = Loader(name="ok", gate=gate, sleep=0.05)
    leader = CallThread(g.do, "ok", ok)
    ok.wait_started()
    joiners = [CallThread(g.do, "ok", never_called) for _ in range(3)]
    rec.wait_for(Joined, 3, "ok")  # each Joined is delivered after its lock is released
    gate.set()
    assert all(t.result() is ok.value for t in [leader, *joiners])
    events = rec.for_key("ok")
    assert [type(e) for e in events] == [FlightStarted, Joined, Joined, Joined, FlightFinished]
    assert len({e.flight for e in events}) == 1
    assert all(e.group == "users" for e in events)
    end = events[-1]
    assert end.callers == 4 and end.duration >= 0.05

    # A failing flight with one joiner: FlightFailed carries the very error object.
    boom = Boom("bad")
    bad_gate = threading.Event()
    bad = Loader(name="bad", gate=bad_gate, raises=boom)
    bad_leader = CallThread(g.do, "bad", bad)
    bad.wait_started()
    bad_joiner = CallThread(g.do_result, "bad", never_called)
    rec.wait_for(Joined, 1, "bad")
    bad_gate.set()
    assert bad_leader.exception() is boom
    assert same_error(bad_joiner.result().error, boom)
    events = rec.for_key("bad")
    assert [type(e) for e in events] == [FlightStarted, Joined, FlightFailed]
    assert events[-1].error is boom and events[-1].callers == 2
    assert len({e.flight for e in events}) == 1

    # An aborted flight: KeyboardInterrupt in the leader's thread.
    interrupt = KeyboardInterrupt()
    ab_gate = threading.Event()
    ab = Loader(name="abort", gate=ab_gate, raises=interrupt)
    ab_leader = CallThread(g.do, "abort", ab)
    ab.wait_started()
    ab_joiner = CallThread(g.do, "abort", never_called)
    rec.wait_for(Joined, 1, "abort")
    ab_gate.set()
    assert ab_leader.exception() is interrupt
    assert isinstance(ab_joiner.exception(), AbortedError)
    events = rec.for_key("abort")
    assert [type(e) for e in events] == [FlightStarted, Joined, FlightAborted]
    assert events[-1].cause is interrupt and events[-1].callers == 2
    assert len({e.flight for e in events}) == 1
    assert all(e.group == "users" for e in rec.events)
    assert_balanced(rec)


def test_thread_event_flight_ids_differ_between_open_flights() -> None:
    rec = Recorder()
    g: Group[str, Token] = Group(on_event=rec)
    gate = threading.Event()
    loaders = {k: Loader(name=k, gate=gate) for k in ("x", "y")}
    leaders = [CallThread(g.do, k, fn) for k, fn in loaders.items()]
    for fn in loaders.values():
        fn.wait_started()
    futures = [g.do_future(k, never_called) for k in loaders]  # joins via do_future
    gate.set()
    for t in leaders:
        t.result()
    assert [f.result(WAIT) for f in futures] == [loaders["x"].value, loaders["y"].value]
    ids = {k: {e.flight for e in rec.for_key(k)} for k in loaders}
    assert all(len(v) == 1 for v in ids.values())
    assert ids["x"] != ids["y"]
    for k in loaders:
        assert rec.kinds(k) == [FlightStarted, Joined, FlightFinished]
        assert rec.for_key(k)[-1].callers == 2


def test_async_events_of_finished_failed_aborted_and_eager_flights() -> None:
    rec = Recorder()
    g: AsyncGroup[str, Token] = AsyncGroup(name="users", on_event=rec)

    async def main() -> None:
        gate = asyncio.Event()
        ok = AsyncLoader(name="ok", gate=gate, sleep=0.05)
        calls = [await spawn(g.do("ok", ok))]
        calls += [await spawn(g.do("ok", never_called)) for _ in range(2)]
        calls.append(g.do_future("ok", never_called))
        gate.set()
        await settle(*calls)
        assert all(c.result() is ok.value for c in calls)
        events = rec.for_key("ok")
        assert [type(e) for e in events] == [FlightStarted, Joined, Joined, Joined, FlightFinished]
        assert len({e.flight for e in events}) == 1
        assert events[-1].callers == 4 and events[-1].duration >= 0.05

        boom = Boom("bad")
        bad_gate = asyncio.Event()
        bad = [
            await spawn(g.do("bad", AsyncLoader(name="bad", gate=bad_gate, raises=boom))),
            await spawn(g.do_result("bad", never_called)),
        ]
        bad_gate.set()
        await settle(*bad)
        assert bad[0].exception() is boom and same_error(bad[1].result().error, boom)
        events = rec.for_key("bad")
        assert [type(e) for e in events] == [FlightStarted, Joined, FlightFailed]
        assert events[-1].error is boom and events[-1].callers == 2
        assert len({e.flight for e in events}) == 1

        ab_gate = asyncio.Event()
        ab = [
            await spawn(g.do("abort", AsyncLoader(name="abort", gate=ab_gate, self_cancel=True))),
            await spawn(g.do("abort", never_called)),
        ]
        ab_gate.set()
        await settle(*ab)
        assert all(isinstance(t.exception(), AbortedError) for t in ab)
        events = rec.for_key("abort")
        assert [type(e) for e in events] == [FlightStarted, Joined, FlightAborted]
        assert events[-1].callers == 2
        assert len({e.flight for e in events}) == 1

        # Flights that never suspend: on 3.12+ no record is made, the events still come.
        eager = AsyncLoader(name="eager", suspend=False)
        fut = g.do_future("eager", eager)
        if EAGER:
            assert fut.done() and "eager" not in g
        assert await fut is eager.value
        events = rec.for_key("eager")
        assert [type(e) for e in events] == [FlightStarted, FlightFinished]
        assert events[-1].callers == 1 and events[0].flight == events[-1].flight

        eager_boom = Boom("eager")
        with pytest.raises(Boom):
            await g.do("eager-bad", AsyncLoader(name="eb", suspend=False, raises=eager_boom))
        events = rec.for_key("eager-bad")
        assert [type(e) for e in events] == [FlightStarted, FlightFailed]
        assert events[-1].error is eager_boom and events[-1].callers == 1

        with pytest.raises(AbortedError):
            await g.do("eager-abort", AsyncLoader(name="ea", suspend=False, raises=Stop()))
        assert rec.kinds("eager-abort") == [FlightStarted, FlightAborted]

        # Ids: distinct between flights open at once, and between the flights above.
        x_gate = asyncio.Event()
        xs = [await spawn(g.do(k, AsyncLoader(name=k, gate=x_gate))) for k in ("x", "y")]
        x_gate.set()
        await settle(*xs)
        ends = rec.of(*END_EVENTS)
        assert len({e.flight for e in ends}) == len(ends) == 8
        assert all(e.group == "users" for e in rec.events)
        assert_balanced(rec)

    run(main())


def test_thread_hook_that_raises_is_logged_and_calls_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def hook(event: Event) -> None:
        raise RuntimeError("exporter down")

    g: Group[str, Token] = Group(on_event=hook)
    caplog.set_level(logging.ERROR, logger="singleflight")
    gate = threading.Event()
    loader = Loader(name="v", gate=gate)
    leader = CallThread(g.do, "k", loader)
    loader.wait_started()
    joiner = CallThread(g.do_result, "k", never_called)
    wait_joined(g, "k", 1)
    gate.set()
    assert leader.result() is loader.value
    assert joiner.result() == Result(loader.value, None, True)
    records = [r for r in caplog.records if r.name == "singleflight"]
    assert len(records) == 3  # FlightStarted, Joined, FlightFinished
    assert all("on_event hook raised" in r.getMessage() for r in records)
    assert all(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in records)
    assert len(g) == 0 and g.stats().flights == 1


def test_async_hook_that_raises_is_logged_and_calls_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def hook(event: Event) -> None:
        raise RuntimeError("exporter down")

    g: AsyncGroup[str, Token] = AsyncGroup(on_event=hook)
    caplog.set_level(logging.ERROR, logger="singleflight")

    async def main() -> None:
        gate = asyncio.Event()
        loader = AsyncLoader(name="v", gate=gate)
        calls = [await spawn(g.do("k", loader)), await spawn(g.do_result("k", never_called))]
        gate.set()
        await settle(*calls)
        assert calls[0].result() is loader.value
        assert calls[1].result() == Result(loader.value, None, True)
        eager = AsyncLoader(name="e", suspend=False)
        assert await g.do("e", eager) is eager.value

    run(main())
    records = [r for r in caplog.records if r.name == "singleflight"]
    assert len(records) == 5  # FlightStarted, Joined, FlightFinished; eager: Started, Finished
    assert all("on_event hook raised" in r.getMessage() for r in records)
    assert len(g) == 0


# -- max_flights ----------------------------------------------------------------------


def test_thread_max_flights_raise() -> None:
    rec = Recorder()
    g: Group[str, Token] = Group(name="lim", max_flights=2, on_event=rec)
    gates = {k: threading.Event() for k in ("a", "b")}
    loaders = {k: Loader(name=k, gate=gates[k]) for k in gates}
    leaders = {k: CallThread(g.do, k, loaders[k]) for k in gates}
    for fn in loaders.values():
        fn.wait_started()

    c = Loader(name="c")
    for entry in ("do", "do_result", "do_future"):
        t0 = time.monotonic()
        with pytest.raises(TooManyFlightsError) as info:
            getattr(g, entry)("c", c)
        assert time.monotonic() - t0 < 1.0  # refused at once, never waits
        err = info.value
        assert err.key == "c" and err.limit == 2
        assert "'c'" in str(err) and "max_flights=2" in str(err)
    assert c.calls == 0 and "c" not in g and len(g) == 2
    s = g.stats()
    assert (s.rejected, s.flights, s.calls, s.in_flight) == (3, 2, 2, 2)
    assert rec.of(Rejected) == [Rejected("lim", "c", 2)] * 3
    assert rec.for_key("c") == rec.of(Rejected)  # nothing else happened for "c"

    # Joins of the open flights are still accepted.
    joiner = CallThread(g.do, "a", never_called)
    joined_future = g.do_future("b", never_called)
    wait_joined(g, "a", 1)
    gates["a"].set()
    assert leaders["a"].result() is loaders["a"].value
    assert joiner.result() is loaders["a"].value
    # A slot is free again: "c" is accepted.
    assert g.do("c", c) is c.value and c.calls == 1
    gates["b"].set()
    assert joined_future.result(WAIT) is loaders["b"].value
    assert leaders["b"].result() is loaders["b"].value
    s = g.stats()
    assert (s.rejected, s.flights, s.joins, s.in_flight) == (3, 3, 2, 0)


def test_thread_max_flights_wait_blocks_until_a_slot_frees() -> None:
    rec = Recorder()
    g: Group[str, Token] = Group(max_flights=1, on_limit="wait", on_event=rec)
    gate = threading.Event()
    a = Loader(name="a", gate=gate)
    a_future = g.do_future("a", a)
    a.wait_started()

    b = Loader(name="b")
    waiter = CallThread(g.do, "b", b)
    c = Loader(name="c")
    t0 = time.monotonic()
    c_future = g.do_future("c", c)  # returns at once, with a future still pending
    assert time.monotonic() - t0 < 1.0 and not c_future.done()
    wait_slot_waiters(g, 2)
    time.sleep(0.05)
    assert waiter.is_alive() and not c_future.done()
    assert b.calls == c.calls == 0 and "b" not in g and "c" not in g
    assert g.stats().rejected == 0 and rec.of(Rejected) == []

    gate.set()
    assert a_future.result(WAIT) is a.value
    assert waiter.result() is b.value
    assert c_future.result(WAIT) is c.value
    assert b.calls == c.calls == 1 and len(g) == 0
    s = g.stats()
    assert (s.flights, s.rejected, s.timeouts) == (3, 0, 0)
    assert_balanced(rec)


def test_thread_do_future_cancelled_while_waiting_for_a_slot_starts_nothing() -> None:
    """Cancelling a do_future() future that waits for a slot ends that wait: no flight starts."""
    rec = Recorder()
    g: Group[str, Token] = Group(max_flights=1, on_limit="wait", on_event=rec)
    gate = threading.Event()
    a = Loader(name="a", gate=gate)
    a_future = g.do_future("a", a)
    a.wait_started()

    c = Loader(name="c")
    c_future = g.do_future("c", c)
    wait_slot_waiters(g, 1)
    assert c_future.cancel() and c_future.cancelled()
    wait_for(lambda: g._slot_waiters == 0)  # the waiting thread was woken and gave up

    gate.set()
    assert a_future.result(WAIT) is a.value
    time.sleep(0.05)
    assert c.calls == 0 and "c" not in g and len(g) == 0
    s = g.stats()
    assert (s.flights, s.calls, s.rejected, s.timeouts) == (1, 1, 0, 0)
    assert_balanced(rec)


def test_thread_max_flights_wait_times_out() -> None:
    g: Group[str, Token] = Group(max_flights=1, on_limit="wait", timeout=0.2)
    gate = threading.Event()
    a = Loader(name="a", gate=gate)
    a_future = g.do_future("a", a)  # do_future callers are not bound by timeout
    a.wait_started()
    b = Loader(name="b")
    t0 = time.monotonic()
    with pytest.raises(WaitTimeoutError) as info:
        g.do("b", b)
    waited = time.monotonic() - t0
    assert 0.2 * 0.99 <= waited < 0.2 + 2.0
    assert isinstance(info.value, TimeoutError) and "'b'" in str(info.value)
    assert b.calls == 0 and "b" not in g
    assert g.stats().timeouts == 1
    gate.set()
    assert a_future.result(WAIT) is a.value
    assert g.do("b", b) is b.value


def test_thread_queued_do_future_times_out_at_the_groups_timeout() -> None:
    """A do_future() call queued for a slot gets WaitTimeoutError at its deadline; the one
    queued behind it, cancelled, starts nothing; the flight in progress goes on."""
    g: Group[str, Token] = Group(max_flights=1, on_limit="wait", timeout=0.2)
    gate = threading.Event()
    a = Loader(name="a", gate=gate)
    a_future = g.do_future("a", a)
    a.wait_started()
    b = Loader(name="b")
    b_future = g.do_future("b", b)
    c_future = g.do_future("c", Loader(name="c"))
    assert c_future.cancel()
    with pytest.raises(WaitTimeoutError) as info:
        b_future.result(WAIT)
    assert "'b'" in str(info.value) and b.calls == 0 and "b" not in g
    gate.set()
    assert a_future.result(WAIT) is a.value
    s = g.stats()
    assert (s.timeouts, s.flights, s.in_flight) == (1, 1, 0)
    wait_for(lambda: g._slot_waiters == 0)


def test_thread_max_flights_wait_forget_frees_a_slot() -> None:
    g: Group[str, Token] = Group(max_flights=1, on_limit="wait")
    gate = threading.Event()
    a = Loader(name="a", gate=gate)
    a_future = g.do_future("a", a)
    a.wait_started()
    b = Loader(name="b")
    waiter = CallThread(g.do, "b", b)
    wait_slot_waiters(g, 1)
    g.forget("a")
    assert waiter.result() is b.value  # while a's loader is still held at its gate
    assert not a_future.done()
    gate.set()
    assert a_future.result(WAIT) is a.value  # a forgotten flight still delivers
    assert len(g) == 0


def test_thread_max_flights_wait_parked_callers_of_one_key_share_one_flight() -> None:
    """Two callers of "b" parked for a slot: once one leads "b", the other must join it.

    Joins are never refused; a parked caller left asleep while its key is in flight
    waits for that flight to end and then runs the loader a second time.
    """
    g: Group[str, Token] = Group(max_flights=1, on_limit="wait")
    gate = threading.Event()
    a = Loader(name="a", gate=gate)
    a_future = g.do_future("a", a)
    a.wait_started()
    b_gate = threading.Event()
    b = Loader(name="b", gate=b_gate)
    waiters = [CallThread(g.do, "b", b) for _ in range(2)]
    wait_slot_waiters(g, 2)
    gate.set()
    assert a_future.result(WAIT) is a.value
    b.wait_started()
    time.sleep(0.05)  # time enough for the second caller to join the flight of "b"
    b_gate.set()
    results = [t.result() for t in waiters]
    assert b.calls == 1, f"the loader of 'b' ran {b.calls} times for 2 concurrent callers"
    assert results[0] is results[1]


def test_async_max_flights_raise() -> None:
    rec = Recorder()
    g: AsyncGroup[str, Token] = AsyncGroup(name="lim", max_flights=2, on_event=rec)

    async def main() -> None:
        gates = {k: asyncio.Event() for k in ("a", "b")}
        loaders = {k: AsyncLoader(name=k, gate=gates[k]) for k in gates}
        leaders = {k: await spawn(g.do(k, loaders[k])) for k in gates}
        c = AsyncLoader(name="c")
        for entry in ("do", "do_result"):
            with pytest.raises(TooManyFlightsError) as info:
                await getattr(g, entry)("c", c)
        with pytest.raises(TooManyFlightsError):
            g.do_future("c", c)  # raised at once, not put in the future
        err = info.value
        assert err.key == "c" and err.limit == 2
        assert "'c'" in str(err) and "max_flights=2" in str(err)
        assert c.calls == 0 and "c" not in g and len(g) == 2
        s = g.stats()
        assert (s.rejected, s.flights, s.calls, s.in_flight) == (3, 2, 2, 2)
        assert rec.of(Rejected) == [Rejected("lim", "c", 2)] * 3
        assert rec.for_key("c") == rec.of(Rejected)

        joiner = await spawn(g.do("a", never_called))
        joined_future = g.do_future("b", never_called)
        gates["a"].set()
        await settle(leaders["a"], joiner)
        assert joiner.result() is leaders["a"].result() is loaders["a"].value
        assert await g.do("c", c) is c.value and c.calls == 1
        gates["b"].set()
        await settle(leaders["b"], joined_future)
        assert joined_future.result() is loaders["b"].value
        s = g.stats()
        assert (s.rejected, s.flights, s.joins, s.in_flight) == (3, 3, 2, 0)

    run(main())


def test_async_max_flights_wait_blocks_until_a_slot_frees() -> None:
    rec = Recorder()
    g: AsyncGroup[str, Token] = AsyncGroup(max_flights=1, on_limit="wait", on_event=rec)

    async def main() -> None:
        gate = asyncio.Event()
        a = AsyncLoader(name="a", gate=gate)
        a_call = await spawn(g.do("a", a))
        b = AsyncLoader(name="b")
        waiter = await spawn(g.do("b", b))
        c = AsyncLoader(name="c")
        c_future = g.do_future("c", c)
        assert isinstance(c_future, asyncio.Future) and not c_future.done()
        await asyncio.sleep(0.05)
        assert not waiter.done() and not c_future.done()
        assert b.calls == c.calls == 0 and "b" not in g and "c" not in g
        assert g.stats().rejected == 0 and rec.of(Rejected) == []
        gate.set()
        await settle(a_call, waiter, c_future)
        assert waiter.result() is b.value and c_future.result() is c.value
        assert b.calls == c.calls == 1 and len(g) == 0
        assert (g.stats().flights, g.stats().rejected) == (3, 0)
        assert_balanced(rec)

    run(main())


def test_async_max_flights_wait_times_out() -> None:
    rec = Recorder()
    g: AsyncGroup[str, Token] = AsyncGroup(
        max_flights=1, on_limit="wait", timeout=0.2, on_event=rec
    )

    async def main() -> None:
        gate = asyncio.Event()
        a = AsyncLoader(name="a", gate=gate)
        a_call = await spawn(g.do("a", a))  # times out too; its loader runs on
        b = AsyncLoader(name="b")
        t0 = perf_counter()
        with pytest.raises(WaitTimeoutError) as info:
            await g.do("b", b)
        assert 0.2 * 0.99 <= perf_counter() - t0 < 0.2 + 2.0
        assert isinstance(info.value, TimeoutError) and "'b'" in str(info.value)
        assert b.calls == 0 and "b" not in g and "a" in g
        await settle(a_call)
        assert isinstance(a_call.exception(), WaitTimeoutError)
        assert g.stats().timeouts == 2
        assert [e.key for e in rec.of(TimedOut)] == ["a", "b"]
        gate.set()
        await spin()
        assert "a" not in g
        assert await g.do("b", b) is b.value

    run(main())


def test_async_max_flights_wait_forget_frees_a_slot() -> None:
    g: AsyncGroup[str, Token] = AsyncGroup(max_flights=1, on_limit="wait")

    async def main() -> None:
        gate = asyncio.Event()
        a = AsyncLoader(name="a", gate=gate)
        a_call = await spawn(g.do("a", a))
        b = AsyncLoader(name="b")
        waiter = await spawn(g.do("b", b))
        assert not waiter.done()
        g.forget("a")
        await settle(waiter)
        assert waiter.result() is b.value and not a_call.done()
        gate.set()
        await settle(a_call)
        assert a_call.result() is a.value and len(g) == 0

    run(main())


def test_async_forget_from_another_thread_wakes_a_slot_waiter_in_its_loop() -> None:
    """forget() outside the loop wakes the caller waiting for a slot in the loop's own
    thread: the idle loop is woken, and no future is touched from the wrong thread."""
    g: AsyncGroup[str, Token] = AsyncGroup(max_flights=1, on_limit="wait")
    b_started = threading.Event()
    release: list[Callable[[], None]] = []
    waiting = threading.Event()

    async def main() -> None:
        gate = asyncio.Event()
        loop = asyncio.get_running_loop()

        def release_gate() -> None:  # from the test's thread, if the test fails early
            try:
                loop.call_soon_threadsafe(gate.set)
            except RuntimeError:
                pass  # the loop has ended: nothing to release

        release.append(release_gate)
        a_call = await spawn(g.do("a", AsyncLoader(name="a", gate=gate)))

        async def b() -> str:
            b_started.set()
            return "b"

        waiter = await spawn(g.do("b", b))
        assert not waiter.done()
        waiting.set()
        await settle(waiter)  # the loop sleeps until the forget wakes it
        assert waiter.result() == "b" and not a_call.done()
        gate.set()
        await settle(a_call)

    thread = threading.Thread(target=run, args=(main(),))
    thread.start()
    try:
        assert waiting.wait(WAIT)
        time.sleep(0.05)  # let the loop go idle
        g.forget("a")  # outside any loop
        assert b_started.wait(5), "the slot waiter was not woken"
    finally:
        for wake in release:
            wake()
        thread.join(WAIT)
    assert not thread.is_alive()
    assert len(g) == 0


def test_async_max_flights_wait_do_future_cancelled_leaves_nothing_behind() -> None:
    rec = Recorder()
    g: AsyncGroup[str, Token] = AsyncGroup(max_flights=1, on_limit="wait", on_event=rec)

    async def main() -> None:
        gate = asyncio.Event()
        a = AsyncLoader(name="a", gate=gate)
        a_call = await spawn(g.do("a", a))
        c = AsyncLoader(name="c")
        c_future = g.do_future("c", c)
        await spin()
        assert not c_future.done()
        c_future.cancel()
        await asyncio.wait([c_future], timeout=WAIT)
        assert c_future.cancelled()
        gate.set()
        await settle(a_call)
        await spin()
        assert c.calls == 0 and "c" not in g and len(g) == 0
        assert rec.for_key("c") == []
        s = g.stats()
        assert (s.flights, s.calls, s.rejected, s.timeouts, s.in_flight) == (1, 1, 0, 0, 0)
        assert g._state_here().slot_waiters == []  # white-box: no parked future left over
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(main())


def test_async_max_flights_wait_parked_callers_of_one_key_share_one_flight() -> None:
    """As for threads: two callers of "b" parked for a slot must share one flight of "b"."""
    g: AsyncGroup[str, Token] = AsyncGroup(max_flights=1, on_limit="wait")

    async def main() -> None:
        gate = asyncio.Event()
        a_call = await spawn(g.do("a", AsyncLoader(name="a", gate=gate)))
        b_gate = asyncio.Event()
        b = AsyncLoader(name="b", gate=b_gate)
        waiters = [await spawn(g.do("b", b)) for _ in range(2)]
        gate.set()
        await asyncio.wait_for(b.started.wait(), WAIT)
        await asyncio.sleep(0.05)
        b_gate.set()
        await settle(a_call, *waiters)
        assert b.calls == 1, f"the loader of 'b' ran {b.calls} times for 2 concurrent callers"
        assert waiters[0].result() is waiters[1].result()

    run(main())


def test_async_max_flights_wait_slot_not_lost_when_woken_caller_is_cancelled() -> None:
    """A slot handed to a parked caller that is cancelled in the same tick goes to the next one.

    forget() frees a slot and wakes the first parked caller; that caller is cancelled
    before it runs (as by a request timeout firing in the same loop iteration).  The
    second parked caller must get the slot now, not when the unrelated flight ends.
    """
    g: AsyncGroup[str, Token] = AsyncGroup(max_flights=1, on_limit="wait")

    async def main() -> None:
        gate = asyncio.Event()
        a = AsyncLoader(name="a", gate=gate)
        a_call = await spawn(g.do("a", a))
        b, c = AsyncLoader(name="b"), AsyncLoader(name="c")
        first = await spawn(g.do("b", b))
        second = await spawn(g.do("c", c))
        g.forget("a")  # frees the slot: wakes `first`
        first.cancel()  # ... which is cancelled before it could take it
        done, _ = await asyncio.wait([second], timeout=0.5)
        slot_passed_on = second in done
        gate.set()
        await settle(a_call, first, second)
        assert first.cancelled() and b.calls == 0
        assert second.result() is c.value
        assert slot_passed_on, "the slot freed by forget() was lost with the cancelled caller"

    run(main())


@pytest.mark.parametrize("on_limit", ["raise", "wait"])
def test_async_do_future_usage_errors_raised_at_once_whatever_on_limit(on_limit: str) -> None:
    """do_future raises TypeError for an unhashable key at the call, as do() and Group do."""
    g: AsyncGroup[Any, Token] = AsyncGroup(max_flights=4, on_limit=on_limit)  # type: ignore[arg-type]

    async def main() -> None:
        loader = AsyncLoader(name="u")
        with pytest.raises(TypeError, match="hashable"):
            fut = g.do_future(["list"], loader)
            await asyncio.wait([fut], timeout=WAIT)  # reached only if not raised at once
            fut.exception()
        assert loader.calls == 0 and len(g) == 0

    run(main())


@pytest.mark.parametrize("on_limit", ["raise", "wait"])
@pytest.mark.parametrize("group", ["threads", "asyncio"])
def test_do_future_with_a_free_slot_is_not_bound_by_timeout(group: str, on_limit: str) -> None:
    """A do_future caller waits as long as it likes (Group: always; AsyncGroup: whatever on_limit).

    Its outcome with a slot free must not depend on on_limit, nor differ between the twins.
    """
    if group == "threads":
        tg: Group[str, Token] = Group(timeout=0.1, max_flights=4, on_limit=on_limit)  # type: ignore[arg-type]
        tl = Loader(name="v", sleep=0.3)
        assert tg.do_future("k", tl).result(WAIT) is tl.value
        return
    ag: AsyncGroup[str, Token] = AsyncGroup(timeout=0.1, max_flights=4, on_limit=on_limit)  # type: ignore[arg-type]

    async def main() -> None:
        al = AsyncLoader(name="v", sleep=0.3)
        fut = ag.do_future("k", al)
        await settle(fut)
        assert fut.result() is al.value

    run(main())


# -- timeout= --------------------------------------------------------------------------


@pytest.mark.parametrize("use_pool", [False, True], ids=["own-thread", "executor"])
def test_thread_timeout_callers_leave_flight_goes_on(use_pool: bool) -> None:
    """Leader and a joiner time out; the loader (on a worker thread) runs on for the others."""
    rec = Recorder()
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sfpool") if use_pool else None
    try:
        g: Group[str, Token] = Group(timeout=0.3, on_event=rec, executor=pool)
        gate = threading.Event()
        loader = Loader(name="v", gate=gate)
        leader = CallThread(g.do, "k", loader)
        loader.wait_started()
        joiner = CallThread(g.do, "k", never_called)
        future = g.do_future("k", never_called)  # not bound by timeout
        rec.wait_for(Joined, 2, "k")
        for caller in (leader, joiner):
            err = caller.exception()
            assert isinstance(err, WaitTimeoutError) and isinstance(err, TimeoutError)
            assert "'k'" in str(err) and "timeout=0.3" in str(err)
        # The loader ran on a thread other than the first caller's.
        assert loader.threads[0] is not leader
        if use_pool:
            assert loader.threads[0].name.startswith("sfpool")
        assert "k" in g  # the flight goes on
        late = CallThread(g.do_result, "k", never_called)
        rec.wait_for(Joined, 3, "k")
        gate.set()
        assert late.result() == Result(loader.value, None, True)
        assert future.result(WAIT) is loader.value
        assert loader.calls == 1 and len(g) == 0
        s = g.stats()
        assert (s.timeouts, s.flights, s.joins, s.errors, s.aborted) == (2, 1, 3, 0, 0)
        timed_out = rec.of(TimedOut)
        assert len(timed_out) == 2 and all(e.key == "k" for e in timed_out)
        # waited runs from when the caller began waiting (the loader's thread already
        # started, for the leader), so it may fall a little short of the timeout.
        assert all(0.3 - 0.1 <= e.waited < 0.3 + 2.0 for e in timed_out)
        assert rec.kinds("k") == [
            FlightStarted,
            Joined,
            Joined,
            TimedOut,
            TimedOut,
            Joined,
            FlightFinished,
        ]
        assert rec.for_key("k")[-1].callers == 4
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def test_thread_do_result_timeout_raises_but_loader_timeout_error_is_a_result() -> None:
    g: Group[str, Token] = Group(timeout=0.2)
    gate = threading.Event()
    slow = Loader(name="slow", gate=gate)
    with pytest.raises(WaitTimeoutError):
        g.do_result("slow", slow)
    gate.set()
    wait_for(lambda: len(g) == 0)

    own = TimeoutError("the loader's own")
    result = g.do_result("own", Loader(name="own", raises=own))
    assert result.error is own and result.value is None and not result.shared
    with pytest.raises(TimeoutError) as info:
        g.do("own", Loader(name="own", raises=own))
    assert info.value is own and not isinstance(info.value, WaitTimeoutError)
    s = g.stats()
    assert (s.timeouts, s.errors, s.flights) == (1, 2, 3)


def test_thread_timeout_stats_and_events_agree() -> None:
    """Every caller counted in stats().timeouts also gets a TimedOut event (slot waits too)."""
    rec = Recorder()
    g: Group[str, Token] = Group(max_flights=1, on_limit="wait", timeout=0.1, on_event=rec)
    gate = threading.Event()
    a = Loader(name="a", gate=gate)
    a_future = g.do_future("a", a)
    a.wait_started()
    with pytest.raises(WaitTimeoutError):
        g.do("b", Loader(name="b"))  # times out waiting for a slot
    with pytest.raises(WaitTimeoutError):
        g.do("a", never_called)  # times out waiting for the flight
    gate.set()
    assert a_future.result(WAIT) is a.value
    assert g.stats().timeouts == 2
    assert len(rec.of(TimedOut)) == g.stats().timeouts, rec.of(TimedOut)


@pytest.mark.parametrize("use_do_future", [False, True], ids=["joiner-do", "joiner-do_future"])
def test_async_timeout_callers_leave_flight_goes_on(use_do_future: bool) -> None:
    rec = Recorder()
    g: AsyncGroup[str, Token] = AsyncGroup(timeout=0.3, on_event=rec)

    async def main() -> None:
        gate = asyncio.Event()
        loader = AsyncLoader(name="v", gate=gate)
        leader = await spawn(g.do("k", loader))
        joiner = await spawn(g.do("k", never_called))
        future = g.do_future("k", never_called)  # not bound by timeout
        await settle(leader, joiner)
        for caller in (leader, joiner):
            err = caller.exception()
            assert isinstance(err, WaitTimeoutError) and isinstance(err, TimeoutError)
            assert "'k'" in str(err) and "timeout=0.3" in str(err)
        assert "k" in g and not loader.cancelled.is_set()  # the loader runs on
        late = (
            g.do_future("k", never_called)
            if use_do_future
            else await spawn(g.do_result("k", never_called))
        )
        gate.set()
        await settle(late, future)
        expected = loader.value if use_do_future else Result(loader.value, None, True)
        assert late.result() == expected and future.result() is loader.value
        assert loader.calls == 1 and len(g) == 0
        s = g.stats()
        assert (s.timeouts, s.flights, s.joins, s.errors, s.aborted) == (2, 1, 3, 0, 0)
        timed_out = rec.of(TimedOut)
        assert len(timed_out) == 2 and all(e.key == "k" for e in timed_out)
        assert all(e.waited == pytest.approx(0.3, abs=0.05) for e in timed_out)
        assert rec.kinds("k") == [
            FlightStarted,
            Joined,
            Joined,
            TimedOut,
            TimedOut,
            Joined,
            FlightFinished,
        ]
        assert rec.for_key("k")[-1].callers == 4

    run(main())


def test_async_timeout_sole_leader_with_cancel_orphaned() -> None:
    """The last caller leaving by timeout cancels the loader (cancel_orphaned=True) ..."""
    rec = Recorder()
    g: AsyncGroup[str, Token] = AsyncGroup(timeout=0.1, cancel_orphaned=True, on_event=rec)

    async def main() -> None:
        gate = asyncio.Event()
        loader = AsyncLoader(name="v", gate=gate)
        with pytest.raises(WaitTimeoutError):
            await g.do("k", loader)
        await asyncio.wait_for(loader.cancelled.wait(), WAIT)
        await spin()
        assert "k" not in g and len(g) == 0
        s = g.stats()
        assert (s.timeouts, s.aborted, s.flights) == (1, 1, 1)
        assert rec.kinds("k") == [FlightStarted, TimedOut, FlightAborted]

        # ... but not while another caller still waits.
        gate2 = asyncio.Event()
        loader2 = AsyncLoader(name="w", gate=gate2)
        leader = await spawn(g.do("k2", loader2))
        future = g.do_future("k2", never_called)
        await settle(leader)
        assert isinstance(leader.exception(), WaitTimeoutError)
        assert not loader2.cancelled.is_set() and "k2" in g
        gate2.set()
        await settle(future)
        assert future.result() is loader2.value

    run(main())


@pytest.mark.parametrize("use_do_result", [False, True])
def test_async_timeout_is_one_deadline_for_the_slot_and_the_outcome(use_do_result: bool) -> None:
    """A caller that waited most of its timeout for a slot has only the rest for the outcome."""
    g: AsyncGroup[str, Token] = AsyncGroup(max_flights=1, on_limit="wait", timeout=1.0)

    async def main() -> None:
        gate = asyncio.Event()
        holder = await spawn(g.do("a", AsyncLoader(name="a", gate=gate)))
        b = AsyncLoader(name="b", gate=asyncio.Event())  # never set
        loop = asyncio.get_running_loop()
        begun = loop.time()
        call = g.do_result("b", b) if use_do_result else g.do("b", b)
        caller = await spawn(call)
        await asyncio.sleep(0.8)
        assert b.calls == 0  # still waiting for the slot
        gate.set()  # the slot frees at ~0.8 s; b's flight starts, then b times out
        await settle(holder, caller)
        took = loop.time() - begun
        assert isinstance(caller.exception(), WaitTimeoutError) and b.calls == 1
        # A fresh timeout after the slot wait would make it ~1.8 s.
        assert 0.99 <= took < 1.6, took
        assert g.stats().timeouts == 1

    run(main())


def test_async_do_result_timeout_raises_but_loader_timeout_error_is_a_result() -> None:
    g: AsyncGroup[str, Token] = AsyncGroup(timeout=0.2)

    async def main() -> None:
        gate = asyncio.Event()
        with pytest.raises(WaitTimeoutError):
            await g.do_result("slow", AsyncLoader(name="slow", gate=gate))
        gate.set()
        await spin()
        own = TimeoutError("the loader's own")
        for suspend in (True, False):
            result = await g.do_result("own", AsyncLoader(name="own", raises=own, suspend=suspend))
            assert result.error is own and result.value is None and not result.shared
        with pytest.raises(TimeoutError) as info:
            await g.do("own", AsyncLoader(name="own", raises=own))
        assert info.value is own and not isinstance(info.value, WaitTimeoutError)
        s = g.stats()
        assert (s.timeouts, s.errors, s.flights) == (1, 3, 4)

    run(main())


@pytest.mark.parametrize("group", ["threads", "asyncio"])
def test_wait_seconds_counts_joiners_until_the_flight_ends_after_the_leader_left(
    group: str,
) -> None:
    """The leader times out at 0.1 s; a do_future joiner waits until the flight ends at ~0.3 s.

    wait_seconds sums the joiners' waits: here the one joiner waited ~0.3 s.
    """
    hold = 0.3
    if group == "threads":
        tg: Group[str, Token] = Group(timeout=0.1)
        gate = threading.Event()
        loader = Loader(name="v", gate=gate)
        t0 = perf_counter()
        leader = CallThread(tg.do, "k", loader)
        loader.wait_started()
        future = tg.do_future("k", never_called)
        assert isinstance(leader.exception(), WaitTimeoutError)
        time.sleep(max(0.0, hold - (perf_counter() - t0)))
        gate.set()
        assert future.result(WAIT) is loader.value
        joined_for = perf_counter() - t0
        s = tg.stats()
    else:
        ag: AsyncGroup[str, Token] = AsyncGroup(timeout=0.1)

        async def main() -> tuple[GroupStats, float]:
            gate = asyncio.Event()
            loader = AsyncLoader(name="v", gate=gate)
            t0 = perf_counter()
            leader = await spawn(ag.do("k", loader))
            future = ag.do_future("k", never_called)
            await settle(leader)
            assert isinstance(leader.exception(), WaitTimeoutError)
            await asyncio.sleep(max(0.0, hold - (perf_counter() - t0)))
            gate.set()
            await settle(future)
            return ag.stats(), perf_counter() - t0

        s, joined_for = run(main())
    assert s.joins == 1 and s.timeouts == 1
    assert hold - 0.1 <= s.wait_seconds <= joined_for, s  # not ~0.1: the leader left then


# -- AsyncGroup loader_timeout= --------------------------------------------------------


def test_async_loader_timeout_fails_the_flight_for_every_caller() -> None:
    rec = Recorder()
    g: AsyncGroup[str, Token] = AsyncGroup(loader_timeout=0.2, on_event=rec)

    async def main() -> None:
        never = asyncio.Event()
        loader = AsyncLoader(name="slow", gate=never)
        t0 = perf_counter()
        calls = [
            await spawn(g.do("k", loader)),
            await spawn(g.do_result("k", never_called)),
            g.do_future("k", never_called),
        ]
        await settle(*calls)
        assert perf_counter() - t0 >= 0.2 * 0.99
        err = calls[0].exception()
        assert type(err) is TimeoutError  # not WaitTimeoutError, not AbortedError
        assert not isinstance(err, (WaitTimeoutError, AbortedError))
        assert "loader_timeout=0.2" in str(err) and "'k'" in str(err)
        assert calls[1].result().shared and same_error(calls[1].result().error, err)
        assert same_error(calls[2].exception(), err)
        assert loader.cancelled.is_set() and len(g) == 0
        s = g.stats()
        assert (s.errors, s.aborted, s.timeouts, s.flights, s.joins) == (1, 0, 0, 1, 2)
        events = rec.for_key("k")
        assert [type(e) for e in events] == [FlightStarted, Joined, Joined, FlightFailed]
        assert events[-1].error is err and events[-1].duration >= 0.2 * 0.99

        # The key is free again; a fast loader under the same group is unaffected.
        for suspend in (True, False):
            fast = AsyncLoader(name="fast", suspend=suspend)
            assert await g.do("k", fast) is fast.value
        quick = AsyncLoader(name="quick", sleep=0.05)
        assert await g.do("k", quick) is quick.value

    run(main())


def test_async_loader_timeout_passes_the_loaders_own_timeout_error_through() -> None:
    g: AsyncGroup[str, Token] = AsyncGroup(loader_timeout=1.0)

    async def main() -> None:
        own = TimeoutError("upstream timed out")
        for loader in (
            AsyncLoader(name="s", raises=own),
            AsyncLoader(name="e", raises=own, suspend=False),
        ):
            t0 = perf_counter()
            with pytest.raises(TimeoutError) as info:
                await g.do("k", loader)
            assert info.value is own and perf_counter() - t0 < 0.9
        # A caller's own timeout shorter than loader_timeout is still a WaitTimeoutError...
        g2: AsyncGroup[str, Token] = AsyncGroup(loader_timeout=5.0, timeout=0.1)
        gate = asyncio.Event()
        with pytest.raises(WaitTimeoutError):
            await g2.do("k", AsyncLoader(name="w", gate=gate))
        gate.set()
        # ... and a loader_timeout shorter than the caller's timeout a plain TimeoutError.
        g3: AsyncGroup[str, Token] = AsyncGroup(loader_timeout=0.1, timeout=5.0)
        with pytest.raises(TimeoutError) as info:
            await g3.do("k", AsyncLoader(name="w", gate=asyncio.Event()))
        assert not isinstance(info.value, WaitTimeoutError) and "loader_timeout" in str(info.value)
        assert g3.stats().timeouts == 0 and g3.stats().errors == 1

    run(main())


NOT_AWAITABLE = pytest.mark.parametrize("returns", [42, None], ids=["int", "None"])
WITH_LOADER_TIMEOUT = pytest.mark.parametrize(
    "loader_timeout", [None, 1.0], ids=["plain", "loader_timeout"]
)


@WITH_LOADER_TIMEOUT
@NOT_AWAITABLE
def test_async_non_awaitable_fn_gets_a_clear_type_error(
    loader_timeout: float | None, returns: object
) -> None:
    """A plain function (returning 42, or None as most do) is a usage error naming the fix."""
    g: AsyncGroup[str, Any] = AsyncGroup(loader_timeout=loader_timeout)

    def not_async() -> object:
        return returns

    async def main() -> None:
        with pytest.raises(TypeError) as info:
            await g.do("k", not_async)
        assert "awaitable" in str(info.value) and "not_async" in str(info.value)
        assert "k" not in g and len(g) == 0
        ok = AsyncLoader(name="ok")
        assert await g.do("k", ok) is ok.value

    run(main())


@WITH_LOADER_TIMEOUT
@NOT_AWAITABLE
def test_async_non_awaitable_fn_leaves_no_flight_open_in_events(
    loader_timeout: float | None, returns: object
) -> None:
    """A FlightStarted for a call refused as a usage error must still get its end event."""
    rec = Recorder()
    g: AsyncGroup[str, Any] = AsyncGroup(loader_timeout=loader_timeout, on_event=rec)

    def not_async() -> object:
        return returns

    async def main() -> None:
        with pytest.raises(TypeError):
            await g.do("k", not_async)

    run(main())
    assert_balanced(rec)


# -- option validation -----------------------------------------------------------------


BAD_COMMON: list[tuple[str, object]] = [
    ("name", 3),
    ("name", None),
    ("name", ""),
    ("on_event", 3),
    ("on_event", "print"),
    ("max_flights", 0),
    ("max_flights", -1),
    ("max_flights", True),
    ("max_flights", 1.5),
    ("max_flights", "2"),
    ("on_limit", "block"),
    ("on_limit", None),
    ("timeout", 0),
    ("timeout", -1),
    ("timeout", "1"),
    ("timeout", True),
    ("timeout", float("nan")),
]


@pytest.mark.parametrize(("option", "value"), BAD_COMMON, ids=[f"{o}={v!r}" for o, v in BAD_COMMON])
@pytest.mark.parametrize("cls", [Group, AsyncGroup], ids=["Group", "AsyncGroup"])
def test_bad_option_is_refused_with_a_message_naming_it(
    cls: type, option: str, value: object
) -> None:
    hook = Recorder()
    kwargs: dict[str, Any] = {option: value}
    if option != "on_event":
        kwargs["on_event"] = hook
    with pytest.raises((TypeError, ValueError)) as info:
        cls(**kwargs)
    assert option in str(info.value) and repr(value) in str(info.value)
    assert hook.events == []


def test_an_empty_name_is_refused_by_every_group_and_cache() -> None:
    """A name labels events and metrics: "" would make series nobody can tell apart."""
    from singleflight.anyio import AnyIOGroup

    makers: list[Callable[[], object]] = [
        lambda: Group(name=""),
        lambda: AsyncGroup(name=""),
        lambda: AnyIOGroup(name=""),
        lambda: LoadingCache(lambda k: k, ttl=1.0, name=""),
        lambda: AsyncLoadingCache(_async_identity, ttl=1.0, name=""),
    ]
    for make in makers:
        with pytest.raises(ValueError, match="name must be a non-empty str"):
            make()


async def _async_identity(key: object) -> object:
    return key


@pytest.mark.parametrize("value", [0, -0.5, "1", True, float("nan")])
def test_bad_loader_timeout_is_refused(value: object) -> None:
    with pytest.raises((TypeError, ValueError), match="loader_timeout"):
        AsyncGroup(loader_timeout=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("executor", [object(), "pool", 3])
def test_executor_without_submit_is_refused(executor: object) -> None:
    with pytest.raises(TypeError, match="executor"):
        Group(executor=executor)  # type: ignore[arg-type]


def test_good_options_are_accepted() -> None:
    for cls in (Group, AsyncGroup):
        g = cls(name="n", on_event=print, max_flights=1, on_limit="wait", timeout=0.5)
        assert g.name == "n" and len(g) == 0 and g.stats() == fresh_stats()
        cls(timeout=1, max_flights=10**6, on_limit="raise")
    AsyncGroup(loader_timeout=1)
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert len(Group(executor=pool)) == 0


# -- context variables -------------------------------------------------------------------------


_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


def test_thread_do_future_waiting_for_a_slot_runs_in_the_callers_context() -> None:
    """The helper thread of a do_future() waiting for a slot sees the caller's context
    variables, as the caller's own thread would (the loader runs where flights run)."""
    gate = threading.Event()
    seen: list[str] = []

    def hook(event: Event) -> None:
        if isinstance(event, FlightStarted):
            seen.append(_REQUEST_ID.get())

    g: Group[str, str] = Group(max_flights=1, on_limit="wait", on_event=hook)
    first = g.do_future("a", lambda: gate.wait(WAIT) and "a")
    token = _REQUEST_ID.set("request-7")
    try:
        second = g.do_future("b", lambda: "b")  # waits for the slot on a thread
    finally:
        _REQUEST_ID.reset(token)
    gate.set()
    assert (first.result(WAIT), second.result(WAIT)) == ("a", "b")
    assert seen == ["none", "request-7"]
