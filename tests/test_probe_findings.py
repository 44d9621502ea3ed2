"""Findings of an adversarial pass: each test failed on the code before its fix.

Every wait is bounded (``WAIT``); a hang fails the test instead of stalling the run.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from singleflight import AsyncGroup, Group, LoadingCache, WaitTimeoutError
from tests._support import WAIT, Gate, run, wait_joined

pytestmark = pytest.mark.timeout(30)


# -- a key whose __eq__ raises -------------------------------------------------------------


class _Colliding:
    """Keys that all share one hash; ``__eq__`` raises while ``hostile`` is set."""

    hostile = False

    def __init__(self, name: str) -> None:
        self.name = name

    def __hash__(self) -> int:
        return 1

    def __eq__(self, other: object) -> bool:
        if _Colliding.hostile:
            raise ValueError("__eq__ raised")
        return self is other

    def __repr__(self) -> str:
        return f"_Colliding({self.name})"


def test_group_waiters_wake_when_removing_the_key_raises() -> None:
    """Two keys of one hash in flight; when the second's flight ends, taking it out of
    the table compares it with the first, whose ``__eq__`` now raises.  Its waiter must
    still wake (it hung forever: the flight was never ended)."""
    group: Group[_Colliding, str] = Group()
    first, second = _Colliding("first"), _Colliding("second")
    hold_first, hold_second = Gate(), Gate()
    started = threading.Event()
    outcomes: dict[str, object] = {}

    def load_first() -> str:
        started.set()
        hold_first.wait()
        return "first"

    def load_second() -> str:
        hold_second.wait()
        return "second"

    def call(name: str, key: _Colliding, fn: object) -> None:
        try:
            outcomes[name] = group.do(key, fn)  # type: ignore[arg-type]
        except BaseException as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=call, args=("first", first, load_first), daemon=True)]
    threads[0].start()
    assert started.wait(WAIT)
    threads.append(threading.Thread(target=call, args=("second", second, load_second), daemon=True))
    threads[1].start()
    wait_joined(group, first, 0)
    threads.append(threading.Thread(target=call, args=("waiter", second, load_second), daemon=True))
    threads[2].start()
    try:
        wait_joined(group, second, 1)
        _Colliding.hostile = True
        hold_second.open()
        threads[2].join(WAIT)
        assert not threads[2].is_alive(), "the waiter of the flight never woke"
        assert isinstance(outcomes["waiter"], ValueError | str)
        assert all(flight.key is not second for flight in group._calls.values())
    finally:
        _Colliding.hostile = False
        hold_first.open()
        hold_second.open()
        for thread in threads:
            thread.join(WAIT)
    assert outcomes["first"] == "first"
    assert len(group) == 0


# -- AsyncGroup.do_result and a loader's own WaitTimeoutError --------------------------------


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_async_do_result_returns_the_loaders_wait_timeout_error(timeout: float | None) -> None:
    """A loader that raises ``WaitTimeoutError`` (from a group it called) fails its flight:
    ``do_result`` returns that error, as ``Group.do_result`` and ``AnyIOGroup.do_result``
    do.  It was raised, as if the caller's own ``timeout`` had passed."""

    async def loader() -> str:
        await asyncio.sleep(0)
        raise WaitTimeoutError("inner", 1.0)

    async def main() -> None:
        group: AsyncGroup[str, str] = AsyncGroup(timeout=timeout)
        result = await group.do_result("k", loader)
        assert isinstance(result.error, WaitTimeoutError) and result.value is None

        async def eager() -> str:  # fails without suspending (eager start on 3.12+)
            raise WaitTimeoutError("inner", 1.0)

        result = await group.do_result("k2", eager)
        assert isinstance(result.error, WaitTimeoutError)

    run(main())


def test_async_do_result_still_raises_its_own_timeout() -> None:
    async def main() -> None:
        group: AsyncGroup[str, str] = AsyncGroup(timeout=0.01)
        hold = asyncio.Event()

        async def slow() -> str:
            await hold.wait()
            return "v"

        with pytest.raises(WaitTimeoutError):
            await group.do_result("k", slow)
        hold.set()

    run(main())


# -- exception notes are each caller's own -------------------------------------------------


class _NotFound(Exception):
    pass


def test_negative_cached_error_notes_are_each_readers_own() -> None:
    """A reader that adds a note to the cached not-found error it caught must not add it
    to what the next reader catches (the notes list was shared by every copy)."""

    def load(key: int) -> str:
        error = _NotFound(key)
        error.add_note("from the loader")
        raise error

    cache = LoadingCache(load, ttl=60.0, negative=_NotFound, negative_ttl=60.0)
    seen = []
    for reader in range(3):
        with pytest.raises(_NotFound) as caught:
            cache.get(1)
        seen.append(list(caught.value.__notes__))
        caught.value.add_note(f"reader {reader}")
    assert seen == [["from the loader"]] * 3
    cache.close()


class _Slow(Exception):
    """An exception whose copy waits until ``noted`` is set: a waiter that wakes after
    the leader has handled its own exception."""

    noted = threading.Event()

    def __copy__(self) -> _Slow:
        assert _Slow.noted.wait(WAIT)
        dup = type(self)(*self.args)
        dup.__dict__.update(self.__dict__)
        return dup


def test_group_leaders_notes_do_not_reach_the_waiters() -> None:
    """The thread that ran the loader adds a note to its exception before a waiter has
    made its copy: the waiter's copy must hold the loader's notes only."""
    group: Group[str, str] = Group()
    started, release = threading.Event(), Gate()
    _Slow.noted.clear()

    def load() -> str:
        started.set()
        release.wait()
        error = _Slow("k")
        error.add_note("from the loader")
        raise error

    def leader() -> None:
        try:
            group.do("k", load)
        except _Slow as exc:
            exc.add_note("the leader's own")
            _Slow.noted.set()

    notes: list[object] = []

    def waiter() -> None:
        try:
            group.do("k", load)
        except _Slow as exc:
            notes.append(getattr(exc, "__notes__", None))

    threads = [threading.Thread(target=leader), threading.Thread(target=waiter)]
    threads[0].start()
    assert started.wait(WAIT)
    threads[1].start()
    wait_joined(group, "k", 1)
    release.open()
    for thread in threads:
        thread.join(WAIT)
    assert notes == [["from the loader"]]


# -- an on_event hook that calls the group on the key whose start it is told ---------------


@pytest.mark.parametrize("how", ["do_future", "timeout"])
def test_thread_hook_joining_its_own_flight_before_the_loader_starts(how: str) -> None:
    """``do_future`` (and ``do`` with ``timeout=``) tell ``FlightStarted`` in the caller's
    thread before the loader is handed to its thread.  A hook that calls ``do`` on that
    key there would wait for a loader that cannot start until it returns: it hung
    (``do_future``) or waited out the whole ``timeout``.  It gets ``ReentryError``, as a
    ``do`` caller's hook does."""
    from singleflight import ReentryError, events

    raised: list[BaseException] = []

    def hook(event: object) -> None:
        if isinstance(event, events.FlightStarted) and event.key == "same":
            try:
                group.do("same", lambda: "nested")
            except BaseException as exc:
                raised.append(exc)

    group: Group[str, str] = Group(on_event=hook, timeout=None if how == "do_future" else 60.0)
    outcome: list[object] = []

    def caller() -> None:
        if how == "do_future":
            outcome.append(group.do_future("same", lambda: "outer").result(WAIT))
        else:
            outcome.append(group.do("same", lambda: "outer"))

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), "the caller waited on its own hook"
    assert outcome == ["outer"]
    assert len(raised) == 1 and isinstance(raised[0], ReentryError)
    # Once started, the flight is joinable from the thread that started it.
    gate = Gate()
    future = group.do_future("other", lambda: (gate.wait(), "v")[1])
    joiner = threading.Thread(target=lambda: outcome.append(group.do("other", str)), daemon=True)
    joiner.start()
    wait_joined(group, "other", 1)
    gate.open()
    assert future.result(WAIT) == "v"
    joiner.join(WAIT)
    assert outcome[-1] == "v"


def test_do_future_then_do_in_the_same_thread_joins() -> None:
    """The thread that started a detached flight is no loader of it: its own ``do`` of
    the key joins (no ``ReentryError``)."""
    group: Group[str, str] = Group()
    gate = Gate()
    future = group.do_future("k", lambda: (gate.wait(), "v")[1])

    def open_once_joined() -> None:
        wait_joined(group, "k", 1)
        gate.open()

    opener = threading.Thread(target=open_once_joined, daemon=True)
    opener.start()
    assert group.do("k", str) == "v"
    assert future.result(WAIT) == "v"
    opener.join(WAIT)
