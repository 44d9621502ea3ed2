"""Hostile conditions for the group drivers: nobody hangs, nobody gets another caller's
value or exception.

Each test puts a driver in one of the situations listed in the issue "Core: nobody
hangs, nobody gets another caller's value or exception": event loops in several
threads, a hook raising ``KeyboardInterrupt``, an interrupt at an unlucky line, a key
whose ``repr`` raises, ``os.fork()`` during a flight, re-entry cycles, finalizers
calling the group, queued ``do_future`` calls, exception context, traceback growth,
hooks starting the key they are told about, eager tasks, async functions given to a
thread group, and loaders stopping the loop before their first await.

Every scenario runs in a thread of its own joined with a timeout (:func:`bounded`),
and async scenarios also run under ``anyio.fail_after``: a hang is a failure within
seconds, never a hung suite.  Threads, tasks and processes are real; overlap is made
with events and known from the group's counters, not from sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from singleflight import AbortedError, AsyncGroup, Group, ReentryError, WaitTimeoutError
from singleflight.anyio import AnyIOGroup
from singleflight.events import Event, FlightFinished, FlightStarted

from .._support import run_in_child

pytestmark = pytest.mark.timeout(60)

WAIT = 5.0  # seconds any single wait may take before it is a failure


# -- harness ----------------------------------------------------------------------------


def bounded(fn: Callable[[], Any], timeout: float = WAIT, what: str = "") -> Any:
    """Run ``fn`` in a daemon thread; its result, or its exception re-raised.

    A ``fn`` still running after ``timeout`` seconds is a hang: the test fails (the
    thread is left behind, blocked, as a daemon).
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # KeyboardInterrupt and SystemExit too
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name=f"bounded {what}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"hung: {what or fn} did not finish within {timeout}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@dataclass(frozen=True)
class AsyncDriver:
    """An async group class and the backend its scenarios run on."""

    name: str
    cls: type[Any]
    backend: str

    def run(self, main: Callable[[], Awaitable[Any]], timeout: float = WAIT) -> Any:
        async def guarded() -> Any:
            with anyio.fail_after(timeout):
                return await main()

        return bounded(lambda: anyio.run(guarded, backend=self.backend), timeout + 2, self.name)


ASYNC_DRIVERS = [
    AsyncDriver("asyncio", AsyncGroup, "asyncio"),
    AsyncDriver("anyio-asyncio", AnyIOGroup, "asyncio"),
    AsyncDriver("anyio-trio", AnyIOGroup, "trio"),
]
ASYNCIO_DRIVERS = ASYNC_DRIVERS[:2]


@pytest.fixture(params=ASYNC_DRIVERS, ids=lambda d: d.name)
def adriver(request: pytest.FixtureRequest) -> AsyncDriver:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=ASYNCIO_DRIVERS, ids=lambda d: d.name)
def asyncio_driver(request: pytest.FixtureRequest) -> AsyncDriver:
    return request.param  # type: ignore[no-any-return]


class BadRepr:
    """A key whose ``repr`` raises (an ORM row with a closed session, say)."""

    def __hash__(self) -> int:
        return 7

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BadRepr)

    def __repr__(self) -> str:
        raise RuntimeError("repr of this key fails")


class Private(Exception):
    """An exception a caller handles on its own, which must stay its own."""


class Shared(Exception):
    """What a loader raises, for every caller."""


def context_chain(exc: BaseException | None) -> list[BaseException]:
    chain = []
    while exc is not None and len(chain) < 50:
        chain.append(exc)
        exc = exc.__context__
    return chain


@contextlib.contextmanager
def gc_threshold(*threshold: int) -> Iterator[None]:
    saved = gc.get_threshold()
    gc.set_threshold(*threshold)
    try:
        yield
    finally:
        gc.set_threshold(*saved)


@contextlib.contextmanager
def switch_interval(seconds: float) -> Iterator[None]:
    saved = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(saved)


# -- 1. an AsyncGroup shared by event loops in several threads ----------------------------


@pytest.mark.parametrize("hook", [False, True], ids=["no-hook", "io-hook"])
def test_asyncgroup_shared_by_loops_in_threads_never_hangs(hook: bool) -> None:
    sink = open(os.devnull, "w")  # closed below

    def on_event(event: Event) -> None:
        sink.write(f"{event}\n")  # I/O: lets the other loop's thread run meanwhile
        sink.flush()

    group: AsyncGroup[int, int] = AsyncGroup(on_event=on_event if hook else None)
    keys = 200

    async def loader(key: int) -> int:
        await asyncio.sleep(0)
        return key

    async def main() -> list[int]:
        async def call(key: int) -> int:
            return await group.do(key, loader, key)

        return await asyncio.wait_for(
            asyncio.gather(*(call(k) for k in range(keys)), *(call(k) for k in range(keys))),
            WAIT,
        )

    results: list[list[int]] = []
    errors: list[BaseException] = []

    def thread() -> None:
        try:
            results.append(asyncio.run(main()))
        except BaseException as exc:
            errors.append(exc)

    try:
        with switch_interval(1e-5):
            for _ in range(3):
                threads = [threading.Thread(target=thread, daemon=True) for _ in range(2)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(WAIT + 2)
                assert not any(t.is_alive() for t in threads), "a loop hung"
                assert not errors, errors
    finally:
        sink.close()
    assert all(r == list(range(keys)) * 2 for r in results)
    assert len(group) == 0


# -- 2. a BaseException raised by an on_event hook ---------------------------------------


@pytest.mark.parametrize("event_type", [FlightStarted, FlightFinished])
def test_threads_hook_raising_keyboard_interrupt_leaves_no_stuck_key(
    event_type: type[Event],
) -> None:
    raised: list[Event] = []

    def hook(event: Event) -> None:
        if isinstance(event, event_type) and not raised:
            raised.append(event)
            raise KeyboardInterrupt

    group: Group[str, int] = Group(on_event=hook)
    with pytest.raises(KeyboardInterrupt):
        bounded(lambda: group.do("k", lambda: 1), what="the interrupted call")
    assert raised
    assert bounded(lambda: group.do("k", lambda: 2), what="the next call") == 2
    assert len(group) == 0


def test_async_hook_raising_keyboard_interrupt_leaves_no_stuck_key(adriver: AsyncDriver) -> None:
    raised: list[Event] = []

    def hook(event: Event) -> None:
        if isinstance(event, FlightStarted) and not raised:
            raised.append(event)
            raise KeyboardInterrupt

    async def loader(value: int) -> int:
        await anyio.sleep(0)
        return value

    async def main() -> int:
        group = adriver.cls(on_event=hook)
        with pytest.raises(KeyboardInterrupt):
            await group.do("k", loader, 1)
        with anyio.fail_after(2):
            value = await group.do("k", loader, 2)
        assert len(group) == 0
        return value  # type: ignore[no-any-return]

    assert adriver.run(main) == 2
    assert raised


# -- 3. KeyboardInterrupt at an unlucky line of Group.do -------------------------------------


def _lines_of(fn: Any) -> list[int]:
    code = fn.__code__
    return sorted({line for _, _, line in code.co_lines() if line is not None})


@pytest.mark.timeout(120)
def test_threads_keyboard_interrupt_at_any_line_of_do_leaves_nobody_stuck() -> None:
    """Interrupt the leader at each line of ``Group.do`` and of what ends its flight.

    Afterwards the joiner (if one could join) is answered, and a new thread's call
    of the key runs: no stuck key, no waiter blocked, no false re-entry error.
    """
    targets = [Group.do, Group._settle]
    codes = {fn.__code__ for fn in targets}
    failures: list[str] = []
    for fn in targets:
        for line in _lines_of(fn)[1:]:  # [0] is the def line
            problem = _interrupt_at(fn.__code__, line, codes)
            if problem:
                failures.append(f"{fn.__qualname__} line {line}: {problem}")
    assert not failures, "\n".join(failures)


def _interrupt_at(code: Any, line: int, codes: set[Any]) -> str | None:
    group: Group[str, str] = Group()
    started = threading.Event()
    gate = threading.Event()
    fired = threading.Event()

    def loader() -> str:
        started.set()
        gate.wait(WAIT)
        return "leader"

    def local_trace(frame: Any, event: str, arg: Any) -> Any:
        hit = event == "line" and frame.f_code is code and frame.f_lineno == line
        if hit and not fired.is_set():
            fired.set()
            raise KeyboardInterrupt
        return local_trace

    def global_trace(frame: Any, event: str, arg: Any) -> Any:
        return local_trace if frame.f_code in codes else None

    def leader() -> None:
        sys.settrace(global_trace)
        try:
            group.do("k", loader)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)

    lead = threading.Thread(target=leader, daemon=True)
    lead.start()
    joiner_out: list[object] = []
    joiner = None
    # The loader starts, or the leader is interrupted before it does.
    while not started.wait(0.005) and lead.is_alive():
        pass
    if started.is_set():

        def join() -> None:
            try:
                joiner_out.append(group.do("k", lambda: "joiner"))
            except BaseException as exc:
                joiner_out.append(exc)

        joiner = threading.Thread(target=join, daemon=True)
        joiner.start()
        for _ in range(1000):  # the joiner has joined (or led, after an early interrupt)
            if group.stats().joins or joiner_out or not joiner.is_alive():
                break
            joiner.join(0.002)
    gate.set()
    lead.join(WAIT)
    if lead.is_alive():
        return "the leader hung"
    if joiner is not None:
        joiner.join(WAIT)
        if joiner.is_alive():
            return "the joiner was never woken"
        if not joiner_out or not (
            joiner_out[0] in ("leader", "joiner") or isinstance(joiner_out[0], AbortedError)
        ):
            return f"the joiner got {joiner_out!r}"
    try:
        after = bounded(lambda: group.do("k", lambda: "after"), 2.0, "the next call")
    except BaseException as exc:
        return f"the next call raised {exc!r}"
    if after != "after":
        return f"the next call got {after!r}"
    return None


# -- 4. a key whose repr raises, in a flight that is aborted -----------------------------------


def test_threads_bad_repr_key_with_interrupted_loader() -> None:
    key = BadRepr()
    group: Group[BadRepr, str] = Group()
    started = threading.Event()
    gate = threading.Event()

    def loader() -> str:
        started.set()
        gate.wait(WAIT)
        raise KeyboardInterrupt

    joined: list[object] = []

    def leader() -> None:
        with pytest.raises(KeyboardInterrupt):
            group.do(key, loader)

    def joiner() -> None:
        try:
            group.do(key, lambda: "joiner")
        except BaseException as exc:
            joined.append(exc)

    lead = threading.Thread(target=leader, daemon=True)
    lead.start()
    assert started.wait(WAIT)
    join = threading.Thread(target=joiner, daemon=True)
    join.start()
    while not group.stats().joins:
        join.join(0.002)
    gate.set()
    lead.join(WAIT)
    join.join(WAIT)
    assert not lead.is_alive() and not join.is_alive()
    assert len(joined) == 1 and isinstance(joined[0], AbortedError)
    assert bounded(lambda: group.do(key, lambda: "after")) == "after"


@pytest.mark.parametrize("how", ["do_future", "timeout"])
def test_threads_bad_repr_key_on_worker_threads(how: str) -> None:
    key = BadRepr()
    group: Group[BadRepr, str] = Group(timeout=WAIT) if how == "timeout" else Group()

    def call() -> str:
        if how == "do_future":
            return group.do_future(key, lambda: "v").result(WAIT)
        return group.do(key, lambda: "v")

    assert bounded(call) == "v"
    assert len(group) == 0


def test_async_bad_repr_key_with_orphaned_loader_cancelled(adriver: AsyncDriver) -> None:
    key = BadRepr()

    async def main() -> str:
        group = adriver.cls(cancel_orphaned=True)
        started = anyio.Event()

        async def loader() -> str:
            started.set()
            await anyio.sleep_forever()
            return "never"

        async with anyio.create_task_group() as tg:

            async def caller(scope: anyio.CancelScope) -> None:
                with scope:
                    await group.do(key, loader)

            scope = anyio.CancelScope()
            tg.start_soon(caller, scope)
            await started.wait()
            scope.cancel()
        # The loader was cancelled as orphaned: the key is free again.
        with anyio.fail_after(2):

            async def quick() -> str:
                await anyio.sleep(0)
                return "after"

            return await group.do(key, quick)  # type: ignore[no-any-return]

    assert adriver.run(main) == "after"


def test_async_bad_repr_key_past_loader_timeout(adriver: AsyncDriver) -> None:
    key = BadRepr()

    async def main() -> None:
        group = adriver.cls(loader_timeout=0.01)

        async def loader() -> str:
            await anyio.sleep_forever()
            return "never"

        with pytest.raises(TimeoutError) as info:
            await group.do(key, loader)
        assert not isinstance(info.value, WaitTimeoutError)
        assert len(group) == 0

    adriver.run(main)


# -- 5. os.fork() during a flight -----------------------------------------------------------


fork_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@fork_only
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads running
def test_threads_fork_during_a_flight_resets_it_in_the_child() -> None:
    group: Group[str, str] = Group()
    started = threading.Event()
    gate = threading.Event()

    def loader() -> str:
        started.set()
        gate.wait(WAIT)
        return "parent"

    leader = threading.Thread(target=lambda: group.do("k", loader), daemon=True)
    leader.start()
    assert started.wait(WAIT)

    def child() -> None:
        assert group.do("k", lambda: "child main") == "child main"
        out: list[object] = []

        def other() -> None:
            try:
                out.append(group.do("k", lambda: "child thread"))
            except BaseException as exc:
                out.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join(3)
        assert out == ["child thread"]

    try:
        run_in_child(child)
    finally:
        gate.set()
        leader.join(WAIT)


@fork_only
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_asyncgroup_fork_during_a_flight_resets_it_in_the_child(
    asyncio_driver: AsyncDriver,
) -> None:
    group = asyncio_driver.cls()
    started = threading.Event()
    release = threading.Event()

    async def slow() -> str:
        started.set()
        await asyncio.to_thread(release.wait, WAIT)
        return "parent"

    async def quick(value: str) -> str:
        await asyncio.sleep(0)
        return value

    parent = threading.Thread(target=lambda: asyncio.run(group.do("k", slow)), daemon=True)
    parent.start()
    assert started.wait(WAIT)

    def child() -> None:
        assert asyncio.run(group.do("k", quick, "child")) == "child"
        assert len(group) == 0

    try:
        run_in_child(child)
    finally:
        release.set()
        parent.join(WAIT)


# -- 6. re-entry cycles ------------------------------------------------------------------------


@pytest.mark.parametrize("await_first", [False, True], ids=["eager", "awaits-first"])
def test_async_reentry_cycle_raises_reentry_error(adriver: AsyncDriver, await_first: bool) -> None:
    async def main() -> None:
        group = adriver.cls()

        async def load_a() -> str:
            if await_first:
                await anyio.sleep(0)
            return await group.do("b", load_b)  # type: ignore[no-any-return]

        async def load_b() -> str:
            if await_first:
                await anyio.sleep(0)
            return await group.do("a", load_a)  # type: ignore[no-any-return]

        with anyio.fail_after(2), pytest.raises(ReentryError) as info:
            await group.do("a", load_a)
        message = str(info.value)
        assert "'a'" in message and "'b'" in message, message

    adriver.run(main)


def test_async_reentry_cycle_with_timeout_is_no_wait_timeout(adriver: AsyncDriver) -> None:
    async def main() -> None:
        group = adriver.cls(timeout=1.0)

        async def load_a() -> str:
            await anyio.sleep(0)
            return await group.do("b", load_b)  # type: ignore[no-any-return]

        async def load_b() -> str:
            await anyio.sleep(0)
            return await group.do("a", load_a)  # type: ignore[no-any-return]

        with pytest.raises(ReentryError):
            await group.do("a", load_a)

    adriver.run(main)


# -- 7. finalizers calling the group while the GC runs inside its lock ---------------------


class _CallsOnCollect:
    """Cyclic garbage whose finalizer calls ``group.do`` (a pool returning a connection)."""

    def __init__(self, group: Group[Any, Any], key: object) -> None:
        self.group = group
        self.key = key
        self.me = self

    def __del__(self) -> None:
        self.group.do(self.key, lambda: None)


def test_threads_finalizer_calling_the_group_during_gc_does_not_deadlock() -> None:
    group: Group[Any, Any] = Group()

    def churn() -> None:
        with gc_threshold(1, 1000, 1000):  # young collections only: fast
            for i in range(3000):
                _CallsOnCollect(group, ("finalizer", i))
                group.do(i, int, i)
                group.do_result(i, int, i)

    try:
        bounded(churn, 20, "calls with finalizers calling the group")
    finally:
        gc.collect()


# -- 8. queued do_future calls --------------------------------------------------------------


def test_threads_queued_do_future_calls_use_a_bounded_number_of_threads() -> None:
    group: Group[int, int] = Group(max_flights=2, on_limit="wait")
    gate = threading.Event()

    def blocked(i: int) -> int:
        gate.wait(WAIT)
        return i

    before = threading.active_count()
    running = [group.do_future(i, blocked, i) for i in range(2)]
    queued = [group.do_future(i, blocked, i) for i in range(2, 302)]
    try:
        grown = threading.active_count() - before
    finally:
        gate.set()
    results = [f.result(WAIT) for f in running + queued]
    assert results == list(range(302))
    assert grown <= 2 + 16, f"{grown} threads for 2 flights and 300 queued calls"


# -- 9. exception context between callers ------------------------------------------------------


def test_threads_a_caller_handling_its_own_error_leaks_no_context() -> None:
    group: Group[str, str] = Group()
    started = threading.Event()
    gate = threading.Event()
    seen: dict[str, BaseException] = {}

    def loader() -> str:
        started.set()
        gate.wait(WAIT)
        raise Shared("from the loader")

    def plain() -> None:
        try:
            group.do("k", loader)
        except Shared as exc:
            seen["plain"] = exc

    def handling() -> None:
        try:
            raise Private("the joiner's own")
        except Private:
            try:
                group.do("k", loader)
            except Shared as exc:
                seen["handling"] = exc

    lead = threading.Thread(target=plain)
    lead.start()
    assert started.wait(WAIT)
    join = threading.Thread(target=handling)
    join.start()
    while not group.stats().joins:
        join.join(0.002)
    gate.set()
    lead.join(WAIT)
    join.join(WAIT)
    assert set(seen) == {"plain", "handling"}
    assert not any(isinstance(e, Private) for e in context_chain(seen["plain"])[1:])


def test_async_a_caller_handling_its_own_error_leaks_no_context(adriver: AsyncDriver) -> None:
    async def main() -> None:
        group = adriver.cls()
        started = anyio.Event()
        gate = anyio.Event()
        seen: dict[str, BaseException] = {}

        async def loader() -> str:
            started.set()
            await gate.wait()
            raise Shared("from the loader")

        async def plain() -> None:
            try:
                await group.do("k", loader)
            except Shared as exc:
                seen["plain"] = exc

        async def handling() -> None:
            try:
                raise Private("the joiner's own")
            except Private:
                try:
                    await group.do("k", loader)
                except Shared as exc:
                    seen["handling"] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(plain)
            await started.wait()
            tg.start_soon(handling)
            while group.stats().joins < 1:
                await anyio.sleep(0)
            gate.set()
        assert set(seen) == {"plain", "handling"}
        assert not any(isinstance(e, Private) for e in context_chain(seen["plain"])[1:])

    adriver.run(main)


# -- 11. Result.unwrap() traceback growth -------------------------------------------------------


def test_async_do_result_unwrap_does_not_grow_the_traceback(adriver: AsyncDriver) -> None:
    waiters = 300

    async def main() -> int:
        group = adriver.cls()
        started = anyio.Event()
        gate = anyio.Event()
        depths: list[int] = []

        async def loader() -> str:
            started.set()
            await gate.wait()
            raise Shared("shared")

        async def caller() -> None:
            result = await group.do_result("k", loader)
            try:
                result.unwrap()
            except Shared as exc:
                depths.append(len(traceback.extract_tb(exc.__traceback__)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(caller)
            await started.wait()
            for _ in range(waiters - 1):
                tg.start_soon(caller)
            while group.stats().joins < waiters - 1:
                await anyio.sleep(0)
            gate.set()
        assert len(depths) == waiters
        return max(depths) - min(depths)

    assert adriver.run(main) <= 2


def test_threads_do_result_unwrap_does_not_grow_the_traceback() -> None:
    group: Group[str, str] = Group()

    def loader() -> str:
        raise Shared("shared")

    depths = []
    for _ in range(50):
        result = group.do_result("k", loader)
        try:
            result.unwrap()
        except Shared as exc:
            depths.append(len(traceback.extract_tb(exc.__traceback__)))
    assert max(depths) - min(depths) == 0


# -- 13. a hook that starts the key it is told about -------------------------------------------


def test_async_hook_starting_the_same_key_on_flight_started_joins(adriver: AsyncDriver) -> None:
    async def main() -> None:
        runs: list[str] = []
        gate = anyio.Event()
        futures: list[Any] = []
        group: Any = None

        async def loader() -> str:
            runs.append("run")
            await gate.wait()
            return "value"

        def hook(event: Event) -> None:
            if isinstance(event, FlightStarted) and not futures:
                futures.append(group.do_future(event.key, loader))

        group = adriver.cls(on_event=hook)
        async with anyio.create_task_group() as tg:
            results: list[str] = []

            async def caller() -> None:
                results.append(await group.do("k", loader))

            tg.start_soon(caller)
            while not runs:
                await anyio.sleep(0)
            gate.set()
        assert futures
        from_hook = futures[0]
        if hasattr(from_hook, "wait"):
            await from_hook.wait()  # AnyIO's FlightFuture
            value = from_hook.result()
        else:
            value = await from_hook
        assert results == ["value"] and value == "value"
        assert runs == ["run"], "the loader ran twice"

    adriver.run(main)


def test_threads_hook_starting_the_same_key_on_flight_started_joins() -> None:
    runs: list[str] = []
    futures: list[Any] = []
    gate = threading.Event()
    group: Group[str, str]

    def loader() -> str:
        runs.append("run")
        gate.wait(WAIT)
        return "value"

    def hook(event: Event) -> None:
        if isinstance(event, FlightStarted) and not futures:
            futures.append(group.do_future(event.key, loader))

    group = Group(on_event=hook)
    first = group.do_future("k", loader)
    gate.set()
    assert first.result(WAIT) == "value" and futures[0].result(WAIT) == "value"
    assert runs == ["run"]


# -- 14. eager tasks spawned by a loader ------------------------------------------------------


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager_task_factory is 3.12+")
def test_eager_task_spawned_by_the_loader_joins_its_flight(asyncio_driver: AsyncDriver) -> None:
    async def main() -> list[str]:
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
        group = asyncio_driver.cls()
        spawned: list[asyncio.Task[str]] = []
        gate = asyncio.Event()

        async def other() -> str:
            return "other"

        async def loader() -> str:
            spawned.append(asyncio.get_running_loop().create_task(group.do("k", other)))
            await gate.wait()
            return "value"

        async def release() -> None:
            await asyncio.sleep(0)
            gate.set()

        asyncio.get_running_loop().create_task(release())
        value = await asyncio.wait_for(group.do("k", loader), WAIT)
        joined = await asyncio.wait_for(spawned[0], WAIT)
        return [value, joined]

    assert asyncio_driver.run(main) == ["value", "value"]


# -- 15. an async function given to the thread group --------------------------------------------


@pytest.mark.parametrize("method", ["do", "do_result", "do_future"])
@pytest.mark.parametrize("options", [{}, {"timeout": WAIT}], ids=["plain", "timeout"])
def test_threads_group_refuses_an_async_function(method: str, options: dict[str, Any]) -> None:
    async def load() -> str:
        return "v"

    group: Group[str, Any] = Group(**options)
    with pytest.raises(TypeError, match="AsyncGroup"):
        outcome = getattr(group, method)("k", load)
        if method == "do_future":
            outcome.result(WAIT)
        elif method == "do_result":
            outcome.unwrap()
        if asyncio.iscoroutine(outcome):
            outcome.close()
    assert len(group) == 0


# -- 16. cancel_orphaned must be a bool ----------------------------------------------------------


@pytest.mark.parametrize("value", ["no", 0, None, 1])
def test_cancel_orphaned_must_be_a_bool(adriver: AsyncDriver, value: object) -> None:
    with pytest.raises(TypeError, match="cancel_orphaned"):
        adriver.cls(cancel_orphaned=value)


# -- 18. a loader stopping the loop before its first await ---------------------------------------


@pytest.mark.skipif(
    sys.version_info < (3, 12),
    reason="eager task start is 3.12+; before, the loader's first step runs in the loop, "
    "whose run it ends, as any asyncio task's KeyboardInterrupt or SystemExit does",
)
@pytest.mark.parametrize("stop", [SystemExit, KeyboardInterrupt])
def test_asyncio_loader_raising_base_exception_eagerly_logs_nothing(
    stop: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    contexts: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: contexts.append(ctx))
        group: AsyncGroup[str, str] = AsyncGroup()

        async def loader() -> str:
            raise stop

        with pytest.raises(stop):
            await group.do("k", loader)
        gc.collect()
        await asyncio.sleep(0)
        gc.collect()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        bounded(lambda: asyncio.run(main()))
        gc.collect()
    messages = [c.get("message") for c in contexts] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if m and "never retrieved" in m], messages
