"""Soak: thousands of keys, threads and tasks, errors, cancellations, timeouts and forgets.

Threads on ``Group``, tasks on ``AsyncGroup`` under asyncio and tasks on
``AnyIOGroup`` under trio, all at once.  Runs for ``SINGLEFLIGHT_SOAK_SECONDS``
(3 by default, as in CI).  The long run::

    SINGLEFLIGHT_SOAK_SECONDS=600 python -m pytest tests/test_soak.py

Checks: every call ended with an outcome it may have; at most one loader of a
key ran at a time, except for keys forgotten meanwhile; nothing is left in
flight; ``stats()`` adds up and equals our own counts; traced memory returns to
its baseline.
"""

from __future__ import annotations

import gc
import os
import random
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError as FutureCancelled
from typing import Any

import anyio
import pytest

from singleflight import AbortedError, AsyncGroup, Group, TooManyFlightsError, WaitTimeoutError
from singleflight.anyio import AnyIOGroup

from ._support import Stop

SECONDS = float(os.environ.get("SINGLEFLIGHT_SOAK_SECONDS", "3"))
KEYS = 3000
THREADS = 12
TASKS = 200
# Memory the soak may keep after it is over: interpreter caches (threading's
# tables, freelists) grow with the run's peak and do not all shrink.
SLACK = 512 * 1024


class Track:
    """Our own view of one group: loaders running per key, and what callers got."""

    def __init__(
        self, name: str, *, timeout: bool = False, limit: bool = False, wait: bool = False
    ) -> None:
        self.name = name
        # The group's options, as far as the checks need them.
        self.timeout = timeout
        self.limit = limit
        self.wait = wait
        # Hot keys: with max_flights=2, few enough that a call often finds its key in
        # flight (20 left a whole run without a join once in a few runs).
        self.hot = 4 if limit else 20
        self.lock = threading.Lock()
        self.running = [0] * KEYS
        self.forgotten = bytearray(KEYS)  # keys forgotten at least once: overlap allowed
        self.overlaps: list[int] = []
        self.outcomes: Counter[str] = Counter()
        self.loads = self.errors = self.interrupts = 0
        self.stats: Any = None  # an AsyncGroup's stats(), read before its loop closes

    def enter(self, key: int) -> None:
        with self.lock:
            self.loads += 1
            self.running[key] += 1
            if self.running[key] > 1 and not self.forgotten[key]:
                self.overlaps.append(key)

    def leave(self, key: int) -> None:
        with self.lock:
            self.running[key] -= 1

    def forget(self, key: int) -> None:
        # Marked before the forget, so a loader that starts right after it is allowed.
        with self.lock:
            self.forgotten[key] = 1

    def got(self, outcome: str) -> None:
        with self.lock:
            self.outcomes[outcome] += 1

    def pause(self, rng: random.Random) -> float:
        """How long a loader takes: a few ms; in a group with a timeout, one in ten
        far past it, so that its callers time out however loaded the machine is,
        while the quick ones still finish in time."""
        if self.timeout and rng.random() < 0.1:
            return 0.25
        return rng.random() * 0.004

    def loader_fails(self, rng: random.Random) -> type[BaseException] | None:
        draw = rng.random()
        if draw < 0.08:
            with self.lock:
                self.errors += 1
            return ValueError
        if draw < 0.1:
            with self.lock:
                self.interrupts += 1
            return Stop
        return None


def sync_loader(track: Track, key: int, rng: random.Random) -> Callable[[], tuple[int, str]]:
    def load() -> tuple[int, str]:
        track.enter(key)
        try:
            time.sleep(track.pause(rng))
            failure = track.loader_fails(rng)
            if failure is not None:
                raise failure(key)
            return (key, track.name)
        finally:
            track.leave(key)

    return load


def thread_worker(
    group: Group[int, tuple[int, str]], track: Track, deadline: float, seed: int
) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        key = rng.randrange(KEYS)
        # Hot keys get many joiners; the rest spread over thousands.
        if rng.random() < 0.5:
            key %= track.hot
        draw = rng.random()
        if draw < 0.03:
            track.forget(key)
            group.forget(key)
            continue
        load = sync_loader(track, key, rng)
        cancelled = False
        try:
            if draw < 0.7:
                value = group.do(key, load)
            else:
                future = group.do_future(key, load)
                if rng.random() < 0.2:
                    cancelled = future.cancel()
                value = future.result(timeout=10)
        except ValueError:
            track.got("error")
        except Stop:
            track.got("interrupt")  # this thread ran the loader itself
        except AbortedError:
            track.got("aborted")
        except TooManyFlightsError:
            assert track.limit, "TooManyFlightsError from a group without max_flights"
            track.got("rejected")
        except FutureCancelled:
            assert cancelled, "a future nobody cancelled was cancelled"
            track.got("cancelled")
        except TimeoutError:
            assert track.timeout, "TimeoutError from a group without timeout"
            track.got("timeout")
        else:
            assert value == (key, track.name)
            track.got("value")


async def task_soak(
    deadline: float, groups: Sequence[tuple[AsyncGroup[int, Any] | AnyIOGroup[int, Any], Track]]
) -> None:
    """Tasks on AsyncGroup (run under asyncio) or AnyIOGroup (under trio): one workload."""

    async def worker(
        group: AsyncGroup[int, Any] | AnyIOGroup[int, Any], track: Track, seed: int
    ) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            key = rng.randrange(KEYS)
            if rng.random() < 0.5:
                key %= track.hot
            draw = rng.random()
            if draw < 0.03:
                track.forget(key)
                group.forget(key)
                await anyio.sleep(0)
                continue

            async def load(key: int = key) -> tuple[int, str]:
                track.enter(key)
                try:
                    await anyio.sleep(track.pause(rng))
                    failure = track.loader_fails(rng)
                    if failure is not None:
                        raise failure(key)
                    return (key, track.name)
                finally:
                    track.leave(key)

            # With cancel_orphaned, a caller that leaves may cancel the loader
            # while a new flight of the key starts: treat the key as forgotten.
            cancel = draw < 0.15
            if cancel and track.wait:  # here "wait" marks cancel_orphaned=True
                track.forget(key)
            value: object = None
            try:
                if cancel:
                    with anyio.move_on_after(rng.random() * 0.003) as scope:
                        value = await group.do(key, load)
                    if scope.cancelled_caught:
                        track.got("cancelled")
                        continue
                else:
                    value = await group.do(key, load)
            except ValueError:
                track.got("error")
            except AbortedError:
                track.got("aborted")
            except TooManyFlightsError:
                assert track.limit, "TooManyFlightsError from a group without max_flights"
                track.got("rejected")
            except WaitTimeoutError:
                assert track.timeout, "WaitTimeoutError from a group without timeout"
                track.got("timeout")
            else:
                assert value == (key, track.name)
                track.got("value")

    with anyio.fail_after(SECONDS + 60):
        async with anyio.create_task_group() as tasks:
            for seed in range(TASKS):
                group, track = groups[seed % len(groups)]
                tasks.start_soon(worker, group, track, seed)
    # Loaders whose callers all left run on (cancel_orphaned=False): let them end.
    for group, _ in groups:
        for _ in range(2000):
            if len(group) == 0:
                break
            await anyio.sleep(0.005)
        assert len(group) == 0, f"{group!r} holds flights after the soak"
    await anyio.sleep(0.05)
    # Read now: the groups' stats() sum the loops and runs still open, and this one ends next.
    for group, track in groups:
        track.stats = group.stats()


def wait_empty(group: Group[Any, Any]) -> None:
    for _ in range(2000):
        if len(group) == 0 and group.stats().in_flight == 0:
            return
        time.sleep(0.005)
    raise AssertionError(f"{group!r} still holds flights after the soak")


Soak = tuple[
    list[tuple[Group[int, Any], Track]],
    list[tuple[AsyncGroup[int, Any], Track]],
    list[tuple[AnyIOGroup[int, Any], Track]],
]


def run_soak(seconds: float) -> Soak:
    thread_groups: list[tuple[Group[int, Any], Track]] = [
        (Group(name="plain"), Track("plain")),
        (Group(name="timeout", timeout=0.05), Track("timeout", timeout=True)),
        (Group(name="limit", max_flights=2), Track("limit", limit=True)),
        (
            Group(name="wait", max_flights=2, on_limit="wait", timeout=0.05),
            Track("wait", limit=True, wait=True, timeout=True),
        ),
    ]
    async_groups: list[tuple[AsyncGroup[int, Any], Track]] = [
        (AsyncGroup(), Track("async")),
        (AsyncGroup(cancel_orphaned=True), Track("abandon", wait=True)),
        (AsyncGroup(timeout=0.05), Track("atimeout", timeout=True)),
        (AsyncGroup(max_flights=2), Track("alimit", limit=True)),
    ]
    trio_groups: list[tuple[AnyIOGroup[int, Any], Track]] = [
        (AnyIOGroup(name="trio"), Track("trio")),
        (AnyIOGroup(name="trio-abandon", cancel_orphaned=True), Track("trio-abandon", wait=True)),
        (AnyIOGroup(name="trio-timeout", timeout=0.05), Track("trio-timeout", timeout=True)),
        (AnyIOGroup(name="trio-limit", max_flights=2), Track("trio-limit", limit=True)),
    ]
    deadline = time.monotonic() + seconds
    errors: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)

        return run

    threads = [
        threading.Thread(
            target=guarded(
                lambda i=i: thread_worker(*thread_groups[i % len(thread_groups)], deadline, i)
            )
        )
        for i in range(THREADS)
    ]
    threads.append(
        threading.Thread(
            target=guarded(lambda: anyio.run(task_soak, deadline, async_groups, backend="asyncio"))
        )
    )
    threads.append(
        threading.Thread(
            target=guarded(lambda: anyio.run(task_soak, deadline, trio_groups, backend="trio"))
        )
    )
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 90)
        assert not thread.is_alive(), "a soak worker hung"
    if errors:
        raise errors[0]
    for group, _ in thread_groups:
        wait_empty(group)
    return thread_groups, async_groups, trio_groups


def check(
    thread_groups: list[tuple[Group[int, Any], Track]],
    async_groups: list[tuple[AsyncGroup[int, Any], Track]],
    trio_groups: list[tuple[AnyIOGroup[int, Any], Track]],
    *,
    coverage: bool = True,
) -> None:
    """The soak's checks; ``coverage`` also asks that each rare path was taken."""
    for group, track in thread_groups:
        assert not track.overlaps, f"{track.name}: two loaders of keys {track.overlaps[:5]}"
        assert not any(track.running)
        stats = group.stats()
        got = track.outcomes
        assert len(group) == 0 and stats.in_flight == 0
        assert stats.calls == stats.flights + stats.joins
        assert stats.flights == track.loads, track.name
        assert stats.errors == track.errors, track.name
        assert stats.aborted == track.interrupts, track.name
        assert stats.rejected == got["rejected"], track.name
        # Group timeouts are counted by the group; a caller's own result(timeout=)
        # is not a group timeout, and cancelled futures are the caller's own --
        # except that a do_future() cancelled while it waits for a slot still
        # waits (on its helper thread), and may time out there.
        if track.wait:
            assert got["timeout"] <= stats.timeouts <= got["timeout"] + got["cancelled"]
        else:
            assert stats.timeouts == got["timeout"], track.name
        calls = sum(got.values())
        if track.wait:
            # A caller that timed out waiting for a slot never became a call.
            assert stats.calls <= calls - stats.rejected <= stats.calls + stats.timeouts
        else:
            assert stats.calls == calls - stats.rejected, track.name
        if coverage:
            assert got["value"] > 0 and stats.joins > 0, f"{track.name} did not coalesce"
    expected = {"plain", "limit"}
    for _, track in thread_groups:
        if track.name in expected:
            assert track.outcomes["timeout"] == 0
    if coverage:
        assert thread_groups[1][1].outcomes["timeout"] > 0, "timeouts were not exercised"
    if coverage:
        assert thread_groups[2][1].outcomes["rejected"] > 0, "max_flights was not exercised"
    if coverage:
        assert sum(t.outcomes["aborted"] for _, t in thread_groups) > 0
    if coverage:
        assert sum(t.outcomes["cancelled"] for _, t in thread_groups) > 0
    for agroup, track in [*async_groups, *trio_groups]:
        assert not track.overlaps, f"{track.name}: two loaders of keys {track.overlaps[:5]}"
        assert not any(track.running), f"{track.name}: a loader never ended"
        got = track.outcomes
        if coverage:
            assert got["value"] > 0, (track.name, dict(got), track.loads)
        stats = track.stats
        assert len(agroup) == 0 and stats.in_flight == 0
        assert stats.calls == stats.flights + stats.joins
        assert stats.errors == track.errors, track.name
        assert stats.rejected == got["rejected"], track.name
        assert stats.timeouts == got["timeout"], track.name
        assert stats.calls == sum(got.values()) - stats.rejected, track.name
        if track.wait:
            # cancel_orphaned: loaders cancelled when their callers left, some
            # (under trio) before their first line ran -- flights, but no loads.
            cancelled = stats.aborted - track.interrupts
            assert cancelled >= 0, track.name
            assert track.loads <= stats.flights <= track.loads + cancelled, track.name
        else:
            assert stats.flights == track.loads, track.name
            assert stats.aborted == track.interrupts, track.name
    if coverage:
        for groups in (async_groups, trio_groups):
            assert sum(t.outcomes["error"] for _, t in groups) > 0
            assert sum(t.outcomes["cancelled"] for _, t in groups) > 0
            assert sum(t.outcomes["aborted"] for _, t in groups) > 0
    if coverage:
        assert trio_groups[2][1].outcomes["timeout"] > 0, "AnyIOGroup timeout= was not exercised"
        assert trio_groups[3][1].outcomes["rejected"] > 0, (
            "AnyIOGroup max_flights was not exercised"
        )
    if coverage:
        assert async_groups[2][1].outcomes["timeout"] > 0, "AsyncGroup timeout= was not exercised"
    if coverage:
        assert async_groups[3][1].outcomes["rejected"] > 0, (
            "AsyncGroup max_flights was not exercised"
        )


@pytest.mark.timeout(20)
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_cancel_a_future_waiting_for_a_slot() -> None:
    """A do_future() waiting for a slot may be cancelled: its helper thread gives up, raising
    nothing and starting nothing."""
    group: Group[str, str] = Group(max_flights=1, on_limit="wait")
    release = threading.Event()
    holder = threading.Thread(target=group.do, args=("busy", lambda: release.wait(10) and "x"))
    holder.start()
    try:
        for _ in range(1000):
            if "busy" in group:
                break
            time.sleep(0.005)
        future = group.do_future("other", lambda: "y")  # waits for a slot on a thread
        assert future.cancel()
    finally:
        release.set()
        holder.join(10)
    for _ in range(1000):  # the helper thread is woken by the cancel and leaves
        if group._slot_waiters == 0 and len(group) == 0:
            break
        time.sleep(0.005)
    time.sleep(0.05)  # let the helper thread finish (and report what it raised)
    assert group._slot_waiters == 0 and len(group) == 0
    assert group.stats().flights == 1  # the cancelled caller's loader never ran
    gc.collect()


@pytest.mark.timeout(SECONDS * 3 + 180)
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_soak() -> None:
    # A short warm-up first, so that caches the interpreter fills once (imports,
    # thread machinery, the event loop's) are in the baseline.
    check(*run_soak(min(0.5, SECONDS)), coverage=False)
    gc.collect()
    tracemalloc.start()
    try:
        gc.collect()
        baseline = tracemalloc.get_traced_memory()[0]
        soak = run_soak(SECONDS)
        check(*soak)
        del soak
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - baseline < SLACK, f"{after - baseline} bytes left after the soak"
