"""AsyncGroup, the asyncio driver: what only asyncio has.

The contract every group keeps is in tests/groups/test_contract.py; this file has what is
particular to asyncio: the loader's own task and cancellation (``cancel_orphaned``),
loaders that never suspend (eager tasks on 3.12+), asyncio futures, awaitables that are not
coroutines, several event loops, and a randomized stress run.

Every test runs real tasks on a real event loop (``asyncio.run``), under
``asyncio.timeout`` and a pytest-timeout mark, so a hang fails instead of
blocking.  Overlap between callers is made with ``asyncio.Event`` gates, not
sleeps.  No test may leave an exception nobody retrieved (checked once per module).

Entry points are exercised uniformly through :func:`start`, which returns the
future a user would cancel or await: the caller's task for ``do`` and
``do_result``, the returned future for ``do_future``.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import itertools
import logging
import random
import sys
import threading
import traceback
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest

from singleflight import AbortedError, AsyncGroup, Result
from singleflight.events import Event, FlightStarted

from .._support import (
    AsyncLoader,
    Boom,
    Meter,
    Stop,
    Token,
    no_unretrieved_exceptions,  # noqa: F401  (a fixture)
    run,
    same_error,
    spin,
)

pytestmark = [pytest.mark.timeout(15), pytest.mark.usefixtures("no_unretrieved_exceptions")]

EAGER = sys.version_info >= (3, 12)  # loader tasks start eagerly (Task(eager_start=True))
ENTRIES = ("do", "do_result", "do_future")


# -- helpers ---------------------------------------------------------------------------


async def start(g: AsyncGroup[Any, Any], entry: str, key: Any, fn: Any, *a: Any, **kw: Any) -> Any:
    """Begin a call through ``entry``; return the future a user would cancel or await.

    For ``do``/``do_result`` the caller's task is created and run up to its
    first suspension, so callers enter the group in the order they are started.
    """
    if entry == "do_future":
        fut = g.do_future(key, fn, *a, **kw)
        assert isinstance(fut, asyncio.Future)
        return fut
    task = asyncio.create_task(getattr(g, entry)(key, fn, *a, **kw))
    await asyncio.sleep(0)
    return task


@dataclass
class Outcome:
    """What one caller saw: a value, an error, the shared flag (do_result only), or cancellation."""

    value: Any = None
    error: BaseException | None = None
    shared: bool | None = None
    cancelled: bool = False


def outcome(entry: str, handle: asyncio.Future[Any]) -> Outcome:
    assert handle.done()
    if handle.cancelled():
        return Outcome(cancelled=True)
    exc = handle.exception()
    if exc is not None:
        assert entry != "do_result", f"do_result raised {exc!r} instead of returning a Result"
        return Outcome(error=exc)
    res = handle.result()
    if entry == "do_result":
        assert isinstance(res, Result), res
        if res.error is not None:
            assert res.value is None
        return Outcome(res.value, res.error, res.shared)
    return Outcome(value=res)


async def settle(calls: list[tuple[str, asyncio.Future[Any]]]) -> list[Outcome]:
    """Wait for every call and return what each caller saw."""
    await asyncio.wait([h for _, h in calls])
    return [outcome(entry, h) for entry, h in calls]


def never_retrieved(caplog: pytest.LogCaptureFixture) -> list[str]:
    gc.collect()
    return [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]


# -- the loader's own task ending it, eager loaders, abandoned futures, forget_unshared racing -


@pytest.mark.parametrize("entry", ENTRIES)
def test_loader_task_cancelling_itself_gives_every_caller_aborted_error(entry: str) -> None:
    """Go's TestGoexitDo, asyncio's way: the loader task cancels itself; 5 callers get
    AbortedError within 1 s."""

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()
        gate = asyncio.Event()
        calls = 0

        async def fn() -> None:
            nonlocal calls
            calls += 1
            await gate.wait()
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(10)

        async with asyncio.timeout(1):
            handles = [(entry, await start(g, entry, "key", fn)) for _ in range(5)]
            gate.set()
            outs = await settle(handles)
        assert calls == 1
        for o in outs:
            assert not o.cancelled  # no stray CancelledError in callers nobody cancelled
            assert isinstance(o.error, AbortedError)
            assert o.error.key == "key"
        assert len(g) == 0

    run(main())


@pytest.mark.parametrize("suspend", [False], ids=["never-suspends"])  # suspends: contract
@pytest.mark.parametrize("entry", ENTRIES)
def test_sequential_calls_are_not_cached_eager(entry: str, suspend: bool) -> None:
    """A loader that never suspends: sequential calls each run fn, shared False; the key is
    gone after each."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        for i in range(3):
            loader = AsyncLoader(name=f"run {i}", suspend=suspend)
            [got] = await settle([(entry, await start(g, entry, "k", loader))])
            assert got.value is loader.value
            assert loader.calls == 1
            if entry == "do_result":
                assert got.shared is False
            assert "k" not in g and len(g) == 0

    run(main())


@pytest.mark.parametrize("outcome_kind", ["value", "error"])
def test_abandoned_do_future_flight_still_finishes(outcome_kind: str) -> None:
    """A do_future nobody listens to still finishes; later callers are unaffected."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        gate = asyncio.Event()
        loader = AsyncLoader(gate=gate, raises=Boom() if outcome_kind == "error" else None)
        fut = g.do_future("k", loader)
        ref = weakref.ref(fut)
        del fut  # stop listening
        gc.collect()
        await loader.started.wait()
        assert "k" in g
        joiner = AsyncLoader(name="joiner")
        late = await start(g, "do_result", "k", joiner)  # joins the still-running flight
        gate.set()
        await loader.finished.wait()
        [got] = await settle([("do_result", late)])
        assert joiner.calls == 0
        if outcome_kind == "error":
            assert loader.raises is not None and same_error(got.error, loader.raises)
        else:
            assert got.value is loader.value
        assert got.shared is True
        await spin()
        del loader, late, got  # the error's traceback pins the flight while it lives
        gc.collect()
        assert ref() is None
        assert len(g) == 0
        after = AsyncLoader(name="after")
        assert await g.do("k", after) is after.value

    run(main())


@pytest.mark.parametrize("suspend", [True, False], ids=["suspends", "never-suspends"])
def test_abandoned_do_future_of_failed_flight_logs_nothing(
    suspend: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A dropped do_future of a failed flight logs no 'exception was never retrieved'.

    The same whether or not the loader suspended (on 3.12+ a loader that never
    suspends finishes inside do_future).
    """
    caplog.set_level(logging.ERROR, logger="asyncio")

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        loader = AsyncLoader(raises=Boom("dropped"), suspend=suspend)
        g.do_future("k", loader)  # dropped at once
        await spin()
        assert loader.calls == 1 and len(g) == 0

    run(main())
    assert never_retrieved(caplog) == []


@pytest.mark.parametrize("suspend", [False], ids=["never-suspends"])  # suspends: contract
@pytest.mark.parametrize("entry", ENTRIES)
def test_key_usable_after_failure_eager(entry: str, suspend: bool) -> None:
    """A loader that never suspends: after a failed flight the key is free at once: the next
    call runs fn and succeeds."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        bad = AsyncLoader(raises=Boom(), suspend=suspend)
        [got] = await settle([(entry, await start(g, entry, "k", bad))])
        assert got.error is bad.raises
        assert "k" not in g
        good = AsyncLoader(name="good", suspend=suspend)
        [got] = await settle([(entry, await start(g, entry, "k", good))])
        assert got.value is good.value and good.calls == 1

    run(main())


def test_do_and_forget_unshared_race() -> None:
    """Go's TestDoAndForgetUnsharedRace: forget_unshared after a shared do() never returns False."""

    async def main() -> None:
        g: AsyncGroup[str, None] = AsyncGroup()
        calls = 0

        async def fn() -> None:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.01)

        async def caller() -> bool:
            await g.do("key", fn)
            return g.forget_unshared("key")

        got = await asyncio.gather(*(caller() for _ in range(200)))
        assert calls == 1
        assert all(got)

    run(main())


# -- not a cache ----------------------------------------------------------------------------


@pytest.mark.parametrize("suspend", [False], ids=["never-suspends"])  # suspends: contract
def test_entry_removed_before_any_caller_sees_result(suspend: bool) -> None:
    """A loader that never suspends: when any caller sees the outcome, the key is already out
    of the group."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        seen: list[bool] = []

        async def watch(entry: str, fn: Any) -> None:
            if entry == "do_future":
                fut = g.do_future("k", fn)
                fut.add_done_callback(lambda _f: seen.append("k" in g))
                try:
                    await fut
                except Boom:
                    pass
            elif entry == "do":
                try:
                    await g.do("k", fn)
                except Boom:
                    pass
            else:
                await g.do_result("k", fn)
            seen.append("k" in g or len(g) != 0)

        for error in (None, Boom()):
            gate = asyncio.Event()
            loader = AsyncLoader(gate=None if not suspend else gate, raises=error, suspend=suspend)
            tasks = [asyncio.create_task(watch(ENTRIES[i % 3], loader)) for i in range(9)]
            await spin()
            gate.set()
            await asyncio.gather(*tasks)
        assert len(seen) == 2 * (9 + 3)
        assert not any(seen)

    run(main())


# -- forget -----------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
def test_abandoned_flight_cleanup_never_removes_newer_one(entry: str) -> None:
    """An abandoned loader's slow cancel never removes the next flight."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup(cancel_orphaned=True)
        meter = Meter()
        cleanup, gate_b = asyncio.Event(), asyncio.Event()
        a = AsyncLoader(name="a", gate=asyncio.Event(), cleanup=cleanup, meter=meter)
        b = AsyncLoader(name="b", gate=gate_b, meter=meter)
        c = AsyncLoader(name="c", meter=meter)
        ha = await start(g, entry, "k", a)
        await a.started.wait()
        ha.cancel()
        await a.cancelled.wait()  # A's loader is cancelled and now cleaning up
        assert "k" not in g
        hb = await start(g, entry, "k", b)
        await b.started.wait()
        cleanup.set()
        assert a.tasks[0] is not None
        await asyncio.wait([a.tasks[0]])
        await spin()
        assert a.tasks[0].cancelled()
        assert "k" in g  # A's end left B's entry alone
        hc = await start(g, "do_result", "k", c)
        gate_b.set()
        got_a, got_b, got_c = await settle([(entry, ha), (entry, hb), ("do_result", hc)])
        assert got_a.cancelled
        assert got_b.value is b.value and got_c.value is b.value and got_c.shared is True
        assert (a.calls, b.calls, c.calls) == (1, 1, 0)
        assert meter.peak <= 2

    run(main())


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
def test_error_traceback_small_with_100_waiters(entry: str) -> None:
    """100 callers get the exception (the first caller the object itself, the others an
    equal copy each), with the loader's frame and only a few frames."""

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()
        gate = asyncio.Event()
        err = Boom("shared")
        depths: list[int] = []
        seen: list[BaseException] = []

        async def failing_loader() -> None:
            await gate.wait()
            raise err

        async def caller() -> None:
            if entry == "do_result":
                e = (await g.do_result("k", failing_loader)).error
            else:
                try:
                    if entry == "do":
                        await g.do("k", failing_loader)
                    else:
                        await g.do_future("k", failing_loader)
                except Boom as exc:
                    e = exc
            assert same_error(e, err)
            seen.append(e)
            frames = traceback.extract_tb(e.__traceback__)
            assert "failing_loader" in [f.name for f in frames]
            depths.append(len(frames))

        tasks = [asyncio.create_task(caller()) for _ in range(100)]
        await spin()
        gate.set()
        await asyncio.gather(*tasks)
        assert len(depths) == 100
        assert max(depths) <= 10, depths  # peers: up to 202-402 frames
        assert len({id(e) for e in seen}) == 100 and sum(e is err for e in seen) <= 1
        assert len(traceback.extract_tb(err.__traceback__)) <= 10
        assert len(g) == 0

    run(main())


# -- cancellation -----------------------------------------------------------------------------


@pytest.mark.parametrize("suspend", [True, False], ids=["suspends", "never-suspends"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_loader_runs_in_its_own_task_from_first_line(entry: str, suspend: bool) -> None:
    """Current_task() at the loader's first line is never a caller's task."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        me = asyncio.current_task()
        alone = AsyncLoader(suspend=suspend)
        if entry == "do_future":
            assert await g.do_future("k", alone) is alone.value
        else:
            await getattr(g, entry)("k", alone)
        assert alone.tasks[0] is not None and alone.tasks[0] is not me
        gate = asyncio.Event()
        shared = AsyncLoader(gate=gate)
        handles = [await start(g, e, "k2", shared) for e in ENTRIES for _ in range(2)]
        await shared.started.wait()
        gate.set()
        await asyncio.wait(handles)
        assert shared.calls == 1
        assert shared.tasks[0] is not None and shared.tasks[0] is not me
        assert all(shared.tasks[0] is not h for h in handles)

    run(main())


@pytest.mark.parametrize("cancel_orphaned", [False, True])
@pytest.mark.parametrize("leader_entry", ENTRIES)
def test_cancel_leader_others_unaffected(leader_entry: str, cancel_orphaned: bool) -> None:
    """Cancelling the first caller leaves the loader and every other caller alone."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup(cancel_orphaned=cancel_orphaned)
        gate = asyncio.Event()
        loader = AsyncLoader(gate=gate)
        leader = await start(g, leader_entry, "k", loader)
        await loader.started.wait()
        others = [(e, await start(g, e, "k", AsyncLoader(name="j"))) for e in ENTRIES]
        assert leader.cancel()
        await spin()
        assert leader.cancelled()
        assert not loader.cancelled.is_set()
        assert "k" in g
        gate.set()
        outs = await settle(others)
        assert all(o.value is loader.value and not o.cancelled for o in outs)
        assert loader.calls == 1 and not loader.cancelled.is_set()
        with pytest.raises(asyncio.CancelledError):
            await leader

    run(main())


@pytest.mark.parametrize("cancel_orphaned", [False, True])
@pytest.mark.parametrize("victim_entry", ENTRIES)
def test_cancel_one_waiter_others_unaffected(victim_entry: str, cancel_orphaned: bool) -> None:
    """A cancelled waiter alone raises CancelledError; the leader and the rest get the value."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup(cancel_orphaned=cancel_orphaned)
        gate = asyncio.Event()
        loader = AsyncLoader(gate=gate)
        calls = [(e, await start(g, e, "k", loader)) for e in ENTRIES]
        await loader.started.wait()
        victim = await start(g, victim_entry, "k", AsyncLoader(name="victim"))
        calls += [(e, await start(g, e, "k", AsyncLoader(name="j"))) for e in ENTRIES]
        victim.cancel()
        await spin()
        gate.set()
        outs = await settle(calls)
        assert all(o.value is loader.value for o in outs)
        assert outcome(victim_entry, victim).cancelled
        assert loader.calls == 1 and not loader.cancelled.is_set()

    run(main())


@pytest.mark.parametrize("leader_entry", ENTRIES)
def test_cancel_all_callers_default_loader_runs_on(leader_entry: str) -> None:
    """With cancel_orphaned=False, every caller cancelled, the loader still finishes."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        gate = asyncio.Event()
        loader = AsyncLoader(gate=gate)
        handles = [await start(g, leader_entry, "k", loader)]
        await loader.started.wait()
        handles += [await start(g, e, "k", AsyncLoader(name="j")) for e in ENTRIES]
        for h in handles:
            h.cancel()
        await spin()
        assert all(h.cancelled() for h in handles)
        assert not loader.cancelled.is_set()
        assert "k" in g  # the flight runs on; a new caller joins it
        late = AsyncLoader(name="late")
        joined = await start(g, "do_result", "k", late)
        gate.set()
        await loader.finished.wait()
        [got] = await settle([("do_result", joined)])
        assert got.value is loader.value and late.calls == 0
        assert loader.calls == 1 and not loader.cancelled.is_set()
        await spin()
        assert len(g) == 0
        fresh = AsyncLoader(name="fresh")
        assert await g.do("k", fresh) is fresh.value

    run(main())


@pytest.mark.parametrize("leader_entry", ENTRIES)
def test_cancel_all_callers_cancel_orphaned_cancels_loader(leader_entry: str) -> None:
    """With cancel_orphaned=True, the loader is cancelled when its last caller leaves."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup(cancel_orphaned=True)
        loader = AsyncLoader(gate=asyncio.Event())
        handles = [await start(g, leader_entry, "k", loader)]
        await loader.started.wait()
        handles += [await start(g, e, "k", AsyncLoader(name="j")) for e in ENTRIES]
        for h in handles[:-1]:
            h.cancel()
            await spin()
            assert not loader.cancelled.is_set()  # a caller remains
            assert "k" in g
        handles[-1].cancel()
        await loader.cancelled.wait()
        assert "k" not in g and len(g) == 0
        assert loader.tasks[0] is not None
        await asyncio.wait([loader.tasks[0]])
        assert loader.tasks[0].cancelled()
        assert all(h.cancelled() for h in handles)
        fresh = AsyncLoader(name="fresh")
        outs = await settle([(e, await start(g, e, "k", fresh)) for e in ENTRIES])
        assert [o.value for o in outs] == [fresh.value] * 3
        assert fresh.calls == 1 and loader.calls == 1

    run(main())


def _abort_loader(how: str, gate: asyncio.Event, tasks: list[asyncio.Task[Any]]) -> Any:
    async def fn() -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        if how == "raise_first_line":
            raise asyncio.CancelledError
        await gate.wait()
        if how == "raise":
            raise asyncio.CancelledError
        if how == "self_cancel":
            task.cancel()
            await asyncio.sleep(10)
        await asyncio.sleep(10)  # "external": cancelled by the test

    return fn


@pytest.mark.parametrize("how", ["raise", "self_cancel", "external", "raise_first_line"])
def test_loader_task_ending_cancelled_gives_aborted_error(how: str) -> None:
    """A loader task ending cancelled gives every caller AbortedError."""

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()
        gate = asyncio.Event()
        tasks: list[asyncio.Task[Any]] = []
        fn = _abort_loader(how, gate, tasks)
        if how == "raise_first_line":  # single callers: may finish inside do() on 3.12+
            calls = []
            for e in ENTRIES:
                calls.append((e, await start(g, e, "k", fn)))
                await asyncio.wait([calls[-1][1]])
        else:
            calls = [(e, await start(g, e, "k", fn)) for e in ENTRIES * 2]
            await spin()
            assert len(tasks) == 1
            if how == "external":
                tasks[0].cancel()
            gate.set()
        outs = await settle(calls)
        for (entry, _), o in zip(calls, outs, strict=True):
            assert not o.cancelled, entry
            assert isinstance(o.error, AbortedError), (entry, o)
            assert isinstance(o.error, Exception)
            assert o.error.key == "k"
            if entry == "do_result":
                assert o.value is None
                assert o.shared is (how != "raise_first_line")
        assert all(t.cancelled() for t in tasks)
        assert len(g) == 0
        good = AsyncLoader(name="good")
        assert await g.do("k", good) is good.value

    run(main())


@pytest.mark.parametrize("suspend", [False], ids=["never-suspends"])  # suspends: contract
@pytest.mark.parametrize("entry", ENTRIES)
def test_loader_base_exception_gives_aborted_error(entry: str, suspend: bool) -> None:
    """A loader stopped by a non-Exception BaseException gives AbortedError caused by it."""

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()
        stop = Stop("halt")
        loader = AsyncLoader(raises=stop, suspend=suspend)
        try:
            [got] = await settle([(entry, await start(g, entry, "k", loader))])
        except Stop:
            pytest.fail(f"{entry}: the loader's raw {stop!r} escaped to the caller")
        assert isinstance(got.error, AbortedError), got
        assert got.error.__cause__ is stop
        assert len(g) == 0

    run(main())


@pytest.mark.parametrize("cancel_orphaned", [False, True])
def test_caller_timeouts_leave_others_unaffected(cancel_orphaned: bool) -> None:
    """Timeout / wait_for time out one caller each; the others get the value."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup(cancel_orphaned=cancel_orphaned)
        gate = asyncio.Event()
        loader = AsyncLoader(gate=gate)

        async def with_timeout() -> Token:
            async with asyncio.timeout(0.01):
                return await g.do("k", loader)

        timed = asyncio.create_task(with_timeout())
        await loader.started.wait()
        staying = [(e, await start(g, e, "k", AsyncLoader(name="j"))) for e in ENTRIES]
        with pytest.raises(TimeoutError):
            await timed
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(g.do("k", AsyncLoader(name="j")), 0.01)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(g.do_result("k", AsyncLoader(name="j")), 0.01)
        fut = g.do_future("k", AsyncLoader(name="j"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fut, 0.01)
        assert fut.cancelled()
        shielded = g.do_future("k", AsyncLoader(name="j"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(shielded), 0.01)
        assert not shielded.done()
        await spin()
        assert not loader.cancelled.is_set()
        gate.set()
        outs = await settle([*staying, ("do_future", shielded)])
        assert all(o.value is loader.value for o in outs)
        assert loader.calls == 1 and not loader.cancelled.is_set()

    run(main())


@pytest.mark.parametrize("cancel_orphaned", [False, True])
def test_sole_caller_timeout(cancel_orphaned: bool) -> None:
    """A lone caller times out: the loader runs on, or is cancelled (cancel_orphaned)."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup(cancel_orphaned=cancel_orphaned)
        gate = asyncio.Event()
        loader = AsyncLoader(gate=gate)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(g.do("k", loader), 0.01)
        await spin()
        if cancel_orphaned:
            await loader.cancelled.wait()
            assert "k" not in g
        else:
            assert "k" in g and not loader.cancelled.is_set()
            gate.set()
            await loader.finished.wait()
        await spin()
        assert len(g) == 0
        fresh = AsyncLoader(name="fresh")
        assert await g.do("k", fresh) is fresh.value

    run(main())


# -- do_future ------------------------------------------------------------------------------


def test_do_future_returns_at_once_a_future_per_caller() -> None:
    """Do_future is not a coroutine, returns a pending asyncio.Future at once, one per caller."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        assert not inspect.iscoroutinefunction(g.do_future)
        gate = asyncio.Event()
        loader = AsyncLoader(gate=gate)
        futs = [g.do_future("k", loader) for _ in range(4)]
        assert all(isinstance(f, asyncio.Future) and not f.done() for f in futs)
        assert len({id(f) for f in futs}) == 4
        assert loader.calls == 1
        futs[1].cancel()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(futs[2], 0.01)
        await spin()
        assert not loader.cancelled.is_set()
        gate.set()
        assert await futs[0] is loader.value
        assert await futs[3] is loader.value
        assert futs[1].cancelled() and futs[2].cancelled()

    run(main())


@pytest.mark.parametrize("suspend", [True, False], ids=["suspends", "never-suspends"])
def test_do_future_of_loader_finishing_at_once(suspend: bool) -> None:
    """A loader that never suspends still gives do_future a future of its own."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        loader = AsyncLoader(suspend=suspend)
        f1 = g.do_future("k", loader)
        assert isinstance(f1, asyncio.Future)
        # 3.12+ starts the loader eagerly: one that never suspends is done already.
        assert f1.done() is (EAGER and not suspend)
        assert await f1 is loader.value
        loader2 = AsyncLoader(name="2", suspend=suspend)
        f2 = g.do_future("k", loader2)
        assert f2 is not f1
        assert await f2 is loader2.value
        assert len(g) == 0

    run(main())


@pytest.mark.parametrize("cancel_orphaned", [False, True])
def test_cancelling_every_do_future_future(cancel_orphaned: bool) -> None:
    """Cancelling all do_future futures cancels the loader only with cancel_orphaned=True."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup(cancel_orphaned=cancel_orphaned)
        gate = asyncio.Event()
        loader = AsyncLoader(gate=gate)
        futs = [g.do_future("k", loader) for _ in range(3)]
        await loader.started.wait()
        futs[0].cancel()
        futs[1].cancel()
        await spin()
        assert not loader.cancelled.is_set()
        futs[2].cancel()
        if cancel_orphaned:
            await loader.cancelled.wait()
            assert "k" not in g
        else:
            await spin()
            assert not loader.cancelled.is_set()
            gate.set()
            await loader.finished.wait()
        await spin()
        assert len(g) == 0
        fresh = AsyncLoader(name="fresh")
        assert await g.do_future("k", fresh) is fresh.value

    run(main())


def test_do_future_outside_event_loop_raises() -> None:
    """Do_future needs a running loop: RuntimeError, and fn is not called."""
    g: AsyncGroup[str, Token] = AsyncGroup()
    calls = 0

    def fn() -> Any:
        nonlocal calls
        calls += 1
        return asyncio.sleep(0)

    with pytest.raises(RuntimeError):
        g.do_future("k", fn)
    assert calls == 0 and len(g) == 0


# -- re-entrancy ------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["first_line", "after_await"])
@pytest.mark.parametrize("inner", ENTRIES)
@pytest.mark.parametrize("outer", ENTRIES)
def test_loader_calling_own_key_gets_runtime_error(outer: str, inner: str, phase: str) -> None:
    """A loader calling its own key gets RuntimeError naming the key; no deadlock."""
    key = ("self", 42)

    async def main() -> None:
        g: AsyncGroup[Any, str] = AsyncGroup()
        caught: list[RuntimeError] = []
        other = AsyncLoader(name="must not run")

        async def loader() -> str:
            if phase == "after_await":
                await asyncio.sleep(0)
            try:
                if inner == "do_future":
                    g.do_future(key, other)
                else:
                    await getattr(g, inner)(key, other)
            except RuntimeError as exc:
                caught.append(exc)
            return "outer"

        [got] = await settle([(outer, await start(g, outer, key, loader))])
        assert got.value == "outer"
        assert len(caught) == 1
        assert repr(key) in str(caught[0])
        assert other.calls == 0
        assert len(g) == 0
        again = AsyncLoader(name="again")
        assert await g.do(key, again) is again.value

    run(main())


# -- keys, references, what fn may be ----------------------------------------------------------


class HashableKey:
    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        return hash(self.n)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HashableKey) and other.n == self.n

    def __repr__(self) -> str:
        return f"HashableKey({self.n})"


KEYS = ["", 0, None, 3.5, b"bytes", ("t", 1), frozenset({1, 2}), HashableKey(7)]


@pytest.mark.parametrize("entry", ENTRIES)
def test_fn_not_async_type_error(entry: str) -> None:
    """Fn returning a non-awaitable: TypeError mentioning 'awaitable'; the key is free."""

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()

        def not_async() -> int:
            return 42

        with pytest.raises(TypeError, match="awaitable"):
            if entry == "do_future":
                g.do_future("k", not_async)
            else:
                await getattr(g, entry)("k", not_async)
        assert "k" not in g and len(g) == 0
        ok = AsyncLoader(name="ok")
        assert await g.do("k", ok) is ok.value

    run(main())


def test_fn_returning_plain_awaitable() -> None:
    """Fn may return any awaitable (a Future, an object with __await__); joiners join."""

    class Awaitable_:
        def __init__(self, fut: asyncio.Future[Any]) -> None:
            self.fut = fut

        def __await__(self) -> Any:
            return self.fut.__await__()

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()
        loop = asyncio.get_running_loop()
        for wrap in (lambda f: f, Awaitable_):
            fut: asyncio.Future[Token] = loop.create_future()
            calls = 0

            def fn(fut: asyncio.Future[Token] = fut, wrap: Any = wrap) -> Awaitable[Token]:
                nonlocal calls
                calls += 1
                return wrap(fut)  # type: ignore[no-any-return]

            handles = [(e, await start(g, e, "k", fn)) for e in ENTRIES]
            assert "k" in g
            token = Token()
            fut.set_result(token)
            outs = await settle(handles)
            assert all(o.value is token for o in outs)
            assert calls == 1 and len(g) == 0

    run(main())


@pytest.mark.parametrize("entry", ENTRIES)
def test_fn_raising_synchronously(entry: str) -> None:
    """Fn raising before returning a coroutine: that exception reaches the caller.

    do raises it; do_result returns it in Result.error (it never raises the
    loader's Exception); do_future's future holds it (as when an async def
    loader raises before suspending on 3.12+).
    """

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()
        err = ValueError("sync")

        def fn() -> Awaitable[Any]:
            raise err

        if entry == "do":
            with pytest.raises(ValueError) as info:
                await g.do("k", fn)
            assert info.value is err
        elif entry == "do_result":
            r = await g.do_result("k", fn)
            assert r.value is None and r.error is err
        else:
            fut = g.do_future("k", fn)
            with pytest.raises(ValueError) as info:
                await fut
            assert info.value is err
        assert "k" not in g and len(g) == 0
        ok = AsyncLoader(name="ok")
        assert await g.do("k", ok) is ok.value

    run(main())


@pytest.mark.parametrize("entry", ENTRIES)
def test_fn_raising_synchronously_key_free(entry: str) -> None:
    """Fn raising synchronously: its exception reaches the caller in some form; key free."""

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()
        err = ValueError("sync")

        def fn() -> Awaitable[Any]:
            raise err

        seen: BaseException | None = None
        try:
            if entry == "do_future":
                await g.do_future("k", fn)
            else:
                r = await getattr(g, entry)("k", fn)
                seen = r.error if isinstance(r, Result) else None
        except ValueError as exc:
            seen = exc
        assert seen is err
        assert "k" not in g and len(g) == 0
        ok = AsyncLoader(name="ok")
        assert await g.do("k", ok) is ok.value

    run(main())


# -- several event loops ----------------------------------------------------------------------


def _run_in_thread_loop(
    g: AsyncGroup[str, Token], name: str, barrier: threading.Barrier
) -> tuple[int, list[Token]]:
    """5 callers of key "same" in this thread's own asyncio.run; both loops' loaders overlap."""

    async def main() -> tuple[int, list[Token]]:
        calls = 0
        token = Token(name)

        async def loader() -> Token:
            nonlocal calls
            calls += 1
            # Both loops' loaders must be running at once to pass the barrier.
            await asyncio.to_thread(barrier.wait)
            return token

        got = await asyncio.gather(*(g.do("same", loader) for _ in range(5)))
        return calls, got

    return run(main())  # type: ignore[no-any-return]


def test_two_loops_in_threads_never_join() -> None:
    """Two threads, each in asyncio.run, same key: each loop runs its own loader."""
    g: AsyncGroup[str, Token] = AsyncGroup()
    for _ in range(3):
        barrier = threading.Barrier(2, timeout=5)
        results: dict[str, tuple[int, list[Token]] | BaseException] = {}

        def worker(
            name: str,
            barrier: threading.Barrier = barrier,
            results: dict[str, Any] = results,
        ) -> None:
            try:
                results[name] = _run_in_thread_loop(g, name, barrier)
            except BaseException as exc:
                results[name] = exc

        threads = [threading.Thread(target=worker, args=(n,)) for n in ("x", "y")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads)
        for name in ("x", "y"):
            result = results[name]
            assert not isinstance(result, BaseException), result
            calls, got = result
            assert calls == 1
            assert all(v is got[0] and v.name == name for v in got)
        assert len(g) == 0


def test_sequential_asyncio_runs_reuse_the_group() -> None:
    """One group used by several asyncio.run calls in turn coalesces in each."""
    g: AsyncGroup[str, Token] = AsyncGroup()

    async def once(i: int) -> None:
        gate = asyncio.Event()
        loader = AsyncLoader(name=f"run {i}", gate=gate)
        calls = [(e, await start(g, e, "k", loader)) for e in ENTRIES * 2]
        assert len(g) == 1
        gate.set()
        outs = await settle(calls)
        assert all(o.value is loader.value for o in outs)
        assert loader.calls == 1

    for i in range(3):
        run(once(i))
        assert len(g) == 0


def test_loop_closed_by_asyncio_run_leaves_nothing_behind() -> None:
    """Flights pending when asyncio.run ends are cleared; the loop can be collected."""
    g: AsyncGroup[str, Any] = AsyncGroup()

    async def main() -> weakref.ref[asyncio.AbstractEventLoop]:
        async def stuck() -> None:
            await asyncio.Event().wait()

        g.do_future("k", stuck)  # abandoned, never resolved
        caller = asyncio.create_task(g.do("k", stuck))
        await asyncio.sleep(0)
        assert "k" in g and not caller.done()
        return weakref.ref(asyncio.get_running_loop())

    ref = asyncio.run(main())
    assert len(g) == 0
    gc.collect()
    assert ref() is None
    assert len(g) == 0


def test_loop_closed_with_flight_pending_is_not_kept_alive() -> None:
    """A loop closed with a flight pending is dropped at the next use, then collectable."""
    g: AsyncGroup[str, Any] = AsyncGroup()
    loop = asyncio.new_event_loop()

    async def begin() -> None:
        async def stuck() -> None:
            await asyncio.Event().wait()

        g.do_future("k", stuck)
        await asyncio.sleep(0)

    loop.run_until_complete(begin())
    assert len(g) == 1
    loop.close()
    ref = weakref.ref(loop)
    del loop
    # Nothing tells the group that a loop closed: its flights are dropped at
    # the group's next use (here len()), after which the loop can be collected.
    assert len(g) == 0
    gc.collect()
    assert ref() is None
    assert "k" not in g


def test_forget_outside_any_loop_acts_on_every_loop() -> None:
    """Forget/forget_unshared/`in`/len called outside a loop see every loop's flights."""
    g: AsyncGroup[str, Token] = AsyncGroup()
    loops = [asyncio.new_event_loop() for _ in range(2)]
    try:

        async def begin(
            shared: bool,
        ) -> tuple[asyncio.Event, AsyncLoader, list[asyncio.Future[Token]]]:
            gate = asyncio.Event()
            first = AsyncLoader(name="first", gate=gate)
            futs = [g.do_future("k", first) for _ in range(2 if shared else 1)]
            await first.started.wait()
            return gate, first, futs

        began = [
            loop.run_until_complete(asyncio.wait_for(begin(shared=i == 0), 5))
            for i, loop in enumerate(loops)
        ]
        assert "k" in g and len(g) == 2
        assert g.forget_unshared("k") is False  # loop 0's flight is shared: kept
        assert len(g) == 1  # loop 1's unshared flight was forgotten
        g.forget("k")
        assert "k" not in g and len(g) == 0

        async def finish(
            gate: asyncio.Event, first: AsyncLoader, futs: list[asyncio.Future[Token]]
        ) -> None:
            second = AsyncLoader(name="second")
            new = g.do_future("k", second)  # a new flight: the old one was forgotten
            gate.set()
            assert [await f for f in futs] == [first.value] * len(futs)
            assert await new is second.value
            assert first.calls == 1 and second.calls == 1

        for loop, b in zip(loops, began, strict=True):
            loop.run_until_complete(asyncio.wait_for(finish(*b), 5))
        assert len(g) == 0
    finally:
        for loop in loops:
            loop.close()


# -- randomized stress --------------------------------------------------------------------------

STRESS_KEYS = ("a", "b", "c", "d")
FORGETTABLE = frozenset({"c", "d"})


@dataclass
class _Call:
    cid: int
    key: str
    entry: str
    behaviour: str
    delay: float | None
    arrival: float
    cancel_after: float | None
    forget: str | None
    leader: bool = False
    cancel_took: bool = False
    result: str = "pending"
    got: Any = None
    shared: bool | None = None
    notes: list[str] = field(default_factory=list)


class _Tagged(Boom):
    def __init__(self, key: str, flight: int) -> None:
        super().__init__(f"{key}#{flight}")
        self.key = key
        self.flight = flight


async def _stress(seed: int, cancel_orphaned: bool, n: int) -> dict[str, int]:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    g: AsyncGroup[str, Token] = AsyncGroup(cancel_orphaned=cancel_orphaned)
    flight_ids = itertools.count()
    live: dict[str, set[asyncio.Task[Any]]] = {k: set() for k in STRESS_KEYS}
    loader_tasks: list[asyncio.Task[Any]] = []
    values: dict[int, Token] = {}
    aborted_keys: set[str] = set()
    called: set[int] = set()
    problems: list[str] = []
    abandoned: list[int] = []

    plans = [
        _Call(
            cid=i,
            key=rng.choice(STRESS_KEYS),
            entry=rng.choice(("do", "do_result", "do_future", "do_timeout")),
            behaviour=rng.choices(("ok", "raise", "abort", "self_cancel"), (12, 5, 1, 1))[0],
            delay=None if rng.random() < 0.1 else rng.uniform(0, 0.004),
            arrival=rng.uniform(0, 0.15),
            cancel_after=rng.uniform(0, 0.004) if rng.random() < 0.5 else None,
            forget=rng.choice((None,) * 10 + ("forget", "forget_unshared")),
        )
        for i in range(n)
    ]

    def make_fn(call: _Call) -> Callable[[], Coroutine[Any, Any, Token]]:
        key = call.key

        async def body() -> Token:
            me = asyncio.current_task()
            assert me is not None
            fid = next(flight_ids)
            if key not in FORGETTABLE:
                rivals = [t for t in live[key] if t.cancelling() == 0]
                if rivals:
                    problems.append(f"two loaders at once for never-forgotten key {key}")
            live[key].add(me)
            loader_tasks.append(me)
            try:
                if call.delay is not None:
                    try:
                        await asyncio.sleep(call.delay)
                    except asyncio.CancelledError:
                        abandoned.append(fid)  # only cancel_orphaned cancels a loader here
                        raise
                if call.behaviour == "raise":
                    raise _Tagged(key, fid)
                if call.behaviour == "abort":
                    aborted_keys.add(key)
                    raise asyncio.CancelledError
                if call.behaviour == "self_cancel":
                    aborted_keys.add(key)
                    me.cancel()
                    await asyncio.sleep(1)
                v = Token(f"{key}#{fid}")
                v.key, v.flight = key, fid  # type: ignore[attr-defined]
                values[fid] = v
                return v
            finally:
                live[key].discard(me)

        def fn() -> Coroutine[Any, Any, Token]:
            called.add(call.cid)
            return body()

        return fn

    def cancel(call: _Call, target: asyncio.Future[Any]) -> None:
        call.cancel_took = target.cancel()

    async def caller(call: _Call) -> None:
        await asyncio.sleep(call.arrival)
        if call.key in FORGETTABLE and call.forget:
            getattr(g, call.forget)(call.key)
        call.leader = call.key not in g
        fn = make_fn(call)
        me = asyncio.current_task()
        assert me is not None
        try:
            if call.entry == "do_future":
                fut = g.do_future(call.key, fn)
                if call.cancel_after is not None:
                    loop.call_later(call.cancel_after, cancel, call, fut)
                call.got = await fut
            elif call.entry == "do_timeout":
                async with asyncio.timeout(call.cancel_after):
                    call.got = await g.do(call.key, fn)
            else:
                if call.cancel_after is not None:
                    loop.call_later(call.cancel_after, cancel, call, me)
                if call.entry == "do":
                    call.got = await g.do(call.key, fn)
                else:
                    r = await g.do_result(call.key, fn)
                    call.got, call.shared = (r.value if r.error is None else r.error), r.shared
                    if r.error is not None and r.value is not None:
                        call.notes.append("Result with both value and error")
            call.result = "error" if isinstance(call.got, BaseException) else "value"
        except asyncio.CancelledError:
            call.result = "cancelled"
        except TimeoutError:
            call.result = "timeout"
        except Exception as exc:
            call.result, call.got = "error", exc

    tasks = [asyncio.create_task(caller(c)) for c in plans]
    await asyncio.gather(*tasks)
    if loader_tasks:
        await asyncio.wait(loader_tasks)
    await spin(10)

    assert problems == []
    assert len(g) == 0 and not any(k in g for k in STRESS_KEYS)
    per_flight: Counter[int] = Counter()
    for c in plans:
        assert not c.notes, (c, c.notes)
        if c.cid in called:
            assert c.leader, f"joiner's fn was called: {c}"
        if c.result == "cancelled":
            assert c.cancel_took, f"CancelledError in a caller nobody cancelled: {c}"
            continue
        assert not c.cancel_took, f"cancelled caller did not raise CancelledError: {c}"
        if c.result == "timeout":
            assert c.entry == "do_timeout" and c.cancel_after is not None, c
        elif c.result == "value":
            v = c.got
            assert isinstance(v, Token), c
            assert v.key == c.key, c  # type: ignore[attr-defined]
            assert values[v.flight] is v, c  # type: ignore[attr-defined]
            per_flight[v.flight] += 1  # type: ignore[attr-defined]
        elif isinstance(c.got, _Tagged):
            assert c.got.key == c.key, c
            per_flight[c.got.flight] += 1
        elif isinstance(c.got, AbortedError):
            assert c.got.key == c.key and c.key in aborted_keys, c
        else:
            pytest.fail(f"unexpected outcome {c.result} {c.got!r} for {c}")
    for c in plans:
        fid = getattr(c.got, "flight", None)
        if c.shared is False and fid is not None:
            assert per_flight[fid] == 1, f"shared False but {per_flight[fid]} callers: {c}"
        if c.shared is not None and fid is not None and per_flight[fid] >= 2:
            assert c.shared is True, c
    results = Counter(c.result for c in plans)
    results["flights"] = len(loader_tasks)
    results["cancelled_leaders"] = sum(c.leader and c.result == "cancelled" for c in plans)
    results["aborted"] = sum(isinstance(c.got, AbortedError) for c in plans)
    results["shared"] = sum(bool(c.shared) for c in plans)
    results["abandoned"] = len(abandoned)
    if not cancel_orphaned:
        assert abandoned == []
    return results


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cancel_orphaned", [False, True])
def test_stress_random(cancel_orphaned: bool, seed: int, caplog: pytest.LogCaptureFixture) -> None:
    """Stress: 500 random callers: consistent outcomes, one loader per key, nothing left."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    stats = run(_stress(seed, cancel_orphaned, 500), timeout=20)
    assert never_retrieved(caplog) == []
    # The run exercised what it claims to.
    assert stats["value"] > 0 and stats["error"] > 0 and stats["cancelled"] > 0
    assert stats["cancelled_leaders"] > 0 and stats["shared"] > 0
    assert stats["flights"] < 500  # coalescing happened
    assert stats["aborted"] > 0 and stats["timeout"] > 0
    if cancel_orphaned:
        assert stats["abandoned"] > 0


def test_a_join_from_the_start_hook_is_counted_when_fn_raises() -> None:
    """A hook told of a flight's start joins it; then ``fn`` itself raises: the joiner
    gets the error and its join stays counted."""

    async def main() -> None:
        joined: list[asyncio.Future[str]] = []

        def hook(event: Event) -> None:
            if isinstance(event, FlightStarted):
                joined.append(g.do_future("k", fn))

        g: AsyncGroup[str, str] = AsyncGroup(on_event=hook)

        def fn() -> Coroutine[Any, Any, str]:
            raise ValueError("fn failed")

        with pytest.raises(ValueError, match="fn failed"):
            await g.do("k", fn)
        with pytest.raises(ValueError, match="fn failed"):
            await asyncio.wait_for(joined[0], 5)
        stats = g.stats()
        assert (stats.flights, stats.joins, stats.errors, len(g)) == (1, 1, 1, 0)

    asyncio.run(main())


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are new in 3.12")
def test_a_task_fn_starts_eagerly_joins_the_flight_it_starts() -> None:
    """``fn`` starts an eager task calling the group on the key being started: that task
    is not the loader, so it joins (no ReentryError) and gets the value."""

    async def main() -> None:
        g: AsyncGroup[str, str] = AsyncGroup()
        loop = asyncio.get_running_loop()
        children: list[asyncio.Task[str]] = []

        async def load() -> str:
            await asyncio.sleep(0)
            return "v"

        def fn() -> Coroutine[Any, Any, str]:
            children.append(asyncio.Task(g.do("k", load), loop=loop, eager_start=True))
            return load()

        assert await asyncio.wait_for(g.do("k", fn), 5) == "v"
        assert await asyncio.wait_for(children[0], 5) == "v"
        assert g.stats().joins == 1

    asyncio.run(main())
