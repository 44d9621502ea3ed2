"""AnyIOGroup on asyncio and on trio: what only it has.

The contract every group keeps is in tests/groups/test_contract.py (AnyIOGroup on both
backends included); this file has what is particular to AnyIOGroup: cancel scopes, its
loader's task, runs of either backend ending, max_flights, timeouts, FlightFuture.

Every test runs on both backends (anyio's pytest plugin, ``anyio_backend``
params) with real tasks, under ``anyio.fail_after`` and a pytest-timeout mark,
so a hang fails instead of blocking.  Overlap between callers is made with
``anyio.Event`` gates, and callers are known to have entered the group by its
counters (``stats().calls``), not by sleeps.
"""

from __future__ import annotations

import contextvars
import random
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import InvalidStateError
from typing import Any

import anyio
import pytest

from singleflight import AbortedError, Result, TooManyFlightsError, WaitTimeoutError
from singleflight.anyio import AnyIOGroup, FlightFuture
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

from .._support import WAIT, AsyncLoader, Boom, Stop, Token, same_error, spin, until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(15)]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


# -- helpers ---------------------------------------------------------------------------


class Caller:
    """One caller of ``entry``, in a cancel scope of its own; records what it saw."""

    def __init__(self, g: AnyIOGroup[Any, Any], key: Any, fn: Any, entry: str = "do") -> None:
        self.g, self.key, self.fn, self.entry = g, key, fn, entry
        self.scope = anyio.CancelScope()
        self.done = anyio.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.result: Result[Any] | None = None
        self.cancelled = False
        self.task_id = -1

    async def __call__(self) -> None:
        self.task_id = anyio.get_current_task().id
        try:
            with self.scope:
                try:
                    if self.entry == "do":
                        self.value = await self.g.do(self.key, self.fn)
                    else:
                        self.result = await self.g.do_result(self.key, self.fn)
                except anyio.get_cancelled_exc_class():
                    self.cancelled = True
                    raise
                except Exception as exc:
                    self.error = exc
        finally:
            self.done.set()

    def got(self) -> Any:
        if self.result is not None:
            return self.result.value if self.result.error is None else self.result.error
        return self.value if self.error is None else self.error


async def enter(tg: Any, g: AnyIOGroup[Any, Any], callers: list[Caller]) -> None:
    """Start ``callers`` in order, each one in the group before the next starts."""
    for c in callers:
        before = g.stats().calls
        tg.start_soon(c)
        await until(lambda before=before: g.stats().calls > before)  # type: ignore[misc]


# -- one execution, same object, not a cache ---------------------------------------------


@pytest.mark.parametrize("entry", ["do", "do_result"])
async def test_one_execution_per_key_same_object_for_all(entry: str) -> None:
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup()
        gate = anyio.Event()
        loader = AsyncLoader(gate=gate)
        callers = [Caller(g, "k", loader, entry if i % 2 else "do") for i in range(20)]
        async with anyio.create_task_group() as tg:
            await enter(tg, g, callers)
            assert "k" in g and len(g) == 1
            gate.set()
        assert loader.calls == 1
        assert all(c.got() is loader.value for c in callers)
        assert all(c.result.shared for c in callers if c.result is not None)
        assert len(g) == 0 and "k" not in g
        s = g.stats()
        assert (s.calls, s.flights, s.joins, s.shared, s.in_flight) == (20, 1, 19, 1, 0)
        assert s.wait_seconds > 0


# -- errors --------------------------------------------------------------------------------


async def test_loader_exception_reaches_every_caller_as_its_own_equal_copy() -> None:
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup()
        gate = anyio.Event()
        boom = Boom("x")
        loader = AsyncLoader(gate=gate, raises=boom)
        callers = [Caller(g, "k", loader, "do" if i % 2 else "do_result") for i in range(6)]
        async with anyio.create_task_group() as tg:
            await enter(tg, g, callers)
            gate.set()
        seen = [c.got() for c in callers]
        assert all(same_error(e, boom) for e in seen)
        assert len({id(e) for e in seen}) == len(seen) and sum(e is boom for e in seen) == 1
        assert all(c.result.shared for c in callers if c.result is not None)
        # Raised with the loader's traceback each time: it does not grow per caller.
        assert all(len(list(_frames(e.__traceback__))) <= 6 for e in seen)
        assert g.stats().errors == 1 and len(g) == 0
        # The key is usable again after a failure.
        assert await g.do("k", AsyncLoader(name="ok")) is not None


def _frames(tb: Any) -> Any:
    while tb is not None:
        yield tb
        tb = tb.tb_next


@pytest.mark.parametrize("how", ["base_exception", "cancelled"])
async def test_loader_ending_by_base_exception_or_cancelled_gives_aborted_error(how: str) -> None:
    with anyio.fail_after(WAIT):
        events: list[Event] = []
        g: AnyIOGroup[str, Token] = AnyIOGroup(on_event=events.append)
        gate = anyio.Event()

        async def loader() -> Token:
            await gate.wait()
            if how == "base_exception":
                raise Stop
            # End with the backend's own cancellation exception, caught from an inner scope.
            caught: BaseException | None = None
            with anyio.CancelScope() as inner:
                inner.cancel()
                try:
                    await anyio.sleep(1)
                except anyio.get_cancelled_exc_class() as exc:
                    caught = exc
            assert caught is not None
            raise caught

        callers = [Caller(g, "k", loader, "do" if i % 2 else "do_result") for i in range(4)]
        async with anyio.create_task_group() as tg:
            await enter(tg, g, callers)
            gate.set()
        errors = [c.got() for c in callers]
        assert all(isinstance(e, AbortedError) and e.key == "k" for e in errors)
        assert all(same_error(e, errors[0]) for e in errors)
        cause = errors[0].__cause__
        if how == "base_exception":
            assert isinstance(cause, Stop)
        else:
            assert isinstance(cause, anyio.get_cancelled_exc_class())
        assert not any(c.cancelled for c in callers)
        assert g.stats().aborted == 1 and len(g) == 0
        assert isinstance(events[-1], FlightAborted) and events[-1].cause is cause


async def test_bad_fn_type_errors() -> None:
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Any] = AnyIOGroup()
        with pytest.raises(TypeError, match="fn must be callable"):
            await g.do("k", 42)  # type: ignore[arg-type]

        def sync() -> int:
            return 1

        with pytest.raises(TypeError, match="returned int"):
            await g.do("k", sync)  # type: ignore[arg-type]
        assert len(g) == 0


async def test_bad_options() -> None:
    with pytest.raises(TypeError, match="name"):
        AnyIOGroup(name=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_event"):
        AnyIOGroup(on_event=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cancel_orphaned"):
        AnyIOGroup(cancel_orphaned="yes")  # type: ignore[arg-type]


# -- the loader's own task, and cancellation ------------------------------------------------


async def test_loader_runs_in_its_own_task_and_sees_leaders_context() -> None:
    with anyio.fail_after(WAIT):
        var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
        var.set("leader")
        g: AnyIOGroup[str, Any] = AnyIOGroup()
        seen: list[str] = []
        loader = AsyncLoader()

        async def fn() -> Token:
            seen.append(var.get())
            return await loader()

        me = anyio.get_current_task().id
        assert await g.do("k", fn) is loader.value
        assert loader.task_ids and loader.task_ids[0] != me
        assert seen == ["leader"]


@pytest.mark.parametrize("cancel_orphaned", [False, True])
@pytest.mark.parametrize("victim", [0, 1])
async def test_cancelling_one_caller_leaves_the_others_alone(
    victim: int, cancel_orphaned: bool
) -> None:
    """The leader (0) or a joiner (1) is cancelled: it alone raises the backend's cancellation."""
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup(cancel_orphaned=cancel_orphaned)
        gate = anyio.Event()
        loader = AsyncLoader(gate=gate)
        callers = [Caller(g, "k", loader, "do" if i % 2 else "do_result") for i in range(3)]
        async with anyio.create_task_group() as tg:
            await enter(tg, g, callers)
            callers[victim].scope.cancel()
            await callers[victim].done.wait()
            assert not loader.cancelled.is_set() and "k" in g
            gate.set()
        assert callers[victim].cancelled and callers[victim].scope.cancelled_caught
        assert callers[victim].got() is None
        for i, c in enumerate(callers):
            if i != victim:
                assert not c.cancelled and c.got() is loader.value
        assert loader.calls == 1 and not loader.cancelled.is_set()
        assert loader.task_ids[0] not in {c.task_id for c in callers}


async def test_move_on_after_leaves_the_flight_for_the_others() -> None:
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup(cancel_orphaned=True)
        gate = anyio.Event()
        loader = AsyncLoader(gate=gate)
        got: list[Any] = []

        async def patient() -> None:
            got.append(await g.do("k", loader))

        async with anyio.create_task_group() as tg:
            tg.start_soon(patient)
            await until(lambda: g.stats().calls == 1)
            with anyio.move_on_after(0.01) as scope:
                await g.do("k", loader)
            assert scope.cancelled_caught
            gate.set()
        assert got == [loader.value] and not loader.cancelled.is_set()


async def test_all_callers_cancelled_default_loader_runs_on() -> None:
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup()
        gate = anyio.Event()
        loader = AsyncLoader(gate=gate)
        callers = [Caller(g, "k", loader) for _ in range(3)]
        async with anyio.create_task_group() as tg:
            await enter(tg, g, callers)
            for c in callers:
                c.scope.cancel()
        assert all(c.cancelled for c in callers)
        await spin()
        assert "k" in g and not loader.cancelled.is_set()
        gate.set()
        await loader.finished.wait()
        await until(lambda: len(g) == 0)
        assert not loader.cancelled.is_set() and g.stats().aborted == 0


async def test_cancel_orphaned_cancels_loader_when_last_caller_leaves_not_before() -> None:
    with anyio.fail_after(WAIT):
        events: list[Event] = []
        g: AnyIOGroup[str, Token] = AnyIOGroup(cancel_orphaned=True, on_event=events.append)
        gate = anyio.Event()
        loader = AsyncLoader(gate=gate)
        callers = [Caller(g, "k", loader) for _ in range(3)]
        async with anyio.create_task_group() as tg:
            await enter(tg, g, callers)
            await loader.started.wait()
            for c in callers[:-1]:
                c.scope.cancel()
                await c.done.wait()
                await spin()
                assert not loader.cancelled.is_set() and "k" in g
            callers[-1].scope.cancel()
            await callers[-1].done.wait()
            # The key is released at once: a new call starts a new flight.
            assert "k" not in g
        await loader.cancelled.wait()
        await until(lambda: g.stats().aborted == 1)
        assert len(g) == 0 and not loader.finished.is_set()
        assert isinstance(events[-1], FlightAborted) and events[-1].callers == 3
        new = AsyncLoader(name="new")
        assert await g.do("k", new) is new.value and new.calls == 1


async def test_cancel_orphaned_before_the_loader_ran_aborts_it() -> None:
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup(cancel_orphaned=True)
        loader = AsyncLoader()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await g.do("k", loader)
        assert scope.cancelled_caught
        await until(lambda: g.stats().aborted == 1)
        # On trio the cancellation reaches the caller at once and the loader is
        # never called; on asyncio the loader task may take its first step first.
        assert not loader.finished.is_set() and len(g) == 0
        assert loader.calls == 0 or loader.cancelled.is_set()


# -- forget ----------------------------------------------------------------------------------


# -- references, runs, events ----------------------------------------------------------------


async def test_events_and_stats() -> None:
    with anyio.fail_after(WAIT):
        events: list[Event] = []
        g: AnyIOGroup[str, Token] = AnyIOGroup(name="users", on_event=events.append)
        gate = anyio.Event()
        loader = AsyncLoader(gate=gate)
        callers = [Caller(g, "k", loader) for _ in range(3)]
        async with anyio.create_task_group() as tg:
            await enter(tg, g, callers)
            gate.set()
        with pytest.raises(Boom):
            await g.do("bad", AsyncLoader(raises=Boom()))
        kinds = [type(e) for e in events]
        assert kinds == [FlightStarted, Joined, Joined, FlightFinished, FlightStarted, FlightFailed]
        assert {e.group for e in events} == {"users"}  # type: ignore[union-attr]
        assert len({e.flight for e in events[:4]}) == 1  # type: ignore[union-attr]
        finished = events[3]
        assert isinstance(finished, FlightFinished) and finished.callers == 3
        assert isinstance(events[5], FlightFailed) and isinstance(events[5].error, Boom)
        s = g.stats()
        assert (s.calls, s.flights, s.joins, s.shared, s.errors, s.aborted) == (4, 2, 2, 1, 1, 0)
        assert "users" in repr(g)


async def test_hook_that_raises_is_logged_not_propagated(caplog: pytest.LogCaptureFixture) -> None:
    with anyio.fail_after(WAIT):

        def hook(event: Event) -> None:
            raise ValueError("broken exporter")

        g: AnyIOGroup[str, Token] = AnyIOGroup(on_event=hook)
        loader = AsyncLoader()
        assert await g.do("k", loader) is loader.value
        assert "broken exporter" in caplog.text


def test_one_group_across_sequential_runs_of_both_backends() -> None:
    g: AnyIOGroup[str, Token] = AnyIOGroup()

    async def main() -> None:
        with anyio.fail_after(WAIT):
            loader = AsyncLoader()
            assert await g.do("k", loader) is loader.value

    for backend in ("asyncio", "trio", "asyncio", "trio"):
        anyio.run(main, backend=backend)
    assert len(g) == 0 and g.stats().flights == 4


@pytest.mark.timeout(15)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_run_ending_with_a_flight_pending_leaves_nothing_behind(backend: str) -> None:
    """The run ends while a loader waits: the loader is cancelled and the flight ends aborted."""
    g: AnyIOGroup[str, Token] = AnyIOGroup()
    seen: list[AsyncLoader] = []

    async def main() -> None:
        with anyio.fail_after(WAIT):
            loader = AsyncLoader(gate=anyio.Event())  # never set
            seen.append(loader)
            with anyio.move_on_after(0.01):
                await g.do("k", loader)
            assert "k" in g

    anyio.run(main, backend=backend)
    assert seen[0].cancelled.is_set() and not seen[0].finished.is_set()
    assert len(g) == 0 and g.stats().aborted == 1


@pytest.mark.timeout(15)
def test_trio_run_ending_gives_a_shielded_waiter_aborted_error() -> None:
    """Trio cancels system tasks when the main task exits: a waiter that outlives it is told."""
    import trio

    g: AnyIOGroup[str, Token] = AnyIOGroup()
    got: list[Any] = []

    async def waiter(loader: AsyncLoader) -> None:
        with trio.CancelScope(shield=True), trio.fail_after(WAIT):
            got.append(await g.do_result("k", loader))

    async def main() -> None:
        loader = AsyncLoader(gate=anyio.Event())  # never set
        trio.lowlevel.spawn_system_task(waiter, loader)
        with trio.fail_after(WAIT):
            await loader.started.wait()

    trio.run(main)
    assert len(got) == 1 and isinstance(got[0].error, AbortedError)
    assert isinstance(got[0].error.__cause__, trio.Cancelled)
    assert len(g) == 0


def test_outside_any_event_loop() -> None:
    g: AnyIOGroup[str, Token] = AnyIOGroup()
    assert len(g) == 0 and "k" not in g and g.forget_unshared("k") is True
    g.forget("k")
    coro = g.do("k", AsyncLoader)
    with pytest.raises(RuntimeError, match="asyncio event loop or trio"):
        coro.send(None)
    coro.close()


def test_import_without_anyio_says_what_to_install() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["anyio"] = None  # as if it were not installed
        try:
            import singleflight.anyio
        except ImportError as exc:
            print(exc)
        else:
            print("imported")
        import singleflight
        print(singleflight.Group.__name__)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert "pysingleflight[anyio]" in out and "imported" not in out
    assert out.strip().endswith("Group")


# -- max_flights ---------------------------------------------------------------------------


def parked(g: AnyIOGroup[Any, Any]) -> int:
    """How many callers of the running loop or run wait for a slot (white-box)."""
    return len(g._state_here().slot_waiters)


async def park(tg: Any, g: AnyIOGroup[Any, Any], callers: list[Caller]) -> None:
    """Start ``callers`` in order, each one waiting for a slot before the next starts."""
    for c in callers:
        before = parked(g)
        tg.start_soon(c)
        await until(lambda before=before: parked(g) > before)  # type: ignore[misc]


async def never_called() -> Token:
    raise AssertionError("a joiner's fn must not be called")


async def test_max_flights_raise_refuses_new_keys_never_joins() -> None:
    with anyio.fail_after(WAIT):
        events: list[Event] = []
        g: AnyIOGroup[str, Token] = AnyIOGroup(name="lim", max_flights=2, on_event=events.append)
        gates = {k: anyio.Event() for k in ("a", "b")}
        loaders = {k: AsyncLoader(name=k, gate=gates[k]) for k in gates}
        leaders = {k: Caller(g, k, loaders[k]) for k in gates}
        c = AsyncLoader(name="c")
        async with anyio.create_task_group() as tg:
            await enter(tg, g, list(leaders.values()))
            for entry in ("do", "do_result"):
                with pytest.raises(TooManyFlightsError) as info:
                    await getattr(g, entry)("c", c)
            with pytest.raises(TooManyFlightsError):
                g.do_future("c", c)  # raised at once, not put in the future
            err = info.value
            assert err.key == "c" and err.limit == 2 and "max_flights=2" in str(err)
            assert c.calls == 0 and "c" not in g and len(g) == 2
            s = g.stats()
            assert (s.rejected, s.flights, s.calls, s.in_flight) == (3, 2, 2, 2)
            assert [e for e in events if isinstance(e, Rejected)] == [Rejected("lim", "c", 2)] * 3
            # Joins are never refused, whatever the entry point.
            joiner = Caller(g, "a", never_called)
            await enter(tg, g, [joiner])
            joined = g.do_future("b", never_called)
            gates["a"].set()
            await joiner.done.wait()
            assert joiner.got() is leaders["a"].got() is loaders["a"].value
            assert await g.do("c", c) is c.value and c.calls == 1
            gates["b"].set()
            assert await joined is loaders["b"].value
        s = g.stats()
        assert (s.rejected, s.flights, s.joins, s.in_flight) == (3, 3, 2, 0)


async def test_max_flights_wait_blocks_until_a_slot_frees() -> None:
    with anyio.fail_after(WAIT):
        events: list[Event] = []
        g: AnyIOGroup[str, Token] = AnyIOGroup(
            max_flights=1, on_limit="wait", on_event=events.append
        )
        gate = anyio.Event()
        a, b, c = AsyncLoader(name="a", gate=gate), AsyncLoader(name="b"), AsyncLoader(name="c")
        leader, waiter = Caller(g, "a", a), Caller(g, "b", b, "do_result")
        async with anyio.create_task_group() as tg:
            await enter(tg, g, [leader])
            await park(tg, g, [waiter])
            future = g.do_future("c", c)  # returns at once; waits in a task of its own
            await until(lambda: parked(g) == 2)
            await spin()
            assert not waiter.done.is_set() and not future.done()
            assert b.calls == c.calls == 0 and "b" not in g and "c" not in g
            gate.set()
            assert await future is c.value
        assert leader.got() is a.value and waiter.got() is b.value
        assert b.calls == c.calls == 1 and len(g) == 0 and parked(g) == 0
        s = g.stats()
        assert (s.flights, s.rejected, s.timeouts) == (3, 0, 0)
        assert not any(isinstance(e, Rejected) for e in events)


@pytest.mark.parametrize("entries", [("do", "do"), ("do_result", "future")])
async def test_callers_of_one_key_waiting_for_a_slot_share_its_flight(
    entries: tuple[str, str],
) -> None:
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup(max_flights=1, on_limit="wait")
        gate, b_gate = anyio.Event(), anyio.Event()
        b = AsyncLoader(name="b", gate=b_gate)
        async with anyio.create_task_group() as tg:
            await enter(tg, g, [Caller(g, "a", AsyncLoader(name="a", gate=gate))])
            first = Caller(g, "b", b, entries[0])
            await park(tg, g, [first])
            if entries[1] == "future":
                second: Any = g.do_future("b", b)
            else:
                second = Caller(g, "b", b, entries[1])
                await park(tg, g, [second])
            await until(lambda: parked(g) == 2)
            gate.set()
            await b.started.wait()
            await spin(20)
            b_gate.set()
            got = await second if entries[1] == "future" else None
        assert b.calls == 1, f"the loader of 'b' ran {b.calls} times for 2 parked callers"
        assert first.got() is b.value
        assert (got if got is not None else second.got()) is b.value
        assert g.stats().flights == 2 and g.stats().shared == 1


@pytest.mark.parametrize("how", ["error", "aborted", "forget", "cancel_orphaned", "loader_timeout"])
async def test_slot_is_freed_when_a_flight_leaves_the_table(how: str) -> None:
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup(
            max_flights=1,
            on_limit="wait",
            cancel_orphaned=how == "cancel_orphaned",
            loader_timeout=0.2 if how == "loader_timeout" else None,
        )
        gate = anyio.Event()
        error = {"error": Boom("a"), "aborted": Stop()}.get(how)
        a, b = AsyncLoader(name="a", gate=gate, raises=error), AsyncLoader(name="b")
        leader, waiter = Caller(g, "a", a), Caller(g, "b", b)
        async with anyio.create_task_group() as tg:
            await enter(tg, g, [leader])
            await park(tg, g, [waiter])
            if how in ("error", "aborted"):
                gate.set()
            elif how == "forget":
                g.forget("a")
            elif how == "cancel_orphaned":
                leader.scope.cancel()
            await waiter.done.wait()
            assert waiter.got() is b.value and parked(g) == 0
            if how == "forget":
                assert not leader.done.is_set()  # the forgotten flight still runs
                gate.set()
        if how == "error":
            assert isinstance(leader.got(), Boom)
        elif how == "aborted":
            assert isinstance(leader.got(), AbortedError)
        elif how == "loader_timeout":
            assert type(leader.got()) is TimeoutError
        elif how == "forget":
            assert leader.got() is a.value
        else:
            assert leader.cancelled
            await a.cancelled.wait()
        assert len(g) == 0 and b.calls == 1


async def test_forget_unshared_frees_a_slot() -> None:
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup(max_flights=1, on_limit="wait")
        gate = anyio.Event()
        leader, waiter = (
            Caller(g, "a", AsyncLoader(name="a", gate=gate)),
            Caller(g, "b", AsyncLoader(name="b")),
        )
        async with anyio.create_task_group() as tg:
            await enter(tg, g, [leader])
            await park(tg, g, [waiter])
            assert g.forget_unshared("a") is True
            await waiter.done.wait()
            gate.set()
        assert isinstance(waiter.got(), Token) and isinstance(leader.got(), Token)


async def test_caller_cancelled_while_waiting_for_a_slot_leaves_the_queue() -> None:
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup(max_flights=1, on_limit="wait")
        gate = anyio.Event()
        b, c = AsyncLoader(name="b"), AsyncLoader(name="c")
        leader, quitter, patient = (
            Caller(g, "a", AsyncLoader(name="a", gate=gate)),
            Caller(g, "b", b),
            Caller(g, "c", c),
        )
        async with anyio.create_task_group() as tg:
            await enter(tg, g, [leader])
            await park(tg, g, [quitter, patient])
            quitter.scope.cancel()
            await quitter.done.wait()
            assert quitter.cancelled and parked(g) == 1
            gate.set()
        assert b.calls == 0 and patient.got() is c.value
        assert g.stats().flights == 2 and len(g) == 0 and parked(g) == 0


async def test_slot_handed_to_a_caller_cancelled_in_that_step_goes_to_the_next() -> None:
    """forget() wakes the first parked caller, cancelled before it runs: the next gets the slot."""
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup(max_flights=1, on_limit="wait")
        gate = anyio.Event()
        b, c = AsyncLoader(name="b"), AsyncLoader(name="c")
        leader, first, second = (
            Caller(g, "a", AsyncLoader(name="a", gate=gate)),
            Caller(g, "b", b),
            Caller(g, "c", c),
        )
        async with anyio.create_task_group() as tg:
            await enter(tg, g, [leader])
            await park(tg, g, [first, second])
            g.forget("a")  # frees the slot: wakes `first`...
            first.scope.cancel()  # ...which is cancelled before it could take it
            # The unrelated flight of "a" still holds its gate: only a passed-on
            # slot lets `second` finish.
            await second.done.wait()
            assert second.got() is c.value and not leader.done.is_set()
            gate.set()
        assert first.cancelled and b.calls == 0


async def test_do_future_cancelled_while_waiting_for_a_slot_starts_nothing() -> None:
    with anyio.fail_after(WAIT):
        events: list[Event] = []
        g: AnyIOGroup[str, Token] = AnyIOGroup(
            max_flights=1, on_limit="wait", on_event=events.append
        )
        gate = anyio.Event()
        c = AsyncLoader(name="c")
        async with anyio.create_task_group() as tg:
            await enter(tg, g, [Caller(g, "a", AsyncLoader(name="a", gate=gate))])
            future = g.do_future("c", c)
            await until(lambda: parked(g) == 1)
            assert future.cancel() is True and future.cancelled() and future.done()
            assert future.cancel() is False
            await until(lambda: parked(g) == 0)
            gate.set()
        await spin()
        assert c.calls == 0 and "c" not in g and len(g) == 0
        assert [e for e in events if getattr(e, "key", None) == "c"] == []
        s = g.stats()
        assert (s.flights, s.calls, s.rejected, s.timeouts) == (1, 1, 0, 0)
        with pytest.raises(FutureCancelled):
            await future


async def test_do_future_cancelled_before_its_task_ran_starts_nothing() -> None:
    """The slot frees and the future is cancelled before its waiting task first runs."""
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup(max_flights=1, on_limit="wait")
        gate = anyio.Event()
        c = AsyncLoader(name="c")
        async with anyio.create_task_group() as tg:
            await enter(tg, g, [Caller(g, "a", AsyncLoader(name="a", gate=gate))])
            future = g.do_future("c", c)
            g.forget("a")  # the slot is free...
            assert future.cancel()  # ...but this caller has left
            await spin(20)
            gate.set()
        assert c.calls == 0 and g.stats().flights == 1 and parked(g) == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_run_ending_while_a_do_future_waits_for_a_slot_gives_aborted_error(backend: str) -> None:
    g: AnyIOGroup[str, Token] = AnyIOGroup(max_flights=1, on_limit="wait")
    futures: list[FlightFuture[Token]] = []

    async def main() -> None:
        with anyio.fail_after(WAIT):
            g.do_future("a", AsyncLoader(name="a", gate=anyio.Event()))  # never set
            futures.append(g.do_future("b", never_called))
            await until(lambda: parked(g) == 1)

    anyio.run(main, backend=backend)
    assert isinstance(futures[0].exception(), AbortedError) and len(g) == 0


# -- timeout and loader_timeout ------------------------------------------------------------


async def test_timeout_callers_leave_the_flight_goes_on() -> None:
    """Leader and a joiner time out; the loader runs on for a do_future joiner and a late one."""
    with anyio.fail_after(WAIT):
        events: list[Event] = []
        g: AnyIOGroup[str, Token] = AnyIOGroup(timeout=0.3, on_event=events.append)
        gate = anyio.Event()
        loader = AsyncLoader(name="v", gate=gate)
        leader, joiner = Caller(g, "k", loader), Caller(g, "k", never_called, "do_result")
        async with anyio.create_task_group() as tg:
            await enter(tg, g, [leader, joiner])
            future = g.do_future("k", never_called)  # not bound by timeout
            await leader.done.wait()
            await joiner.done.wait()
        for c in (leader, joiner):
            err = c.error
            assert isinstance(err, WaitTimeoutError) and isinstance(err, TimeoutError)
            assert "'k'" in str(err) and "timeout=0.3" in str(err)
        assert joiner.result is None  # a caller's own timeout is raised, not a Result
        assert "k" in g and not loader.cancelled.is_set() and not future.done()
        late = Caller(g, "k", never_called, "do_result")
        async with anyio.create_task_group() as tg:
            await enter(tg, g, [late])
            gate.set()
        assert await future is loader.value and late.result == Result(loader.value, None, True)
        assert loader.calls == 1 and len(g) == 0
        s = g.stats()
        assert (s.timeouts, s.flights, s.joins, s.errors, s.aborted) == (2, 1, 3, 0, 0)
        timed_out = [e for e in events if isinstance(e, TimedOut)]
        assert len(timed_out) == 2 and all(e.key == "k" for e in timed_out)
        assert all(0.3 * 0.99 <= e.waited < 0.3 + 2.0 for e in timed_out)
        kinds = [type(e) for e in events]
        assert kinds == [FlightStarted, Joined, Joined, TimedOut, TimedOut, Joined, FlightFinished]
        assert isinstance(events[-1], FlightFinished) and events[-1].callers == 4


async def test_timeout_of_the_last_caller_with_cancel_orphaned_cancels_the_loader() -> None:
    with anyio.fail_after(WAIT):
        events: list[Event] = []
        g: AnyIOGroup[str, Token] = AnyIOGroup(
            timeout=0.1, cancel_orphaned=True, on_event=events.append
        )
        loader = AsyncLoader(name="v", gate=anyio.Event())
        with pytest.raises(WaitTimeoutError):
            await g.do("k", loader)
        await loader.cancelled.wait()
        await until(lambda: g.stats().aborted == 1)
        s = g.stats()
        assert (s.timeouts, s.aborted, s.flights, s.in_flight) == (1, 1, 1, 0)
        assert [type(e) for e in events] == [FlightStarted, TimedOut, FlightAborted]


async def test_timeout_is_one_deadline_for_the_slot_and_the_outcome() -> None:
    """A caller that waited most of its timeout for a slot has only the rest for the outcome."""
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup(max_flights=1, on_limit="wait", timeout=1.0)
        gate = anyio.Event()
        b = AsyncLoader(name="b", gate=anyio.Event())  # never set
        got: list[BaseException] = []
        begun = anyio.current_time()

        async def call_b() -> None:
            try:
                await g.do("b", b)
            except WaitTimeoutError as exc:
                got.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(g.do_result, "a", AsyncLoader(name="a", gate=gate))
            await until(lambda: "a" in g)
            tg.start_soon(call_b)
            await until(lambda: parked(g) == 1)
            await anyio.sleep(0.8)
            gate.set()  # the slot frees at ~0.8 s; b's flight starts, then b times out
            await b.started.wait()
        took = anyio.current_time() - begun
        assert len(got) == 1 and b.calls == 1
        # A fresh timeout after the slot wait would make it ~1.8 s.
        assert 1.0 * 0.99 <= took < 1.6, took
        assert g.stats().timeouts == 1


async def test_timeout_while_waiting_for_a_slot() -> None:
    with anyio.fail_after(WAIT):
        events: list[Event] = []
        g: AnyIOGroup[str, Token] = AnyIOGroup(
            max_flights=1, on_limit="wait", timeout=0.2, on_event=events.append
        )
        gate = anyio.Event()
        a, b = AsyncLoader(name="a", gate=gate), AsyncLoader(name="b")
        leader = Caller(g, "a", a)
        async with anyio.create_task_group() as tg:
            await enter(tg, g, [leader])
            with pytest.raises(WaitTimeoutError) as info:
                await g.do("b", b)
            assert "'b'" in str(info.value) and b.calls == 0 and "b" not in g
            assert parked(g) == 0
            future = g.do_future("b", b)  # bound by timeout while it waits for a slot
            with pytest.raises(WaitTimeoutError):
                await future
            assert isinstance(future.exception(), WaitTimeoutError)
            await leader.done.wait()
        assert isinstance(leader.got(), WaitTimeoutError) and "a" in g  # its loader runs on
        s = g.stats()
        assert (s.timeouts, s.flights, s.rejected) == (3, 1, 0)
        assert sorted(str(e.key) for e in events if isinstance(e, TimedOut)) == ["a", "b", "b"]
        gate.set()
        await until(lambda: len(g) == 0)
        assert await g.do("b", b) is b.value


async def test_do_future_with_a_free_slot_is_not_bound_by_timeout() -> None:
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup(timeout=0.05, max_flights=4, on_limit="wait")
        gate = anyio.Event()
        loader = AsyncLoader(name="v", gate=gate)
        future = g.do_future("k", loader)
        await anyio.sleep(0.2)
        gate.set()
        assert await future is loader.value and g.stats().timeouts == 0


async def test_loader_timeout_fails_the_flight_for_every_caller_and_frees_its_slot() -> None:
    with anyio.fail_after(WAIT):
        events: list[Event] = []
        g: AnyIOGroup[str, Token] = AnyIOGroup(
            loader_timeout=0.2, max_flights=1, on_limit="wait", on_event=events.append
        )
        loader = AsyncLoader(name="slow", gate=anyio.Event())  # never set
        begun = anyio.current_time()
        callers = [Caller(g, "k", loader), Caller(g, "k", never_called, "do_result")]
        parked_one = Caller(g, "other", AsyncLoader(name="other"))
        async with anyio.create_task_group() as tg:
            await enter(tg, g, callers)
            future = g.do_future("k", never_called)
            await park(tg, g, [parked_one])
        assert anyio.current_time() - begun >= 0.2 * 0.99
        err = callers[0].got()
        assert type(err) is TimeoutError and not isinstance(err, WaitTimeoutError | AbortedError)
        assert "loader_timeout=0.2" in str(err) and "'k'" in str(err)
        assert callers[1].result is not None and callers[1].result.shared
        assert same_error(callers[1].result.error, err)
        assert same_error(future.exception(), err)
        with pytest.raises(TimeoutError) as info:
            await future
        assert info.value is future.exception()
        assert loader.cancelled.is_set() and isinstance(parked_one.got(), Token)
        s = g.stats()
        assert (s.errors, s.aborted, s.timeouts, s.flights, s.joins) == (1, 0, 0, 2, 2)
        failed = [e for e in events if isinstance(e, FlightFailed)]
        assert len(failed) == 1 and failed[0].error is err and failed[0].duration >= 0.2 * 0.99
        fast = AsyncLoader(name="fast")
        assert await g.do("k", fast) is fast.value


async def test_loader_timeout_passes_the_loaders_own_timeout_error_through() -> None:
    with anyio.fail_after(WAIT):
        own = TimeoutError("upstream timed out")
        g: AnyIOGroup[str, Token] = AnyIOGroup(loader_timeout=1.0)
        with pytest.raises(TimeoutError) as info:
            await g.do("k", AsyncLoader(name="s", raises=own))
        assert info.value is own
        # A caller's timeout shorter than loader_timeout is still a WaitTimeoutError...
        g2: AnyIOGroup[str, Token] = AnyIOGroup(loader_timeout=5.0, timeout=0.1)
        with pytest.raises(WaitTimeoutError):
            await g2.do("k", AsyncLoader(name="w", gate=anyio.Event()))
        # ... and a loader_timeout shorter than the caller's timeout a plain TimeoutError.
        g3: AnyIOGroup[str, Token] = AnyIOGroup(loader_timeout=0.1, timeout=5.0)
        with pytest.raises(TimeoutError) as info:
            await g3.do("k", AsyncLoader(name="w", gate=anyio.Event()))
        assert not isinstance(info.value, WaitTimeoutError) and "loader_timeout" in str(info.value)
        assert (g3.stats().timeouts, g3.stats().errors) == (0, 1)


# -- do_future -------------------------------------------------------------------------------


async def test_do_future_happy_path_one_flight_for_futures_and_callers() -> None:
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup()
        gate = anyio.Event()
        loader = AsyncLoader(gate=gate)
        first = g.do_future("k", loader)
        futures = [first, g.do_future("k", never_called)]
        assert not first.done() and not first.cancelled() and "pending" in repr(first)
        with pytest.raises(InvalidStateError):
            first.result()
        caller = Caller(g, "k", never_called, "do_result")
        async with anyio.create_task_group() as tg:
            await enter(tg, g, [caller])
            gate.set()
            # Awaited from other tasks too, and more than once.
            for f in futures:
                tg.start_soon(f.wait)
        assert all(f.done() and f.result() is loader.value for f in futures)
        assert [await f for f in futures] == [loader.value] * 2
        assert first.exception() is None and "done" in repr(first)
        assert caller.result == Result(loader.value, None, True) and loader.calls == 1
        s = g.stats()
        assert (s.flights, s.joins, s.shared, s.in_flight) == (1, 2, 1, 0)
        assert s.wait_seconds > 0


@pytest.mark.parametrize("error", [Boom("x"), Stop()], ids=["exception", "base_exception"])
async def test_do_future_error_is_the_flights(error: BaseException) -> None:
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup()
        gate = anyio.Event()
        futures = [
            g.do_future("k", AsyncLoader(gate=gate, raises=error)),
            g.do_future("k", never_called),
        ]
        gate.set()
        for f in futures:
            with pytest.raises(Exception) as info:
                await f
            assert info.value is f.exception()
            if isinstance(error, Boom):
                assert same_error(info.value, error)
            else:
                assert isinstance(info.value, AbortedError) and info.value.__cause__ is error
        # The future of the call that started the flight holds the loader's exception;
        # the other an equal copy of its own.
        assert futures[0].exception() is not futures[1].exception()
        assert same_error(futures[1].exception(), futures[0].exception())  # type: ignore[arg-type]
        if isinstance(error, Boom):
            assert futures[0].exception() is error


async def test_do_future_cancel_leaves_the_flight_to_the_others() -> None:
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup(cancel_orphaned=True)
        gate = anyio.Event()
        loader = AsyncLoader(gate=gate)
        leaver, stayer = g.do_future("k", loader), g.do_future("k", never_called)
        waiting: list[BaseException] = []

        async def await_it() -> None:
            try:
                await leaver
            except FutureCancelled as exc:
                waiting.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(await_it)
            await spin()
            assert leaver.cancel() is True  # wakes its awaiter
        assert len(waiting) == 1 and leaver.cancelled() and "cancelled" in repr(leaver)
        with pytest.raises(FutureCancelled):
            leaver.result()
        with pytest.raises(FutureCancelled):
            leaver.exception()
        await spin()
        assert not loader.cancelled.is_set() and "k" in g
        gate.set()
        assert await stayer is loader.value and leaver.cancelled()


async def test_do_future_cancelled_awaiter_cancels_it_and_last_one_aborts_the_loader() -> None:
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, Token] = AnyIOGroup(cancel_orphaned=True)
        loader = AsyncLoader(gate=anyio.Event())  # never set
        future = g.do_future("k", loader)
        await loader.started.wait()
        with anyio.move_on_after(0.01) as scope:
            await future
        assert scope.cancelled_caught and future.cancelled()
        await loader.cancelled.wait()
        await until(lambda: g.stats().aborted == 1)
        assert len(g) == 0 and not loader.finished.is_set()


async def test_do_future_usage_errors_raised_at_once() -> None:
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[Any, Any] = AnyIOGroup(max_flights=1, on_limit="wait")
        with pytest.raises(TypeError, match="hashable"):
            g.do_future(["list"], AsyncLoader())
        with pytest.raises(TypeError, match="fn must be callable"):
            g.do_future("k", 42)  # type: ignore[arg-type]

        async def reentrant() -> str:
            with pytest.raises(RuntimeError, match="'self-key'"):
                g.do_future("self-key", AsyncLoader())
            return "outer"

        assert await g.do("self-key", reentrant) == "outer"
        assert len(g) == 0 and g.stats().calls == 1


def test_do_future_outside_any_event_loop_says_so() -> None:
    g: AnyIOGroup[str, Token] = AnyIOGroup()
    with pytest.raises(RuntimeError, match="asyncio event loop or trio"):
        g.do_future("k", AsyncLoader())


# -- options ---------------------------------------------------------------------------------

BAD_OPTIONS: list[tuple[str, object]] = [
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
    ("loader_timeout", 0),
    ("loader_timeout", -0.5),
    ("loader_timeout", "1"),
    ("loader_timeout", True),
    ("loader_timeout", float("nan")),
]


@pytest.mark.parametrize(
    ("option", "value"), BAD_OPTIONS, ids=[f"{o}={v!r}" for o, v in BAD_OPTIONS]
)
def test_bad_limit_and_timeout_options_are_refused_naming_them(option: str, value: object) -> None:
    with pytest.raises((TypeError, ValueError)) as info:
        AnyIOGroup(**{option: value})  # type: ignore[arg-type]
    assert option in str(info.value) and repr(value) in str(info.value)


def test_good_limit_and_timeout_options_are_accepted() -> None:
    g: AnyIOGroup[str, Token] = AnyIOGroup(
        max_flights=1, on_limit="wait", timeout=0.5, loader_timeout=2
    )
    s = g.stats()
    assert (s.timeouts, s.rejected, s.in_flight) == (0, 0, 0)
    AnyIOGroup(max_flights=10**6, on_limit="raise", timeout=1)


# -- stress ----------------------------------------------------------------------------------

STRESS_KEYS = [f"k{i}" for i in range(6)]


async def _stress(seed: int, cancel_orphaned: bool, n: int) -> Counter[str]:
    rng = random.Random(seed)
    g: AnyIOGroup[str, Token] = AnyIOGroup(cancel_orphaned=cancel_orphaned)
    flight_no = iter(range(10**9))
    values: dict[int, Token] = {}
    running: Counter[str] = Counter()
    problems: list[str] = []
    counts: Counter[str] = Counter()
    per_flight: Counter[int] = Counter()

    def make(key: str, behaviour: str, delay: float) -> Callable[[], Awaitable[Token]]:
        async def fn() -> Token:
            fid = next(flight_no)
            counts["loader"] += 1
            running[key] += 1
            # An abandoned loader may still be unwinding when the next flight starts.
            if running[key] > 1 and "forget" not in key and not cancel_orphaned:
                problems.append(f"two loaders at once for {key}")
            try:
                try:
                    await anyio.sleep(delay)
                except anyio.get_cancelled_exc_class():
                    counts["loader_cancelled"] += 1
                    raise
                if behaviour == "raise":
                    raise Boom(key, fid)
                if behaviour == "abort":
                    raise Stop
                if key.startswith("alone-"):
                    counts["abandoned_finished"] += 1
                token = Token(f"{key}#{fid}")
                token.key = key  # type: ignore[attr-defined]
                token.fid = fid  # type: ignore[attr-defined]
                values[fid] = token
                return token
            finally:
                running[key] -= 1

        return fn

    async def caller(i: int) -> None:
        await anyio.sleep(rng.uniform(0, 0.05))
        key = rng.choice([*STRESS_KEYS, "forget-a", "forget-b"])
        if key.startswith("forget") and rng.random() < 0.3:
            (g.forget if rng.random() < 0.5 else g.forget_unshared)(key)
        behaviour = rng.choices(["ok", "raise", "abort"], [10, 4, 2])[0]
        delay = rng.uniform(0, 0.01)
        entry = rng.choice(["do", "do_result"])
        cancel = rng.choice([None, None, "scope", "move_on_after"])
        if i % 25 == 0:  # a sure abandonment: a lone caller that leaves long before its loader
            key, behaviour, delay, cancel = f"alone-{i}", "ok", 0.05, "move_on_after"
        elif i % 25 in (1, 2):
            # A sure abort and a sure error: a lone caller that stays.  Whether a
            # random flight aborts (or fails) depends on which caller leads it
            # and whether all of its callers left, which the load decides.
            behaviour = "abort" if i % 25 == 1 else "raise"
            key, delay, cancel = f"sure-{behaviour}-{i}", rng.uniform(0, 0.01), None
        fn = make(key, behaviour, delay)
        got: Any = None
        with anyio.CancelScope() as scope:
            if cancel == "scope":
                async with anyio.create_task_group() as tg:

                    async def killer() -> None:
                        await anyio.sleep(rng.uniform(0, 0.003))
                        scope.cancel()

                    tg.start_soon(killer)
                    got = await _call(g, entry, key, fn)
                    tg.cancel_scope.cancel()
            elif cancel == "move_on_after":
                with anyio.move_on_after(0.001 if i % 25 == 0 else rng.uniform(0, 0.003)) as inner:
                    got = await _call(g, entry, key, fn)
                if inner.cancelled_caught:
                    counts["cancelled"] += 1
                    return
            else:
                got = await _call(g, entry, key, fn)
        if scope.cancelled_caught:
            counts["cancelled"] += 1
            return
        if isinstance(got, Result):
            counts["shared"] += got.shared
            got = got.value if got.error is None else got.error
        if key.startswith("sure-"):
            expected = AbortedError if behaviour == "abort" else Boom
            if not isinstance(got, expected):
                problems.append(f"{key} got {got!r}, not {expected.__name__}")
            counts[key.rsplit("-", 1)[0]] += 1
        if isinstance(got, Token):
            if got.key != key or values.get(got.fid) is not got:  # type: ignore[attr-defined]
                problems.append(f"wrong value {got!r} for {key}")
            per_flight[got.fid] += 1  # type: ignore[attr-defined]
            counts["value"] += 1
        elif isinstance(got, Boom):
            if got.args[0] != key:
                problems.append(f"wrong error {got!r} for {key}")
            counts["error"] += 1
        elif isinstance(got, AbortedError):
            if got.key != key:
                problems.append(f"wrong abort {got!r} for {key}")
            counts["aborted"] += 1
        else:
            problems.append(f"unexpected outcome {got!r}")

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(caller, i)
    await until(lambda: len(g) == 0 and sum(running.values()) == 0)
    assert problems == []
    assert not any(k in g for k in STRESS_KEYS)
    s = g.stats()
    assert s.calls == n and s.flights >= counts["loader"]
    assert s.aborted >= counts["sure-abort"] and s.errors >= counts["sure-raise"]
    counts["never_started"] = s.flights - counts["loader"]  # abandoned before their first step
    counts["flights"] = s.flights
    counts["coalesced"] = max(per_flight.values(), default=0)
    return counts


async def _call(g: AnyIOGroup[str, Token], entry: str, key: str, fn: Any) -> Any:
    try:
        if entry == "do":
            return await g.do(key, fn)
        return await g.do_result(key, fn)
    except (Boom, AbortedError) as exc:
        return exc


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cancel_orphaned", [False, True])
async def test_stress_random_cancellations_and_errors(seed: int, cancel_orphaned: bool) -> None:
    with anyio.fail_after(30):
        counts = await _stress(seed, cancel_orphaned, 400)
    # Every sure abort and error reached its caller as such (a wrong outcome is
    # one of the problems _stress asserts away); the random ones add to them.
    assert counts["sure-abort"] == counts["sure-raise"] == 400 // 25
    assert counts["aborted"] >= counts["sure-abort"] and counts["error"] >= counts["sure-raise"]
    assert counts["value"] and counts["cancelled"]
    assert counts["shared"] and counts["coalesced"] >= 2
    assert counts["flights"] < 400
    if cancel_orphaned:
        assert counts["loader_cancelled"] + counts["never_started"] > 0
    else:
        assert counts["loader_cancelled"] == counts["never_started"] == 0
        assert counts["abandoned_finished"] >= 400 // 25


async def test_forget_from_another_thread_lets_a_slot_waiter_in() -> None:
    """forget() from outside the run frees the slot at once: the waiter is woken in its run."""
    with anyio.fail_after(WAIT):
        g: AnyIOGroup[str, str] = AnyIOGroup(max_flights=1, on_limit="wait")
        gate = anyio.Event()
        got: dict[str, str] = {}

        async def hold(key: str) -> str:
            await gate.wait()
            return key

        async def quick(key: str) -> str:
            return key

        async def call(key: str, fn: Callable[[str], Awaitable[str]]) -> None:
            got[key] = await g.do(key, fn, key)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "a", hold)
            await until(lambda: "a" in g)
            tg.start_soon(call, "b", quick)
            await until(lambda: parked(g) == 1)
            await anyio.to_thread.run_sync(g.forget, "a")  # from outside any run
            await until(lambda: "b" in got)  # b got the slot while a still runs
            assert "a" not in got
            gate.set()
        assert got == {"a": "a", "b": "b"}
        assert g.stats().flights == 2 and len(g) == 0
