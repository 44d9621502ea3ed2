"""Tests of AsyncGroup, the asyncio driver: Go's singleflight contract, ported.

Every test runs real tasks on a real event loop (``asyncio.run``), under
``asyncio.timeout`` and a pytest-timeout mark, so a hang fails instead of
blocking.  Overlap between callers is made with ``asyncio.Event`` gates, not
sleeps.  Names ``go_T*`` / ``go_E*`` are ports of the tests listed in section 2
of ``go-singleflight-contract.md``; the numbers in docstrings refer to the
contract points of the asyncio test brief.

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

pytestmark = pytest.mark.timeout(15)

EAGER = sys.version_info >= (3, 12)  # loader tasks start eagerly (Task(eager_start=True))
ENTRIES = ("do", "do_result", "do_future")


# -- helpers ---------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, Any], timeout: float = 5.0) -> Any:
    """Run ``coro`` in a fresh event loop, failing (not hanging) after ``timeout`` seconds."""

    async def main() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(main())


class Token:
    """A loader's value: compared by identity, and weakly referenceable."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Token({self.name!r})"


class Boom(Exception):
    """A loader's failure."""


class Stop(BaseException):
    """A BaseException that is not an Exception (the closest thing to Go's Goexit)."""


class Loader:
    """An async loader that counts its calls and records the task it runs in.

    Calling it (synchronously) counts in ``calls``, so a joiner's fn that is
    never called shows ``calls == 0``.  The body records ``asyncio.current_task()``
    at its first line, before any await, then waits on ``gate`` (or suspends once
    if ``suspend``), then raises ``error`` or returns ``value``.
    """

    def __init__(
        self,
        name: str = "loader",
        *,
        gate: asyncio.Event | None = None,
        error: BaseException | None = None,
        suspend: bool = True,
        cleanup: asyncio.Event | None = None,
        meter: Meter | None = None,
    ) -> None:
        self.value = Token(name)
        self.gate = gate
        self.error = error
        self.suspend = suspend
        self.cleanup = cleanup  # awaited after CancelledError, before re-raising it
        self.meter = meter
        self.calls = 0
        self.args: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.tasks: list[asyncio.Task[Any] | None] = []
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self.cancelled = asyncio.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Token]:
        self.calls += 1
        self.args.append((args, kwargs))
        return self._body()

    async def _body(self) -> Token:
        self.tasks.append(asyncio.current_task())  # first line: before any await
        self.started.set()
        if self.meter is not None:
            self.meter.enter()
        try:
            if self.gate is not None:
                await self.gate.wait()
            elif self.suspend:
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.cancelled.set()
            if self.cleanup is not None:
                await self.cleanup.wait()
            raise
        finally:
            if self.meter is not None:
                self.meter.leave()
        self.finished.set()
        if self.error is not None:
            raise self.error
        return self.value


class Meter:
    """Counts loaders running at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def enter(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        self.now -= 1


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


async def spin(n: int = 5) -> None:
    """Let the loop run a few rounds of callbacks."""
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.fixture(autouse=True)
def _no_unretrieved_exception_logs(caplog: pytest.LogCaptureFixture) -> Any:
    """No test may leave a 'Task/Future exception was never retrieved' behind."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    yield
    gc.collect()
    records = caplog.get_records("setup") + caplog.get_records("call") + caplog.records
    bad = [r.getMessage() for r in records if "never retrieved" in r.getMessage()]
    assert not bad, bad


def never_retrieved(caplog: pytest.LogCaptureFixture) -> list[str]:
    gc.collect()
    return [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]


# -- Go's tests, ported ------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
def test_go_T1_exception_reaches_caller_and_cause_finds_original(entry: str) -> None:
    """T1 TestPanicErrorUnwrap: the error reaches the caller; identity/__cause__ find it."""

    class ErrValue(Exception):
        pass

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()
        original = ErrValue("error value")

        async def plain() -> None:
            await asyncio.sleep(0)
            raise original

        async def wrapping() -> None:
            await asyncio.sleep(0)
            try:
                raise original
            except ErrValue as exc:
                raise RuntimeError("wrapped") from exc

        async def base_exit() -> None:
            await asyncio.sleep(0)
            raise stop

        stop = Stop("string value")
        [got] = await settle([(entry, await start(g, entry, "plain", plain))])
        assert got.error is original
        [got] = await settle([(entry, await start(g, entry, "wrapped", wrapping))])
        assert isinstance(got.error, RuntimeError)
        assert got.error.__cause__ is original
        [got] = await settle([(entry, await start(g, entry, "base", base_exit))])
        assert isinstance(got.error, AbortedError)
        assert got.error.__cause__ is stop
        assert len(g) == 0

    run(main())


def test_go_T2_do_returns_value_and_type() -> None:
    """T2 TestDo: the value and its type come back unchanged, with no error."""

    async def main() -> None:
        g: AsyncGroup[str, str] = AsyncGroup()

        async def fn() -> str:
            return "bar"

        v = await g.do("key", fn)
        assert (v, type(v)) == ("bar", str)
        assert await g.do_result("key", fn) == Result("bar", None, False)
        assert await g.do_future("key", fn) == "bar"

    run(main())


def test_go_T3_do_err_is_the_same_object() -> None:
    """T3 TestDoErr: the loader's error comes back as the same object; the value is None."""

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()
        some_err = Boom("Some error")

        async def fn() -> None:
            raise some_err

        with pytest.raises(Boom) as info:
            await g.do("key", fn)
        assert info.value is some_err
        r = await g.do_result("key", fn)
        assert r.value is None and r.error is some_err and r.shared is False
        with pytest.raises(Boom) as info:
            await g.do_future("key", fn)
        assert info.value is some_err

    run(main())


def test_go_T4_dup_suppress() -> None:
    """T4 TestDoDupSuppress: 10 callers all get "bar" and 0 < calls < 10."""

    async def main() -> None:
        g: AsyncGroup[str, str] = AsyncGroup()
        n = 10
        c: asyncio.Queue[str] = asyncio.Queue(maxsize=1)
        first_call = asyncio.Event()
        all_entered = asyncio.Event()
        calls = entered = 0

        async def fn() -> str:
            nonlocal calls
            calls += 1
            first_call.set()
            v = await c.get()
            c.put_nowait(v)  # pump: a later flight gets the value too
            await asyncio.sleep(0.01)  # let more callers enter do()
            return v

        async def caller() -> str:
            nonlocal entered
            entered += 1
            if entered == n:
                all_entered.set()
            return await g.do("key", fn)

        tasks = [asyncio.create_task(caller()) for _ in range(n)]
        await first_call.wait()
        await all_entered.wait()
        c.put_nowait("bar")
        assert await asyncio.gather(*tasks) == ["bar"] * n
        assert 0 < calls < n

    run(main())


def test_go_T5_forget() -> None:
    """T5 TestForget: the forgotten flight's end never removes the new one; a third joins it."""

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()
        first_started, unblock_first = asyncio.Event(), asyncio.Event()
        first_finished, unblock_second = asyncio.Event(), asyncio.Event()
        third_calls = 0

        async def f1() -> None:
            first_started.set()
            await unblock_first.wait()
            first_finished.set()

        async def f2() -> int:
            await unblock_second.wait()
            return 2

        async def f3() -> int:
            nonlocal third_calls
            third_calls += 1
            return 3

        first = asyncio.create_task(g.do("key", f1))
        await first_started.wait()
        g.forget("key")
        second = g.do_future("key", f2)
        unblock_first.set()
        await first_finished.wait()
        # f1 has returned, but its flight's cleanup may not have run yet: the race
        # the identity check covers.
        third = g.do_future("key", f3)
        assert await first is None
        assert "key" in g  # the first flight's end did not remove the second
        unblock_second.set()
        assert await second == 2
        assert await third == 2
        assert third_calls == 0
        assert len(g) == 0

    run(main())


def test_go_T6_do_chan() -> None:
    """T6 TestDoChan: do_future's future delivers the value."""

    async def main() -> None:
        g: AsyncGroup[str, str] = AsyncGroup()

        async def fn() -> str:
            await asyncio.sleep(0)
            return "bar"

        fut = g.do_future("key", fn)
        assert isinstance(fut, asyncio.Future)
        v = await fut
        assert (v, type(v)) == ("bar", str)

    run(main())


@pytest.mark.parametrize("entry", ENTRIES)
def test_go_T7_panic_do_every_caller_gets_it(entry: str) -> None:
    """T7 TestPanicDo: 5 callers of a failing loader all get the error within 1 s; nobody hangs."""

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()
        gate = asyncio.Event()
        loader = Loader(gate=gate, error=Boom("invalid memory address or nil pointer dereference"))
        async with asyncio.timeout(1):
            calls = [(entry, await start(g, entry, "key", loader)) for _ in range(5)]
            gate.set()
            outs = await settle(calls)
        assert [o.error for o in outs] == [loader.error] * 5
        assert loader.calls == 1
        again = Loader("again")
        assert await g.do("key", again) is again.value  # E5: the key works again at once

    run(main())


@pytest.mark.parametrize("entry", ENTRIES)
def test_go_T8_goexit_loader_task_cancelled(entry: str) -> None:
    """T8 TestGoexitDo: the loader task cancels itself; 5 callers get AbortedError in 1 s."""

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


def test_go_T9_panic_do_chan() -> None:
    """T9 TestPanicDoChan: a do_future caller of a failing loader gets the error; nothing hangs."""

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()
        err = Boom("Panicking in DoChan")

        async def fn() -> None:
            await asyncio.sleep(0)
            raise err

        async with asyncio.timeout(1):
            futs = [g.do_future("", fn) for _ in range(3)]
            for fut in futs:
                with pytest.raises(Boom, match="Panicking in DoChan") as info:
                    await fut
                assert info.value is err
        assert len(g) == 0

    run(main())


def test_go_T10_panic_do_shared_by_do_chan() -> None:
    """T10 TestPanicDoSharedByDoChan: a do leader's error reaches its do_future joiner."""

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()
        blocked, unblock = asyncio.Event(), asyncio.Event()
        err = Boom("Panicking in Do")
        unexpected = Loader("DoChan unexpectedly executed callback")

        async def fn() -> None:
            blocked.set()
            await unblock.wait()
            raise err

        async with asyncio.timeout(1):
            leader = asyncio.create_task(g.do("", fn))
            await blocked.wait()
            ch = g.do_future("", unexpected)
            unblock.set()
            with pytest.raises(Boom) as info:
                await ch
            assert info.value is err
            with pytest.raises(Boom) as info:
                await leader
            assert info.value is err
        assert unexpected.calls == 0

    run(main())


def test_go_T11_example_group() -> None:
    """T11 ExampleGroup: two callers of one flight: Shared true, equal results, "func 1"."""

    async def main() -> None:
        g: AsyncGroup[str, str] = AsyncGroup()
        block = asyncio.Event()
        ran: list[str] = []

        async def f1() -> str:
            ran.append("func 1")
            await block.wait()
            return "func 1"

        async def f2() -> str:
            ran.append("func 2")
            await block.wait()
            return "func 2"

        res1c = asyncio.create_task(g.do_result("key", f1))
        await asyncio.sleep(0)
        res2c = asyncio.create_task(g.do_result("key", f2))
        fut3 = g.do_future("key", f2)
        await asyncio.sleep(0)
        block.set()
        res1, res2 = await res1c, await res2c
        assert res2.shared is True and res1.shared is True
        assert res1.value == res2.value == await fut3 == "func 1"
        assert ran == ["func 1"]

    run(main())


def test_seed_coalesces_100_tasks_one_call() -> None:
    """Seed TestCoalesces: 100 tasks, a 50 ms loader: exactly 1 call, one object for all."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        calls = 0
        token = Token()

        async def fn() -> Token:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.05)
            return token

        got = await asyncio.gather(*(g.do("key", fn) for _ in range(100)))
        assert calls == 1
        assert all(v is token for v in got)
        assert len(g) == 0

    run(main())


def test_seed_not_a_cache() -> None:
    """Seed TestNotACache: two sequential awaits run the loader twice."""

    async def main() -> None:
        g: AsyncGroup[str, int] = AsyncGroup()
        calls = 0

        async def fn() -> int:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.001)
            return calls

        assert await g.do("key", fn) == 1
        assert await g.do("key", fn) == 2
        assert calls == 2

    run(main())


@pytest.mark.parametrize("suspend", [True, False], ids=["suspends", "never-suspends"])
def test_go_E1_shared_false_alone_true_with_a_joiner(suspend: bool) -> None:
    """E1 (3): shared is False alone; with a joiner, leader and joiner both get True."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        alone = Loader(suspend=suspend)
        r = await g.do_result("k", alone)
        assert r == Result(alone.value, None, False)
        gate = asyncio.Event()
        loader = Loader(gate=gate)
        leader = await start(g, "do_result", "k", loader)
        joiner = await start(g, "do_result", "k", Loader("joiner"))
        gate.set()
        outs = await settle([("do_result", leader), ("do_result", joiner)])
        assert [(o.value, o.shared) for o in outs] == [(loader.value, True)] * 2

    run(main())


@pytest.mark.parametrize("suspend", [True, False], ids=["suspends", "never-suspends"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_go_E2_sequential_calls_are_not_cached(entry: str, suspend: bool) -> None:
    """E2 (2): sequential calls each run fn, shared False; the key is gone after each."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        for i in range(3):
            loader = Loader(f"run {i}", suspend=suspend)
            [got] = await settle([(entry, await start(g, entry, "k", loader))])
            assert got.value is loader.value
            assert loader.calls == 1
            if entry == "do_result":
                assert got.shared is False
            assert "k" not in g and len(g) == 0

    run(main())


@pytest.mark.parametrize("outcome_kind", ["value", "error"])
def test_go_E3_abandoned_do_future_flight_still_finishes(outcome_kind: str) -> None:
    """E3 (8): a do_future nobody listens to still finishes; later callers are unaffected."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        gate = asyncio.Event()
        loader = Loader(gate=gate, error=Boom() if outcome_kind == "error" else None)
        fut = g.do_future("k", loader)
        ref = weakref.ref(fut)
        del fut  # stop listening
        gc.collect()
        await loader.started.wait()
        assert "k" in g
        joiner = Loader("joiner")
        late = await start(g, "do_result", "k", joiner)  # joins the still-running flight
        gate.set()
        await loader.finished.wait()
        [got] = await settle([("do_result", late)])
        assert joiner.calls == 0
        if outcome_kind == "error":
            assert got.error is loader.error
        else:
            assert got.value is loader.value
        assert got.shared is True
        await spin()
        del loader, late, got  # the error's traceback pins the flight while it lives
        gc.collect()
        assert ref() is None
        assert len(g) == 0
        after = Loader("after")
        assert await g.do("k", after) is after.value

    run(main())


@pytest.mark.parametrize("suspend", [True, False], ids=["suspends", "never-suspends"])
def test_abandoned_do_future_of_failed_flight_logs_nothing(
    suspend: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """E3/8: a dropped do_future of a failed flight logs no 'exception was never retrieved'.

    The same whether or not the loader suspended (on 3.12+ a loader that never
    suspends finishes inside do_future).
    """
    caplog.set_level(logging.ERROR, logger="asyncio")

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        loader = Loader(error=Boom("dropped"), suspend=suspend)
        g.do_future("k", loader)  # dropped at once
        await spin()
        assert loader.calls == 1 and len(g) == 0

    run(main())
    assert never_retrieved(caplog) == []


@pytest.mark.parametrize("phase", ["first_line", "after_await"])
def test_go_E4_forget_no_op_and_inside_fn(phase: str) -> None:
    """E4 (4): forget of an unknown key is a no-op; forget inside fn allows a concurrent flight."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        g.forget("unknown")
        g.forget("unknown")
        assert len(g) == 0
        gate = asyncio.Event()
        meter = Meter()

        async def forgetting() -> Token:
            if phase == "after_await":
                await asyncio.sleep(0)
            g.forget("k")
            meter.enter()
            await gate.wait()
            meter.leave()
            return token

        token = Token("first")
        first = await start(g, "do", "k", forgetting)
        await spin()
        assert "k" not in g
        second = Loader("second", gate=gate, meter=meter)
        later = await start(g, "do_result", "k", second)
        await second.started.wait()
        assert meter.now == 2  # both flights run at once
        third = await start(g, "do_future", "k", Loader("third"))  # joins the second
        gate.set()
        outs = await settle([("do", first), ("do_result", later), ("do_future", third)])
        assert outs[0].value is token
        assert outs[1].value is second.value and outs[1].shared is True
        assert outs[2].value is second.value
        assert second.calls == 1 and len(g) == 0

    run(main())


@pytest.mark.parametrize("suspend", [True, False], ids=["suspends", "never-suspends"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_go_E5_key_usable_after_failure(entry: str, suspend: bool) -> None:
    """E5 (5): after a failed flight the key is free at once: the next call runs fn and succeeds."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        bad = Loader(error=Boom(), suspend=suspend)
        [got] = await settle([(entry, await start(g, entry, "k", bad))])
        assert got.error is bad.error
        assert "k" not in g
        good = Loader("good", suspend=suspend)
        [got] = await settle([(entry, await start(g, entry, "k", good))])
        assert got.value is good.value and good.calls == 1

    run(main())


def test_go_E6_different_keys_never_wait_for_each_other() -> None:
    """E6 (10): loaders of different keys run at once (each waits for all the others)."""

    async def main() -> None:
        g: AsyncGroup[str, str] = AsyncGroup()
        started = {k: asyncio.Event() for k in "abc"}

        async def loader(k: str) -> str:
            started[k].set()
            for ev in started.values():
                await ev.wait()
            return k.upper()

        got = await asyncio.gather(
            g.do("a", loader, "a"), g.do_result("b", loader, "b"), g.do_future("c", loader, "c")
        )
        assert got == ["A", Result("B", None, False), "C"]

    run(main())


def test_go_E7_forget_unshared() -> None:
    """E7 TestForgetUnshared: False while shared, before and after the first flight ends."""

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()
        assert g.forget_unshared("absent") is True
        first_gate, second_gate = asyncio.Event(), asyncio.Event()
        first = Loader("first", gate=first_gate)
        h1 = await start(g, "do", "key", first)
        await first.started.wait()
        assert g.forget_unshared("key") is True  # unshared: forgotten
        assert "key" not in g
        second = Loader("second", gate=second_gate)
        h2 = await start(g, "do", "key", second)
        await second.started.wait()
        third = Loader("third must not be started")
        h3 = g.do_future("key", third)
        assert g.forget_unshared("key") is False
        first_gate.set()
        assert await h1 is first.value
        await spin()
        assert g.forget_unshared("key") is False
        assert "key" in g
        second_gate.set()
        assert await h2 is second.value
        assert await h3 is second.value
        assert third.calls == 0

    run(main())


def test_go_E7_do_and_forget_unshared_race() -> None:
    """E7 TestDoAndForgetUnsharedRace: forget_unshared after a shared do() never returns False."""

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


# -- 1. one execution per key ------------------------------------------------------------------


@pytest.mark.parametrize("leader_entry", ENTRIES)
def test_one_execution_per_key_same_object_for_all(leader_entry: str) -> None:
    """1: while in flight, joiners of every entry point share one run; their fn is never called."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        gate = asyncio.Event()
        loader = Loader(gate=gate)
        calls = [(leader_entry, await start(g, leader_entry, "k", loader))]
        await loader.started.wait()
        joiners = [Loader(f"joiner {i}") for i in range(6)]
        for i, j in enumerate(joiners):
            entry = ENTRIES[i % 3]
            calls.append((entry, await start(g, entry, "k", j)))
        assert len(g) == 1
        gate.set()
        outs = await settle(calls)
        assert all(o.value is loader.value and o.error is None for o in outs)
        assert loader.calls == 1
        assert [j.calls for j in joiners] == [0] * 6
        assert {o.shared for o in outs if o.shared is not None} == {True}

    run(main())


def test_args_and_kwargs_reach_the_loader() -> None:
    """1/API: fn(*args, **kwargs), even kwargs named key or fn; a joiner's are not used."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        gate = asyncio.Event()
        loader = Loader(gate=gate)
        h1 = asyncio.create_task(g.do("k", loader, 1, 2, key="K", fn="F"))
        await loader.started.wait()
        h2 = g.do_future("k", loader, 3, x=4)
        gate.set()
        assert await h1 is await h2 is loader.value
        assert loader.args == [((1, 2), {"key": "K", "fn": "F"})]

    run(main())


# -- 2. not a cache ----------------------------------------------------------------------------


@pytest.mark.parametrize("suspend", [True, False], ids=["suspends", "never-suspends"])
def test_entry_removed_before_any_caller_sees_result(suspend: bool) -> None:
    """2 (S19): when any caller sees the outcome, the key is already out of the group."""

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
            loader = Loader(gate=None if not suspend else gate, error=error, suspend=suspend)
            tasks = [asyncio.create_task(watch(ENTRIES[i % 3], loader)) for i in range(9)]
            await spin()
            gate.set()
            await asyncio.gather(*tasks)
        assert len(seen) == 2 * (9 + 3)
        assert not any(seen)

    run(main())


def test_call_after_result_never_joins_finished_flight() -> None:
    """2 (S19): a call made right after seeing a result never joins the finished flight."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        gate = asyncio.Event()
        first = Loader("first", gate=gate)
        second = Loader("second")

        async def twice(entry: str) -> tuple[Any, Any]:
            a = await settle([(entry, await start(g, entry, "k", first))])
            b = await settle([(entry, await start(g, entry, "k", second))])
            return a[0].value, b[0].value

        tasks = [asyncio.create_task(twice(ENTRIES[i % 3])) for i in range(6)]
        await first.started.wait()
        await spin()
        gate.set()
        got = await asyncio.gather(*tasks)
        assert first.calls == 1
        assert all(a is first.value for a, _ in got)
        assert all(b is second.value for _, b in got)
        assert second.calls >= 1
        assert len(g) == 0

    run(main())


# -- 3. shared -----------------------------------------------------------------------------------


@pytest.mark.parametrize("leader_entry", ENTRIES)
def test_shared_true_for_every_do_result_of_a_shared_flight(leader_entry: str) -> None:
    """3 (S12/S13): every do_result caller of a 2+ caller flight gets shared True, whoever led."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        gate = asyncio.Event()
        loader = Loader(gate=gate)
        calls = [(leader_entry, await start(g, leader_entry, "k", loader))]
        calls.append(("do_result", await start(g, "do_result", "k", Loader("j"))))
        gate.set()
        outs = await settle(calls)
        assert [o.value for o in outs] == [loader.value] * 2
        assert [o.shared for o in outs if o.shared is not None] == [True] * (
            1 + (leader_entry == "do_result")
        )
        r = await g.do_result("k", Loader("alone"))
        assert r.shared is False

    run(main())


# -- 4. forget -----------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
def test_forget_forgotten_flight_still_delivers(entry: str) -> None:
    """4 (S21/S22): after forget a new flight starts; the old one's callers still get its value."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        gate_a, gate_b = asyncio.Event(), asyncio.Event()
        a, b = Loader("a", gate=gate_a), Loader("b", gate=gate_b)
        old = [(entry, await start(g, entry, "k", a))]
        await a.started.wait()
        old.append((entry, await start(g, entry, "k", Loader("joins a"))))
        g.forget("k")
        assert "k" not in g
        new = [(e, await start(g, e, "k", b)) for e in ENTRIES]
        await b.started.wait()
        assert b.calls == 1
        gate_a.set()
        assert [o.value for o in await settle(old)] == [a.value, a.value]
        assert "k" in g
        gate_b.set()
        assert [o.value for o in await settle(new)] == [b.value] * 3
        assert len(g) == 0

    run(main())


@pytest.mark.parametrize("entry", ENTRIES)
def test_failed_forgotten_flight_never_removes_newer_one(entry: str) -> None:
    """4 (peers' duplicate loaders): A fails after forget + B; C joins B: 2 runs, never 3."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        meter = Meter()
        gate_a, gate_b = asyncio.Event(), asyncio.Event()
        a = Loader("a", gate=gate_a, error=Boom("A"), meter=meter)
        b = Loader("b", gate=gate_b, meter=meter)
        c = Loader("c", meter=meter)
        ha = await start(g, entry, "k", a)
        await a.started.wait()
        g.forget("k")
        hb = await start(g, entry, "k", b)
        await b.started.wait()
        gate_a.set()
        [got_a] = await settle([(entry, ha)])
        assert got_a.error is a.error
        await spin()
        assert "k" in g  # A's cleanup left B's entry alone
        hc = await start(g, "do_result", "k", c)
        gate_b.set()
        got_b, got_c = await settle([(entry, hb), ("do_result", hc)])
        assert got_b.value is b.value and got_c.value is b.value and got_c.shared is True
        assert (a.calls, b.calls, c.calls) == (1, 1, 0)
        assert meter.peak == 2
        assert len(g) == 0

    run(main())


@pytest.mark.parametrize("entry", ENTRIES)
def test_abandoned_flight_cleanup_never_removes_newer_one(entry: str) -> None:
    """4/7 (cacheflight's bug): an abandoned loader's slow cancel never removes the next flight."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup(cancel_orphaned=True)
        meter = Meter()
        cleanup, gate_b = asyncio.Event(), asyncio.Event()
        a = Loader("a", gate=asyncio.Event(), cleanup=cleanup, meter=meter)
        b = Loader("b", gate=gate_b, meter=meter)
        c = Loader("c", meter=meter)
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


# -- 5. errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
def test_error_traceback_small_with_100_waiters(entry: str) -> None:
    """5: 100 callers get the same exception, with the loader's frame and only a few frames."""

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()
        gate = asyncio.Event()
        err = Boom("shared")
        depths: list[int] = []

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
            assert e is err
            frames = traceback.extract_tb(e.__traceback__)
            assert "failing_loader" in [f.name for f in frames]
            depths.append(len(frames))

        tasks = [asyncio.create_task(caller()) for _ in range(100)]
        await spin()
        gate.set()
        await asyncio.gather(*tasks)
        assert len(depths) == 100
        assert max(depths) <= 10, depths  # peers: up to 202-402 frames
        assert len(traceback.extract_tb(err.__traceback__)) <= 10
        assert len(g) == 0

    run(main())


# -- 7. cancellation -----------------------------------------------------------------------------


@pytest.mark.parametrize("suspend", [True, False], ids=["suspends", "never-suspends"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_loader_runs_in_its_own_task_from_first_line(entry: str, suspend: bool) -> None:
    """7: current_task() at the loader's first line is never a caller's task."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        me = asyncio.current_task()
        alone = Loader(suspend=suspend)
        if entry == "do_future":
            assert await g.do_future("k", alone) is alone.value
        else:
            await getattr(g, entry)("k", alone)
        assert alone.tasks[0] is not None and alone.tasks[0] is not me
        gate = asyncio.Event()
        shared = Loader(gate=gate)
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
    """7: cancelling the first caller leaves the loader and every other caller alone."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup(cancel_orphaned=cancel_orphaned)
        gate = asyncio.Event()
        loader = Loader(gate=gate)
        leader = await start(g, leader_entry, "k", loader)
        await loader.started.wait()
        others = [(e, await start(g, e, "k", Loader("j"))) for e in ENTRIES]
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
    """7: a cancelled waiter alone raises CancelledError; the leader and the rest get the value."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup(cancel_orphaned=cancel_orphaned)
        gate = asyncio.Event()
        loader = Loader(gate=gate)
        calls = [(e, await start(g, e, "k", loader)) for e in ENTRIES]
        await loader.started.wait()
        victim = await start(g, victim_entry, "k", Loader("victim"))
        calls += [(e, await start(g, e, "k", Loader("j"))) for e in ENTRIES]
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
    """7 (cancel_orphaned=False): every caller cancelled, the loader still finishes."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        gate = asyncio.Event()
        loader = Loader(gate=gate)
        handles = [await start(g, leader_entry, "k", loader)]
        await loader.started.wait()
        handles += [await start(g, e, "k", Loader("j")) for e in ENTRIES]
        for h in handles:
            h.cancel()
        await spin()
        assert all(h.cancelled() for h in handles)
        assert not loader.cancelled.is_set()
        assert "k" in g  # the flight runs on; a new caller joins it
        late = Loader("late")
        joined = await start(g, "do_result", "k", late)
        gate.set()
        await loader.finished.wait()
        [got] = await settle([("do_result", joined)])
        assert got.value is loader.value and late.calls == 0
        assert loader.calls == 1 and not loader.cancelled.is_set()
        await spin()
        assert len(g) == 0
        fresh = Loader("fresh")
        assert await g.do("k", fresh) is fresh.value

    run(main())


@pytest.mark.parametrize("leader_entry", ENTRIES)
def test_cancel_all_callers_cancel_orphaned_cancels_loader(leader_entry: str) -> None:
    """7 (cancel_orphaned=True): the loader is cancelled when its last caller leaves."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup(cancel_orphaned=True)
        loader = Loader(gate=asyncio.Event())
        handles = [await start(g, leader_entry, "k", loader)]
        await loader.started.wait()
        handles += [await start(g, e, "k", Loader("j")) for e in ENTRIES]
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
        fresh = Loader("fresh")
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
    """7 (T8): a loader task ending cancelled gives every caller AbortedError."""

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
        good = Loader("good")
        assert await g.do("k", good) is good.value

    run(main())


@pytest.mark.parametrize("suspend", [True, False], ids=["suspends", "never-suspends"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_loader_base_exception_gives_aborted_error(entry: str, suspend: bool) -> None:
    """7: a loader stopped by a non-Exception BaseException gives AbortedError caused by it."""

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()
        stop = Stop("halt")
        loader = Loader(error=stop, suspend=suspend)
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
    """7/8: timeout / wait_for time out one caller each; the others get the value."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup(cancel_orphaned=cancel_orphaned)
        gate = asyncio.Event()
        loader = Loader(gate=gate)

        async def with_timeout() -> Token:
            async with asyncio.timeout(0.01):
                return await g.do("k", loader)

        timed = asyncio.create_task(with_timeout())
        await loader.started.wait()
        staying = [(e, await start(g, e, "k", Loader("j"))) for e in ENTRIES]
        with pytest.raises(TimeoutError):
            await timed
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(g.do("k", Loader("j")), 0.01)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(g.do_result("k", Loader("j")), 0.01)
        fut = g.do_future("k", Loader("j"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fut, 0.01)
        assert fut.cancelled()
        shielded = g.do_future("k", Loader("j"))
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
    """7: a lone caller times out: the loader runs on, or is cancelled (cancel_orphaned)."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup(cancel_orphaned=cancel_orphaned)
        gate = asyncio.Event()
        loader = Loader(gate=gate)
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
        fresh = Loader("fresh")
        assert await g.do("k", fresh) is fresh.value

    run(main())


# -- 8. do_future ------------------------------------------------------------------------------


def test_do_future_returns_at_once_a_future_per_caller() -> None:
    """8: do_future is not a coroutine, returns a pending asyncio.Future at once, one per caller."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        assert not inspect.iscoroutinefunction(g.do_future)
        gate = asyncio.Event()
        loader = Loader(gate=gate)
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
    """8/2: a loader that never suspends still gives do_future a future of its own."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup()
        loader = Loader(suspend=suspend)
        f1 = g.do_future("k", loader)
        assert isinstance(f1, asyncio.Future)
        # 3.12+ starts the loader eagerly: one that never suspends is done already.
        assert f1.done() is (EAGER and not suspend)
        assert await f1 is loader.value
        loader2 = Loader("2", suspend=suspend)
        f2 = g.do_future("k", loader2)
        assert f2 is not f1
        assert await f2 is loader2.value
        assert len(g) == 0

    run(main())


@pytest.mark.parametrize("cancel_orphaned", [False, True])
def test_cancelling_every_do_future_future(cancel_orphaned: bool) -> None:
    """8: cancelling all do_future futures cancels the loader only with cancel_orphaned=True."""

    async def main() -> None:
        g: AsyncGroup[str, Token] = AsyncGroup(cancel_orphaned=cancel_orphaned)
        gate = asyncio.Event()
        loader = Loader(gate=gate)
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
        fresh = Loader("fresh")
        assert await g.do_future("k", fresh) is fresh.value

    run(main())


def test_do_future_outside_event_loop_raises() -> None:
    """8: do_future needs a running loop: RuntimeError, and fn is not called."""
    g: AsyncGroup[str, Token] = AsyncGroup()
    calls = 0

    def fn() -> Any:
        nonlocal calls
        calls += 1
        return asyncio.sleep(0)

    with pytest.raises(RuntimeError):
        g.do_future("k", fn)
    assert calls == 0 and len(g) == 0


# -- 9. re-entrancy ------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["first_line", "after_await"])
@pytest.mark.parametrize("inner", ENTRIES)
@pytest.mark.parametrize("outer", ENTRIES)
def test_loader_calling_own_key_gets_runtime_error(outer: str, inner: str, phase: str) -> None:
    """9: a loader calling its own key gets RuntimeError naming the key; no deadlock."""
    key = ("self", 42)

    async def main() -> None:
        g: AsyncGroup[Any, str] = AsyncGroup()
        caught: list[RuntimeError] = []
        other = Loader("must not run")

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
        again = Loader("again")
        assert await g.do(key, again) is again.value

    run(main())


def test_loader_may_call_other_keys() -> None:
    """9 (S3): a loader may call do/do_future on other keys (before and after awaiting)."""

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()

        async def inner(n: int) -> int:
            await asyncio.sleep(0)
            return n

        async def outer() -> int:
            a = await g.do("inner-a", inner, 1)
            await asyncio.sleep(0)
            b = await g.do_future("inner-b", inner, 2)
            return a + b

        assert await asyncio.gather(g.do("outer", outer), g.do("outer", outer)) == [3, 3]
        assert len(g) == 0

    run(main())


# -- 10. keys, references, what fn may be ----------------------------------------------------------


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


@pytest.mark.parametrize("key", KEYS, ids=repr)
def test_any_hashable_key(key: Any) -> None:
    """10 (S2): any hashable key coalesces (equal keys share a flight) and is released after."""

    async def main() -> None:
        g: AsyncGroup[Any, Token] = AsyncGroup()
        gate = asyncio.Event()
        loader = Loader(gate=gate)
        equal_key = HashableKey(7) if isinstance(key, HashableKey) else key
        calls = [(e, await start(g, e, key, loader)) for e in ENTRIES]
        calls += [(e, await start(g, e, equal_key, Loader("j"))) for e in ENTRIES]
        assert key in g and len(g) == 1
        gate.set()
        outs = await settle(calls)
        assert all(o.value is loader.value for o in outs)
        assert loader.calls == 1
        assert key not in g and len(g) == 0

    run(main())


@pytest.mark.parametrize("key", [[1], {"a": 1}, {1}], ids=["list", "dict", "set"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_unhashable_key_type_error_before_fn(entry: str, key: Any) -> None:
    """10: an unhashable key raises TypeError before fn is called; nothing is left behind."""

    async def main() -> None:
        g: AsyncGroup[Any, Token] = AsyncGroup()
        loader = Loader()
        with pytest.raises(TypeError):
            if entry == "do_future":
                g.do_future(key, loader)
            else:
                await getattr(g, entry)(key, loader)
        assert loader.calls == 0 and len(g) == 0
        ok = Loader("ok")
        assert await g.do("fine", ok) is ok.value

    run(main())


def test_finished_group_holds_no_references() -> None:
    """10 (S20): after flights end, the group holds neither values nor exceptions (weakrefs die)."""

    async def main() -> None:
        g: AsyncGroup[str, Any] = AsyncGroup()
        refs: list[weakref.ref[Any]] = []

        async def make() -> Token:
            await asyncio.sleep(0)
            return Token("v")

        async def fail() -> None:
            await asyncio.sleep(0)
            raise Boom("e")

        async def eager_fail() -> None:
            raise Boom("eager")

        for entry in ENTRIES:
            for fn in (make, fail, eager_fail):
                calls = [
                    (entry, await start(g, entry, f"{entry}-{fn.__name__}", fn)) for _ in range(3)
                ]
                outs = await settle(calls)
                thing = outs[0].value if fn is make else outs[0].error
                assert thing is not None
                refs.append(weakref.ref(thing))
                del calls, outs, thing
        await spin()
        gc.collect()
        assert len(g) == 0
        assert [r() for r in refs] == [None] * len(refs)

    run(main())


@pytest.mark.parametrize("entry", ENTRIES)
def test_fn_not_async_type_error(entry: str) -> None:
    """10: fn returning a non-awaitable: TypeError mentioning 'awaitable'; the key is free."""

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
        ok = Loader("ok")
        assert await g.do("k", ok) is ok.value

    run(main())


def test_fn_returning_plain_awaitable() -> None:
    """10: fn may return any awaitable (a Future, an object with __await__); joiners join."""

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
    """10: fn raising before returning a coroutine: that exception reaches the caller.

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
        ok = Loader("ok")
        assert await g.do("k", ok) is ok.value

    run(main())


@pytest.mark.parametrize("entry", ENTRIES)
def test_fn_raising_synchronously_key_free(entry: str) -> None:
    """10: fn raising synchronously: its exception reaches the caller in some form; key free."""

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
        ok = Loader("ok")
        assert await g.do("k", ok) is ok.value

    run(main())


# -- 11. several event loops ----------------------------------------------------------------------


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
    """11: two threads, each in asyncio.run, same key: each loop runs its own loader."""
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
    """11: one group used by several asyncio.run calls in turn coalesces in each."""
    g: AsyncGroup[str, Token] = AsyncGroup()

    async def once(i: int) -> None:
        gate = asyncio.Event()
        loader = Loader(f"run {i}", gate=gate)
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
    """11: flights pending when asyncio.run ends are cleared; the loop can be collected."""
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
    """11: a loop closed with a flight pending is dropped at the next use, then collectable."""
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
    """11: forget/forget_unshared/`in`/len called outside a loop see every loop's flights."""
    g: AsyncGroup[str, Token] = AsyncGroup()
    loops = [asyncio.new_event_loop() for _ in range(2)]
    try:

        async def begin(shared: bool) -> tuple[asyncio.Event, Loader, list[asyncio.Future[Token]]]:
            gate = asyncio.Event()
            first = Loader("first", gate=gate)
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
            gate: asyncio.Event, first: Loader, futs: list[asyncio.Future[Token]]
        ) -> None:
            second = Loader("second")
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
