"""Core benchmarks: each figure is a ratio to a floor measured interleaved in the same run.

    python benchmarks/bench_core.py            # full run
    python benchmarks/bench_core.py --quick    # fewer repetitions
    python benchmarks/bench_core.py --json
    python benchmarks/bench_core.py --callgrind  # CPU instructions (valgrind)

Figures (targets from the project's core issue):
  sync-distinct     Group.do, one thread, a new key per call, trivial fn
                    / lock + dict insert/delete of a small record + call      <= 1.5x
  async-distinct    AsyncGroup.do, a new key per call, fn that never suspends
                    / dict insert of a loop Future + await fn + set_result + delete
                                                                              <= 3x (3.12+)
  async-100k-join   100,000 tasks join one key and are woken
                    / 100,000 tasks awaiting one bare Future                  <= 1.2x
  async-memory      bytes per in-flight key, 20,000 keys parked (tracemalloc)
                    minus the same callers awaiting the loader directly       <= +1,100 B
  threads-1000-wake 1,000 threads on one key: release-to-last-wake
                    / 1,000 threads on one threading.Event                    <= 1.05x
  --callgrind       the first three figures in CPU instructions, counted by
                    callgrind (stable where times are not on a loaded machine):
                    per call, and per waiter of rounds of 100 callers on one key
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))

from _common import Figure, instructions_per_call, interleaved, report

from singleflight import AsyncGroup, Group


class _Record:
    """The floor's small record: what a minimal call record holds."""

    __slots__ = ("dups", "value")

    def __init__(self) -> None:
        self.dups = 0
        self.value = None


def _trivial() -> None:
    return None


async def _atrivial() -> None:
    return None


def _sync_floor():  # type: ignore[no-untyped-def]
    """sync-distinct's floor: lock + dict insert/delete of a small record + the call."""
    lock = threading.Lock()
    table: dict[int, _Record] = {}

    def floor_do(key: int, fn):  # type: ignore[no-untyped-def]
        with lock:
            table[key] = _Record()
        value = fn()
        with lock:
            del table[key]
        return value

    return floor_do


def _async_floor(loop: asyncio.AbstractEventLoop):  # type: ignore[no-untyped-def]
    """async-distinct's floor: dict insert of a loop Future + await fn + set_result + delete."""
    table: dict[int, asyncio.Future[None]] = {}

    async def floor_do(key: int, fn):  # type: ignore[no-untyped-def]
        future = loop.create_future()
        table[key] = future
        value = await fn()
        future.set_result(value)
        del table[key]
        return value

    return floor_do


def _join_caller(release: asyncio.Future[object], group: AsyncGroup[str, object] | None):  # type: ignore[no-untyped-def]
    """A caller of join-and-wake: on ``group``'s key "hot", or (the floor, no group)
    awaiting ``release`` itself."""
    if group is None:

        async def bare() -> object:
            return await release

        return bare

    async def loader() -> object:
        return await release

    async def caller() -> object:
        return await group.do("hot", loader)

    return caller


def bench_sync_distinct(n: int, reps: int) -> Figure:
    floor_do = _sync_floor()
    group: Group[int, None] = Group()
    keys = range(n)

    def run(do) -> float:  # type: ignore[no-untyped-def]
        fn = _trivial
        t0 = time.perf_counter()
        for key in keys:
            do(key, fn)
        return (time.perf_counter() - t0) / n * 1e9

    floor, subject = interleaved(lambda: run(floor_do), lambda: run(group.do), reps)
    return Figure("sync-distinct (ns/call)", "ns", floor, subject, 1.5)


def bench_async_distinct(n: int, reps: int) -> Figure:
    group: AsyncGroup[int, None] = AsyncGroup()

    async def body(floor: bool) -> float:
        do = _async_floor(asyncio.get_running_loop()) if floor else group.do
        fn = _atrivial
        t0 = time.perf_counter()
        for key in range(n):
            await do(key, fn)
        return (time.perf_counter() - t0) / n * 1e9

    floor, subject = interleaved(
        lambda: asyncio.run(body(True)), lambda: asyncio.run(body(False)), reps
    )
    target = 3.0 if sys.version_info >= (3, 12) else None
    return Figure("async-distinct (ns/call)", "ns", floor, subject, target)


def bench_async_many_waiters(n: int, reps: int) -> Figure:
    async def body(floor: bool) -> float:
        loop = asyncio.get_running_loop()
        release = loop.create_future()
        caller = _join_caller(release, None if floor else AsyncGroup())
        gc.disable()
        try:
            t0 = time.perf_counter()
            tasks = [loop.create_task(caller()) for _ in range(n)]
            await asyncio.sleep(0)  # every caller runs to its wait
            await asyncio.sleep(0)
            release.set_result(1)
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - t0
        finally:
            gc.enable()
        return elapsed / n * 1e9

    floor, subject = interleaved(
        lambda: asyncio.run(body(True)), lambda: asyncio.run(body(False)), reps
    )
    return Figure(f"async-{n // 1000}k-join+wake (ns/waiter)", "ns", floor, subject, 1.2)


def _parked_bytes_per_key(grouped: bool, n: int) -> float:
    """Bytes traced per parked caller: n tasks, each on its own key, all waiting."""

    async def body() -> float:
        loop = asyncio.get_running_loop()
        release = loop.create_future()

        async def loader(i: int) -> int:
            await release
            return i

        group: AsyncGroup[int, int] = AsyncGroup()
        if grouped:

            async def caller(i: int) -> int:
                return await group.do(i, loader, i)

        else:

            async def caller(i: int) -> int:
                return await loader(i)

        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        tasks = [loop.create_task(caller(i)) for i in range(n)]
        for _ in range(3):
            await asyncio.sleep(0)
        parked = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert len(group) == (n if grouped else 0)
        release.set_result(None)
        await asyncio.gather(*tasks)
        return (parked - before) / n

    return asyncio.run(body())


def bench_async_memory(n: int, reps: int) -> Figure:
    """Each measurement in a fresh interpreter, so neither side inherits the other's
    free lists or grown containers; several sizes around n, so that one resize of
    asyncio's task set or the key table does not decide the figure."""

    def measure(grouped: bool) -> float:
        per_size = []
        for size in (n, n * 5 // 4, n * 3 // 2):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--parked-bytes",
                    "grouped" if grouped else "bare",
                    str(size),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            per_size.append(float(out))
        return statistics.median(per_size)

    floor, subject = interleaved(lambda: measure(False), lambda: measure(True), reps)
    # Reported as floor + extra: the target is on the difference, not the ratio.
    figure = Figure(f"async-memory (B/key, {n // 1000}k+ keys)", "B", floor, subject, None)
    figure.target = (floor + 1100) / floor
    return figure


def bench_thread_wake(n: int, reps: int) -> Figure:
    def run(grouped: bool) -> float:
        release = threading.Event()
        group: Group[str, int] = Group()
        woke: list[float] = []
        ready = threading.Barrier(n + 1)

        def loader() -> int:
            release.wait()
            return 1

        def caller() -> None:
            ready.wait()
            if grouped:
                group.do("hot", loader)
            else:
                release.wait()
            woke.append(time.perf_counter())

        threads = [threading.Thread(target=caller) for _ in range(n)]
        for t in threads:
            t.start()
        ready.wait()
        # Let every caller reach its wait.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if grouped:
                call = group._calls.get("hot")
                if call is not None and call.dups == n - 1:
                    break
            elif len(release._cond._waiters) == n:  # type: ignore[attr-defined]
                break
            time.sleep(0.001)
        time.sleep(0.01)
        t0 = time.perf_counter()
        release.set()
        for t in threads:
            t.join()
        return (max(woke) - t0) * 1e3

    floor, subject = interleaved(lambda: run(False), lambda: run(True), reps)
    return Figure(f"threads-{n}-wake tail (ms)", "ms", floor, subject, 1.05)


# -- the same figures in CPU instructions (callgrind) -------------------------------------------

# Waiters per round of the join cases: each round is 100 tasks on one key, woken together.
_ROUND = 100


def _sync_case(grouped: bool):  # type: ignore[no-untyped-def]
    """A callable making one call on a new key (the sync-distinct figure)."""
    do = Group().do if grouped else _sync_floor()
    keys = iter(range(1 << 62))

    def one() -> None:
        do(next(keys), _trivial)

    return one


async def _async_case(case: str, n: int) -> None:
    """``n`` units of ``case`` on a running loop, after 1,000 to warm up."""
    loop = asyncio.get_running_loop()
    group: AsyncGroup[Any, Any] = AsyncGroup()
    if case in ("async-floor", "async-do"):
        do = _async_floor(loop) if case == "async-floor" else group.do
        for key in range(-1000, n):
            await do(key, _atrivial)
        return
    grouped = case == "join-do"

    async def round_() -> None:
        release = loop.create_future()
        caller = _join_caller(release, group if grouped else None)
        tasks = [loop.create_task(caller()) for _ in range(_ROUND)]
        await asyncio.sleep(0)  # every caller runs to its wait
        await asyncio.sleep(0)
        release.set_result(1)
        await asyncio.gather(*tasks)

    for _ in range(10):
        await round_()
    for _ in range(n):
        await round_()


CALLGRIND_CASES = ["sync-floor", "sync-do", "async-floor", "async-do", "join-floor", "join-do"]


def run_callgrind_case(case: str, n: int) -> None:
    """Make ``n`` units of ``case`` (the child process of --callgrind)."""
    gc.disable()  # a collection's timing differs between the two counted runs
    if case.startswith("sync"):
        one = _sync_case(case == "sync-do")
        for _ in range(1000):
            one()
        for _ in range(n):
            one()
    else:
        asyncio.run(_async_case(case, n))
    os._exit(0)


def bench_callgrind() -> list[Figure]:
    count = {
        case: instructions_per_call(__file__, case, 40) / _ROUND
        if case.startswith("join")
        else instructions_per_call(__file__, case, 2000)
        for case in CALLGRIND_CASES
    }
    target = 3.0 if sys.version_info >= (3, 12) else None
    return [
        Figure("Group.do (instructions/call)", "i", count["sync-floor"], count["sync-do"], 1.5),
        Figure(
            "AsyncGroup.do (instructions/call)",
            "i",
            count["async-floor"],
            count["async-do"],
            target,
        ),
        Figure("join+wake (instructions/waiter)", "i", count["join-floor"], count["join-do"], 1.2),
    ]


def main(argv: list[str] | None = None) -> list[Figure]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run"]:  # one callgrind case, run in a child process
        run_callgrind_case(argv[1], int(argv[2]))
        return []
    if argv[:1] == ["--parked-bytes"]:  # one memory measurement, run in a child process
        print(_parked_bytes_per_key(argv[1] == "grouped", int(argv[2])))
        return []
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller sizes")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--only", help="comma-separated figure prefixes to run (sync,async,threads)"
    )
    parser.add_argument(
        "--callgrind", action="store_true", help="CPU instructions under valgrind instead of times"
    )
    args = parser.parse_args(argv)
    if args.callgrind:
        figures = bench_callgrind()
        print(f"Python {sys.version.split()[0]}; CPU instructions counted by callgrind")
        report(figures, args.json)
        return figures
    reps = 5 if args.quick else 11
    scale = 4 if args.quick else 1
    benches = [
        ("sync", lambda: bench_sync_distinct(200_000 // scale, reps)),
        ("async-distinct", lambda: bench_async_distinct(100_000 // scale, reps)),
        ("async-join", lambda: bench_async_many_waiters(100_000, max(3, reps // 2))),
        ("async-memory", lambda: bench_async_memory(20_000, 3 if args.quick else 5)),
        ("threads", lambda: bench_thread_wake(1000, max(3, reps // 2))),
    ]
    only = args.only.split(",") if args.only else None
    figures = [
        run() for name, run in benches if only is None or any(name.startswith(o) for o in only)
    ]
    print(
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; medians of interleaved repetitions"
    )
    report(figures, args.json)
    return figures


if __name__ == "__main__":
    main()
