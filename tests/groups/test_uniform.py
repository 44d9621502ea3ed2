"""Behaviour every driver shares, run on each: Group, AsyncGroup, AnyIOGroup on asyncio and trio.

Each test is written once against a small adapter: calls run in threads of
their own (Group) or in tasks of an event loop kept in a thread (the others,
through an AnyIO blocking portal), so the test itself is plain threaded code and
may act from outside the loop (as ``forget`` from another thread does).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from singleflight import AsyncGroup, Group
from singleflight.anyio import AnyIOGroup
from singleflight.events import Event, FlightFinished, FlightStarted, Joined

WAIT = 10.0


class Gate:
    """Holds loaders until opened, from any thread."""

    def __init__(self, portal: BlockingPortal | None) -> None:
        self.portal = portal
        if portal is None:
            self.event: Any = threading.Event()
        else:
            self.event = portal.call(anyio.Event)

    def open(self) -> None:
        if self.portal is None:
            self.event.set()
        else:
            self.portal.call(self.event.set)


class Driver:
    """One driver: how to make its group, start a call, write a loader, look inside."""

    def __init__(self, name: str, portal: BlockingPortal | None) -> None:
        self.name = name
        self.portal = portal

    def group(self, **options: Any) -> Any:
        cls = {"threads": Group, "asyncio": AsyncGroup}.get(self.name, AnyIOGroup)
        return cls(**options)

    def gate(self) -> Gate:
        return Gate(self.portal)

    def loader(self, gate: Gate | None, value: object) -> Callable[[], Any]:
        if self.portal is None:

            def load() -> object:
                if gate is not None:
                    assert gate.event.wait(WAIT)
                return value

            return load

        async def aload() -> object:
            if gate is not None:
                with anyio.fail_after(WAIT):
                    await gate.event.wait()
            return value

        return aload

    def start(self, g: Any, method: str, key: object, fn: object) -> concurrent.futures.Future[Any]:
        """Call ``g.<method>(key, fn)`` where the driver's callers run; its outcome, later."""
        if self.portal is None:
            out: concurrent.futures.Future[Any] = concurrent.futures.Future()

            def call() -> None:
                try:
                    out.set_result(getattr(g, method)(key, fn))
                except BaseException as exc:
                    out.set_exception(exc)

            threading.Thread(target=call, daemon=True).start()
            return out

        async def acall() -> Any:
            return await getattr(g, method)(key, fn)

        return self.portal.start_task_soon(acall)

    def call(self, g: Any, method: str, key: object, fn: object) -> Any:
        return self.start(g, method, key, fn).result(WAIT)

    def future(self, g: Any, key: object, fn: object) -> Any:
        """``g.do_future(key, fn)`` where the driver's callers run: the caller's own future."""
        if self.portal is None:
            return g.do_future(key, fn)

        async def make() -> Any:
            return g.do_future(key, fn)

        return self.portal.call(make)

    def cancel(self, future: Any) -> None:
        if self.portal is None:
            future.cancel()
        else:
            self.portal.call(future.cancel)

    def parked(self, g: Any) -> int:
        """Callers waiting for a slot under max_flights (white-box)."""
        if self.portal is None:
            with g._lock:
                return int(g._slot_waiters)
        return int(self.portal.call(lambda: g._parked()))


@pytest.fixture(params=["threads", "asyncio", "anyio-asyncio", "anyio-trio"])
def driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    name: str = request.param
    if name == "threads":
        yield Driver(name, None)
        return
    backend = "trio" if name == "anyio-trio" else "asyncio"
    with start_blocking_portal(backend) as portal:
        yield Driver(name, portal)


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.001)


# -- a non-callable fn ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["do", "do_result"])
def test_non_callable_fn_is_refused_before_anything_happens(driver: Driver, method: str) -> None:
    """TypeError with one message, on a new key and on a key in flight; nothing counted or told."""
    events: list[Event] = []
    g = driver.group(on_event=events.append)
    with pytest.raises(TypeError, match=r"^fn must be callable; got int 42$"):
        driver.call(g, method, "new", 42)
    assert "new" not in g
    assert events == []
    assert g.stats().calls == 0 and g.stats().errors == 0

    gate = driver.gate()
    leader = driver.start(g, "do", "busy", driver.loader(gate, "v"))
    wait_until(lambda: "busy" in g, "the leader's flight")
    with pytest.raises(TypeError, match=r"^fn must be callable; got int 42$"):
        driver.call(g, method, "busy", 42)
    assert g.stats().joins == 0
    gate.open()
    assert leader.result(WAIT) == "v"
    assert [type(e) for e in events] == [FlightStarted, FlightFinished]


def test_non_callable_fn_is_refused_by_do_future(driver: Driver) -> None:
    g = driver.group()
    with pytest.raises(TypeError, match=r"^fn must be callable; got str 'x'$"):
        driver.future(g, "k", "x")
    assert len(g) == 0 and g.stats().calls == 0


# -- cancel_orphaned must be True or False -------------------------------------------------------


def test_cancel_orphaned_must_be_a_bool(driver: Driver) -> None:
    if driver.name == "threads":
        pytest.skip("Group never cancels a loader: it has no such option")
    with pytest.raises(TypeError, match="cancel_orphaned must be True or False"):
        driver.group(cancel_orphaned="no")
    assert driver.group(cancel_orphaned=True) is not None


# -- wait_seconds -----------------------------------------------------------------------


def test_wait_seconds_counts_each_joiner_until_it_has_the_outcome_or_left(driver: Driver) -> None:
    """wait_seconds is the sum over joiners of the time each waited: a joiner that
    cancelled its future counts until then, not until the flight ends."""
    g = driver.group()
    gate = driver.gate()
    leader = driver.start(g, "do", "k", driver.loader(gate, "v"))
    wait_until(lambda: "k" in g, "the flight")
    before_join = time.perf_counter()
    joiner = driver.future(g, "k", driver.loader(None, "never"))
    driver.cancel(joiner)
    after_cancel = time.perf_counter()
    # The flight goes on well past the joiner's leaving.
    time.sleep(0.2)
    gate.open()
    assert leader.result(WAIT) == "v"
    stats = g.stats()
    assert stats.joins == 1
    assert 0.0 <= stats.wait_seconds <= after_cancel - before_join


def test_wait_seconds_sums_joiners_that_got_the_outcome(driver: Driver) -> None:
    g = driver.group()
    gate = driver.gate()
    leader = driver.start(g, "do", "k", driver.loader(gate, "v"))
    wait_until(lambda: "k" in g, "the flight")
    t0 = time.perf_counter()
    joiners = [driver.start(g, "do", "k", driver.loader(None, "never")) for _ in range(3)]
    wait_until(lambda: g.stats().joins == 3, "three joiners")
    t1 = time.perf_counter()
    time.sleep(0.05)
    t2 = time.perf_counter()
    gate.open()
    assert [j.result(WAIT) for j in joiners] == ["v"] * 3
    t3 = time.perf_counter()
    assert leader.result(WAIT) == "v"
    assert 3 * (t2 - t1) <= g.stats().wait_seconds <= 3 * (t3 - t0)


# -- forget from another thread frees a slot ---------------------------------------------------


def test_forget_from_another_thread_wakes_a_slot_waiter(driver: Driver) -> None:
    g = driver.group(max_flights=1, on_limit="wait")
    gate = driver.gate()
    first = driver.start(g, "do", "a", driver.loader(gate, "a"))
    wait_until(lambda: "a" in g, "the first flight")
    second = driver.start(g, "do", "b", driver.loader(None, "b"))
    wait_until(lambda: driver.parked(g) == 1, "a caller waiting for a slot")
    g.forget("a")  # from this thread, not the loop's: the slot frees all the same
    assert second.result(WAIT) == "b"
    assert not first.done()
    gate.open()
    assert first.result(WAIT) == "a"


# -- flight ids -----------------------------------------------------------------------------


def test_flight_ids_are_never_reused_and_link_each_flights_events(driver: Driver) -> None:
    """One scheme everywhere: a counter, so ids grow and a finished flight's id is not reused."""
    events: list[Event] = []
    g = driver.group(on_event=events.append)
    for i in range(20):
        assert driver.call(g, "do", "k", driver.loader(None, i)) == i
    gate = driver.gate()
    leader = driver.start(g, "do", "shared", driver.loader(gate, "s"))
    wait_until(lambda: "shared" in g, "the shared flight")
    joiner = driver.start(g, "do", "shared", driver.loader(None, "never"))
    wait_until(lambda: g.stats().joins == 1, "the joiner")
    gate.open()
    assert (leader.result(WAIT), joiner.result(WAIT)) == ("s", "s")
    started = [e.flight for e in events if isinstance(e, FlightStarted)]
    finished = [e.flight for e in events if isinstance(e, FlightFinished)]
    joined = [e.flight for e in events if isinstance(e, Joined)]
    assert len(started) == 21 and started == sorted(set(started))
    assert finished == started and joined == [started[-1]]


# -- fn calling the group on its own key before its loader runs -------------------------------


def test_fn_calling_do_future_on_its_own_key_raises_reentry_error(driver: Driver) -> None:
    """``fn`` itself (for the event-loop groups, before the coroutine it returns runs) is
    the loader: its call of ``do_future`` on the key it loads raises ReentryError, the
    flight fails with it, and the key is free afterwards."""
    from singleflight import ReentryError

    g = driver.group()
    seen: list[BaseException] = []

    def fn() -> object:
        try:
            g.do_future("k", fn)
        except BaseException as exc:
            seen.append(exc)
            raise
        raise AssertionError("do_future on its own key returned")

    with pytest.raises(ReentryError):
        driver.call(g, "do", "k", fn)
    assert [type(e) for e in seen] == [ReentryError]
    stats = g.stats()
    assert (stats.flights, stats.joins, stats.errors, len(g)) == (1, 0, 1, 0)
    assert driver.call(g, "do", "k", driver.loader(None, "after")) == "after"
