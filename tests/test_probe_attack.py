"""Attacks on the groups: each test failed before the fix committed with it."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import warnings
from collections.abc import Callable
from types import FrameType

import pytest

from singleflight import AsyncGroup, Group
from singleflight.events import Event, FlightStarted

# -- a loader that ends while it is being started, with a joiner ------------------------


def test_asyncio_leader_and_joiner_never_share_an_exception_when_fn_raises() -> None:
    """fn raises at once; a hook told of the start joined: the joiner gets a copy."""
    joined: list[asyncio.Future[object]] = []

    def hook(event: Event) -> None:
        if isinstance(event, FlightStarted):
            joined.append(group.do_future("k", fails))

    group: AsyncGroup[str, object] = AsyncGroup(on_event=hook)

    def fails() -> asyncio.Future[object]:
        raise ValueError("x")

    async def main() -> None:
        with pytest.raises(ValueError) as mine:
            await group.do("k", fails)
        other = await asyncio.wait_for(asyncio.gather(*joined, return_exceptions=True), 5)
        assert type(other[0]) is ValueError
        assert other[0] is not mine.value

    asyncio.run(main())


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager start is 3.12+")
def test_asyncio_leader_and_joiner_never_share_an_exception_when_loader_ends_eagerly() -> None:
    """The loader raises without suspending; a hook joined: the joiner gets a copy."""
    joined: list[asyncio.Future[object]] = []

    def hook(event: Event) -> None:
        if isinstance(event, FlightStarted):
            joined.append(group.do_future("k", fails))

    group: AsyncGroup[str, object] = AsyncGroup(on_event=hook)

    async def fails() -> object:
        raise ValueError("x")

    async def main() -> None:
        with pytest.raises(ValueError) as mine:
            await group.do("k", fails)
        other = await asyncio.wait_for(asyncio.gather(*joined, return_exceptions=True), 5)
        assert type(other[0]) is ValueError
        assert other[0] is not mine.value

    asyncio.run(main())


def test_asyncio_usage_error_is_not_shared_with_a_joiner() -> None:
    """fn returns no awaitable (a TypeError naming it); the joiner gets its own copy."""
    joined: list[asyncio.Future[object]] = []

    def hook(event: Event) -> None:
        if isinstance(event, FlightStarted):
            joined.append(group.do_future("k", not_async))

    group: AsyncGroup[str, object] = AsyncGroup(on_event=hook)

    def not_async() -> object:
        return 42

    async def main() -> None:
        with pytest.raises(TypeError) as mine:
            await group.do("k", not_async)  # type: ignore[arg-type]
        other = await asyncio.wait_for(asyncio.gather(*joined, return_exceptions=True), 5)
        assert type(other[0]) is TypeError
        assert other[0] is not mine.value

    asyncio.run(main())


# -- wait_seconds never goes back -------------------------------------------------------


def test_asyncio_wait_seconds_never_goes_back_when_every_joiner_left() -> None:
    """Joiners cancelled before the loader ends: its end adds nothing negative
    (a sum of join times less the same times is not exactly 0.0 in floats)."""
    group: AsyncGroup[str, int] = AsyncGroup()

    async def main() -> None:
        for _ in range(200):
            release = asyncio.Event()

            async def load(release: asyncio.Event = release) -> int:
                await release.wait()
                return 1

            leader = group.do_future("k", load)
            joins = group.stats().joins + 3
            joiners = [asyncio.ensure_future(group.do("k", load)) for _ in range(3)]
            for _ in range(100):  # each joiner's first step: it joins
                if group.stats().joins == joins:
                    break
                await asyncio.sleep(0)
            assert group.stats().joins == joins
            for joiner in joiners:
                joiner.cancel()
            await asyncio.wait_for(asyncio.gather(*joiners, return_exceptions=True), 5)
            before = group.stats().wait_seconds
            release.set()
            assert await asyncio.wait_for(leader, 5) == 1
            assert group.stats().wait_seconds >= before

    asyncio.run(main())


def test_threads_wait_seconds_never_goes_back_when_every_joiner_left() -> None:
    group: Group[str, int] = Group()
    for _ in range(200):
        release = threading.Event()

        def load(release: threading.Event = release) -> int:
            assert release.wait(5)
            return 1

        leader = group.do_future("k", load)
        joiners = [group.do_future("k", load) for _ in range(3)]
        for joiner in joiners:
            assert joiner.cancel()
        before = group.stats().wait_seconds
        release.set()
        assert leader.result(5) == 1
        assert group.stats().in_flight == 0
        assert group.stats().wait_seconds >= before


# -- a loop collected while stats() sums ------------------------------------------------


def test_asyncio_stats_never_counts_a_collected_loop_twice() -> None:
    """A loop nobody closed is collected by the garbage collector, which may run at
    any allocation, stats() included: its counters are summed once, at every point
    where that can happen (swept over the calls stats() makes)."""
    group: AsyncGroup[str, int] = AsyncGroup()

    async def load() -> int:
        return 1

    def use_a_loop_and_drop_it() -> None:
        loop = asyncio.new_event_loop()  # never closed: only the cyclic gc frees it
        loop.run_until_complete(group.do("k", load))

    def collect_at(n: int) -> Callable[[FrameType, str, object], None]:
        calls = [0]

        def profile(frame: FrameType, event: str, arg: object) -> None:
            if event == "call":
                calls[0] += 1
                if calls[0] == n:
                    gc.collect()

        return profile

    enabled = gc.isenabled()
    gc.disable()
    # Collections then scan only what the test makes: a full one over a test
    # process's whole heap, twice a round, outlasted the test's timeout in CI.
    gc.collect()
    gc.freeze()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            for n in range(1, 60):
                use_a_loop_and_drop_it()
                sys.setprofile(collect_at(n))
                try:
                    during = group.stats()
                finally:
                    sys.setprofile(None)
                gc.collect()
                after = group.stats()
                assert (during.flights, after.flights) == (n, n)
                assert during.calls == during.flights + during.joins
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()
