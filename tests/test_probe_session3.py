"""Findings of an adversarial pass over join counting and re-entry: each test failed
on the code before its fix (or is marked xfail).

Every wait is bounded (``WAIT``); a hang fails the test instead of stalling the run.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import weakref
from collections.abc import Iterator

import pytest

from singleflight import AsyncGroup, ReentryError
from tests._support import WAIT, run

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Threads switch as often as the interpreter allows: races show within a run."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


# -- stats() read from another thread while a loop's flights end ----------------------------


async def _two_steps() -> int:
    """A loader that suspends twice: its callers join while it runs."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return 1


def test_async_stats_joins_never_go_back_while_a_loop_runs(busy_switching: None) -> None:
    """When a flight's joins were counted as it left its table (a change tried and
    dropped), a read from another thread between the two steps missed them, so
    ``joins`` (and ``calls``) went back between two reads.  Joins are counted as
    they happen: they only grow."""
    group: AsyncGroup[int, int] = AsyncGroup()
    finished = threading.Event()
    went_back: list[tuple[int, int]] = []

    async def flights() -> None:
        for i in range(3000):
            await asyncio.gather(*(group.do(i % 7, _two_steps) for _ in range(8)))
            if went_back:
                return

    def read() -> None:
        joins = calls = 0
        while not finished.is_set():
            seen = group.stats()
            if seen.joins < joins or seen.calls < calls:
                went_back.append((joins, seen.joins))
                return
            joins, calls = seen.joins, seen.calls

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        run(flights(), timeout=40)
    finally:
        finished.set()
        reader.join(WAIT)
    assert not reader.is_alive()
    assert went_back == []
    assert group.stats().joins == 3000 * 7  # every flight had 7 joiners


def test_async_forget_from_another_thread_loses_no_join(busy_switching: None) -> None:
    """forget() outside any loop takes a loop's flight out from another thread.  When
    joins were counted as a flight left its table (a change tried and dropped), it
    counted them there, racing the loop's thread: joins were lost, and ``calls`` ended
    short of the calls made (a race: a few runs)."""
    rounds, callers = 2000, 12

    for _ in range(6):
        group: AsyncGroup[int, int] = AsyncGroup()
        finished = threading.Event()

        async def flights(group: AsyncGroup[int, int] = group) -> None:
            for i in range(rounds):
                await asyncio.gather(*(group.do(i % 3, _two_steps) for _ in range(callers)))

        def forget(
            group: AsyncGroup[int, int] = group, finished: threading.Event = finished
        ) -> None:
            while not finished.is_set():
                for key in range(3):
                    group.forget(key)

        forgetter = threading.Thread(target=forget, daemon=True)
        forgetter.start()
        try:
            run(flights(), timeout=40)
        finally:
            finished.set()
            forgetter.join(WAIT)
        assert not forgetter.is_alive()
        seen = group.stats()
        assert (seen.calls, seen.flights + seen.joins) == (rounds * callers, rounds * callers)


def test_async_stats_keep_a_collected_loops_counts_from_the_start() -> None:
    """A loop that is collected leaves the group's registry at once, and its finalizer
    moves its counters to the retired ones later: a read in between (another thread, or
    as here a weakref callback of the loop's) found the counts gone."""
    group: AsyncGroup[str, int] = AsyncGroup()

    async def load() -> int:
        return 1

    loop = asyncio.new_event_loop()
    loop.run_until_complete(group.do("k", load))
    loop.run_until_complete(group.do("k", load))
    loop.close()
    seen: list[int] = []
    # Made after the group's entry for the loop: called as the loop is collected.
    ref = weakref.ref(loop, lambda _: seen.append(group.stats().flights))
    del loop
    gc.collect()
    assert ref() is None
    assert seen == [2]
    assert group.stats().flights == 2


# -- re-entry while fn runs, from a task that is a loader already ----------------------------


def test_async_fn_calling_its_own_key_from_a_loader_task_is_reentry() -> None:
    """fn (before its coroutine runs) calls the group on the key it starts.  From a plain
    task that is ReentryError; from a task that is the loader of another flight it joined
    its own flight instead (the task's own flight was looked up first), and the flight
    then waited for itself forever."""
    group: AsyncGroup[str, str] = AsyncGroup()

    async def other() -> str:
        return "other"  # pragma: no cover - never runs: the call is refused

    def fn() -> object:
        future = group.do_future("inner", other)  # its own key, while fn runs

        async def body() -> str:
            return await future

        return body()

    async def outer() -> str:
        await asyncio.sleep(0)  # now a loader task known by its task, not while starting
        return await group.do("inner", fn)  # type: ignore[arg-type]

    async def main() -> None:
        with pytest.raises(ReentryError):
            await asyncio.wait_for(group.do("outer", outer), WAIT)

    run(main())
    assert len(group) == 0


@pytest.mark.parametrize("suspended", [False, True], ids=["eager", "suspended"])
def test_async_fn_joining_its_callers_flight_is_reentry(suspended: bool) -> None:
    """fn (before its coroutine runs) joins the flight of the loader that called the group,
    and its coroutine waits for it: the two loaders wait on each other.  While fn ran,
    the flight it starts stood for the task, but the caller's flight was marked as
    waiting on it only once fn returned: the cycle went unseen and both waited forever."""
    group: AsyncGroup[str, str] = AsyncGroup()

    def fn() -> object:
        future = group.do_future("outer", outer)  # the calling loader's own key

        async def body() -> str:
            return await future

        return body()

    async def outer() -> str:
        if suspended:
            await asyncio.sleep(0)  # a loader task known by its task, not while starting
        return await group.do("inner", fn)  # type: ignore[arg-type]

    async def main() -> None:
        with pytest.raises(ReentryError):
            await asyncio.wait_for(group.do("outer", outer), WAIT)

    run(main())
    assert len(group) == 0
