"""The thread driver (`singleflight.Group`) against Go's singleflight contract.

Go test ports (T1..T11, E1..E7) refer to /work/shared/reference/go-singleflight-contract.md;
"point N" refers to the numbered contract points of the project's issue.

Every wait in this file is bounded: threads are joined with a timeout and asserted finished,
events are waited on with a timeout and the outcome asserted.  Overlap between callers is made
deterministic with events, plus one white-box helper (:func:`wait_joined`) that watches the
group's private waiter count, because the public API cannot say how many callers have joined.
"""

from __future__ import annotations

import collections
import gc
import itertools
import queue
import random
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import pytest

from singleflight import AbortedError, Group, Result

pytestmark = pytest.mark.timeout(10)

WAIT = 5.0  # upper bound for any single wait; a correct run never comes near it
MAX_FRAMES = 15  # a shared exception's traceback must stay this short whatever the waiter count


# -- helpers ---------------------------------------------------------------------------------


class CallThread(threading.Thread):
    """Runs one call on a daemon thread of its own and keeps its outcome."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self._call = (fn, args, kwargs)
        self.value: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        fn, args, kwargs = self._call
        del self._call
        try:
            self.value = fn(*args, **kwargs)
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout: float = WAIT) -> CallThread:
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} still blocked after {timeout}s"
        return self

    def result(self, timeout: float = WAIT) -> Any:
        """The call's return value; fails the test if it raised."""
        self.finish(timeout)
        assert self.error is None, f"call raised {self.error!r}"
        return self.value

    def exception(self, timeout: float = WAIT) -> BaseException:
        """What the call raised; fails the test if it returned."""
        self.finish(timeout)
        assert self.error is not None, f"call returned {self.value!r} instead of raising"
        return self.error


class Loader:
    """A loader that counts its calls, optionally waits on a gate, then returns or raises."""

    def __init__(
        self,
        value: Any = None,
        *,
        raises: BaseException | None = None,
        gate: threading.Event | None = None,
    ) -> None:
        self.value = value
        self.raises = raises
        self.gate = gate
        self.started = threading.Event()
        self.calls = 0
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.calls += 1
            self.threads.append(threading.current_thread())
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT), "the test never opened the loader's gate"
        if self.raises is not None:
            raise self.raises
        return self.value

    def wait_started(self) -> None:
        assert self.started.wait(WAIT), "loader never started"


def never_called() -> Any:
    """A joiner's loader: a joiner's own fn must never run."""
    raise AssertionError("a joiner's fn ran")


def wait_joined(g: Group[Any, Any], key: object, n: int, timeout: float = WAIT) -> None:
    """Wait until `n` callers have joined the flight of `key` (white-box: reads `Group._calls`).

    `do`/`do_result` joiners block inside the call, so only the group's own count can tell the
    test that they have joined.  A joiner counted here is committed to this flight.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        call = g._calls.get(key)
        if call is not None and call.dups >= n:
            return
        time.sleep(0.0005)
    call = g._calls.get(key)
    raise AssertionError(f"{n} joiners expected on {key!r}; have {call and call.dups}")


def tb_names(exc: BaseException) -> list[str]:
    return [frame.name for frame in traceback.extract_tb(exc.__traceback__)]


class CountDown:
    """Go's sync.WaitGroup, reduced to what T4 needs."""

    def __init__(self, n: int) -> None:
        self._n = n
        self._lock = threading.Lock()
        self.zero = threading.Event()

    def done(self) -> None:
        with self._lock:
            self._n -= 1
            if self._n == 0:
                self.zero.set()


class DaemonExecutor(Executor):
    """An executor running each task on a new daemon thread named "sfdaemon-N".

    Used where a regression would leave a loader blocked for ever: unlike
    ThreadPoolExecutor's workers, a stuck daemon thread cannot hang interpreter exit.
    """

    def __init__(self) -> None:
        self._count = itertools.count()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)

        name = f"sfdaemon-{next(self._count)}"
        threading.Thread(target=run, name=name, daemon=True).start()
        return future


@pytest.fixture
def thread_pool() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sfpool")
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


# -- Go's tests, ported (T1..T11) and the seed's two --------------------------------------------


class ErrValue(Exception):
    def __str__(self) -> str:
        return "error value"


@pytest.mark.parametrize("entry", ["do", "do_result", "do_future"])
def test_exception_reaches_caller_and_unwraps_to_original(entry: str) -> None:
    """T1 TestPanicErrorUnwrap: an exception raised in fn reaches the caller; __cause__ finds it."""
    g: Group[str, None] = Group()
    original = ErrValue()

    def fn() -> None:
        try:
            raise original
        except ErrValue as exc:
            raise RuntimeError("wrapped") from exc

    if entry == "do":
        with pytest.raises(RuntimeError) as info:
            g.do(entry, fn)
        error: BaseException = info.value
    elif entry == "do_result":
        res = g.do_result(entry, fn)
        assert res.value is None
        assert isinstance(res.error, RuntimeError)
        error = res.error
    else:
        exc = g.do_future(entry, fn).exception(WAIT)
        assert isinstance(exc, RuntimeError)
        error = exc
    assert error.__cause__ is original
    assert str(error.__cause__) == "error value"
    assert len(g) == 0


def test_do_returns_value_and_type() -> None:
    """T2 TestDo: do returns fn's value with its type; no error."""
    g: Group[str, str] = Group()
    v = g.do("key", lambda: "bar")
    assert (v, type(v)) == ("bar", str)


def test_do_err_is_same_object() -> None:
    """T3 TestDoErr: fn's exception reaches the caller as the same object; no value."""
    g: Group[str, None] = Group()
    some_err = ValueError("Some error")

    def fn() -> None:
        raise some_err

    with pytest.raises(ValueError) as info:
        g.do("key", fn)
    assert info.value is some_err
    res = g.do_result("key", fn)
    assert res.error is some_err
    assert res.value is None


@pytest.mark.timeout(10)
def test_do_dup_suppress() -> None:
    """T4 TestDoDupSuppress: 10 threads, loose bound 0 < calls < 10, everyone gets "bar"."""
    g: Group[str, str] = Group()
    n = 10
    wg1 = CountDown(n + 1)
    c: queue.Queue[str] = queue.Queue(maxsize=1)
    calls = 0
    calls_lock = threading.Lock()

    def fn() -> str:
        nonlocal calls
        with calls_lock:
            calls += 1
            first = calls == 1
        if first:
            wg1.done()
        v = c.get(timeout=WAIT)
        c.put(v)  # pump: make it available for any later call
        time.sleep(0.01)  # let more threads enter do
        return v

    def caller() -> str:
        wg1.done()
        return g.do("key", fn)

    threads = [CallThread(caller) for _ in range(n)]
    assert wg1.zero.wait(WAIT)
    c.put("bar")
    assert [t.result() for t in threads] == ["bar"] * n
    assert 0 < calls < n


def test_forget_go() -> None:
    """T5 TestForget: after forget a new flight starts; the old one's end keeps the new entry."""
    g: Group[str, int | None] = Group()
    first_started, unblock_first, first_finished = (threading.Event() for _ in range(3))

    def f1() -> None:
        first_started.set()
        assert unblock_first.wait(WAIT)
        first_finished.set()
        return None

    first = CallThread(g.do, "key", f1)
    assert first_started.wait(WAIT)
    g.forget("key")

    unblock_second = threading.Event()

    def f2() -> int:
        assert unblock_second.wait(WAIT)
        return 2

    second = g.do_future("key", f2)
    unblock_first.set()
    assert first_finished.wait(WAIT)

    third = g.do_future("key", lambda: 3)
    unblock_second.set()
    assert second.result(WAIT) == 2
    assert third.result(WAIT) == 2
    assert first.result() is None
    assert len(g) == 0


def test_do_future_go() -> None:
    """T6 TestDoChan: do_future's future carries fn's value with its type."""
    g: Group[str, str] = Group()
    future = g.do_future("key", lambda: "bar")
    assert isinstance(future, Future)
    v = future.result(WAIT)
    assert (v, type(v)) == ("bar", str)
    assert future.exception(0) is None


@pytest.mark.timeout(5)
def test_exception_in_every_caller_nobody_hangs() -> None:
    """T7 TestPanicDo: 5 concurrent do callers of a raising fn all raise within 1 s."""
    g: Group[str, None] = Group()
    n = 5
    barrier = threading.Barrier(n)

    def fn() -> None:
        raise ValueError("invalid memory address or nil pointer dereference")

    def caller() -> None:
        barrier.wait(WAIT)
        g.do("key", fn)

    threads = [CallThread(caller) for _ in range(n)]
    deadline = time.monotonic() + 1.0
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "do hangs"
    errors = [t.exception(0) for t in threads]
    assert all(isinstance(e, ValueError) for e in errors)
    assert len(errors) == n
    assert len(g) == 0


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
@pytest.mark.timeout(5)
def test_base_exception_every_thread_finishes(exc_type: type[BaseException]) -> None:
    """T8 TestGoexitDo: fn ends by BaseException; all 5 threads end within 1 s, none returns."""
    g: Group[str, None] = Group()
    n = 5
    barrier = threading.Barrier(n)

    def fn() -> None:
        time.sleep(0.01)
        raise exc_type()

    def caller() -> None:
        barrier.wait(WAIT)
        g.do("key", fn)

    threads = [CallThread(caller) for _ in range(n)]
    deadline = time.monotonic() + 1.0
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "do hangs"
    errors = [t.exception(0) for t in threads]
    leaders = [e for e in errors if isinstance(e, exc_type)]
    waiters = [e for e in errors if isinstance(e, AbortedError)]
    assert leaders, "no thread ran fn"
    assert len(leaders) + len(waiters) == n
    assert all(isinstance(w.__cause__, exc_type) for w in waiters)
    assert len(g) == 0


def test_exception_in_do_future_flight() -> None:
    """T9 TestPanicDoChan: a do_future flight's exception reaches every future and do waiter."""
    g: Group[str, None] = Group()
    gate = threading.Event()
    started = threading.Event()

    def fn() -> None:
        started.set()
        assert gate.wait(WAIT)
        raise ValueError("Panicking in DoChan")

    future = g.do_future("", fn)
    assert started.wait(WAIT)
    joiner = g.do_future("", never_called)
    waiter = CallThread(g.do, "", never_called)
    wait_joined(g, "", 2)
    gate.set()
    with pytest.raises(ValueError, match="Panicking in DoChan") as info:
        future.result(WAIT)
    assert joiner.exception(WAIT) is info.value
    assert waiter.exception() is info.value
    assert "" not in g


def test_do_leader_exception_shared_by_do_future() -> None:
    """T10 TestPanicDoSharedByDoChan: a do leader's exception reaches a do_future joiner."""
    g: Group[str, None] = Group()
    blocked, unblock = threading.Event(), threading.Event()

    def fn() -> None:
        blocked.set()
        assert unblock.wait(WAIT)
        raise ValueError("Panicking in Do")

    leader = CallThread(g.do, "", fn)
    assert blocked.wait(WAIT)
    fn2 = Loader(raises=AssertionError("DoChan unexpectedly executed callback"))
    future = g.do_future("", fn2)
    unblock.set()
    with pytest.raises(ValueError, match="Panicking in Do") as info:
        future.result(WAIT)
    assert leader.exception() is info.value
    assert fn2.calls == 0
    assert "" not in g


def test_example_group() -> None:
    """T11 ExampleGroup: two do_future callers get "func 1"; a joiner sees shared=True."""
    g: Group[str, str] = Group()
    block = threading.Event()

    def f1() -> str:
        assert block.wait(WAIT)
        return "func 1"

    def f2() -> str:
        assert block.wait(WAIT)
        return "func 2"

    res1c = g.do_future("key", f1)
    res2c = g.do_future("key", f2)
    res3 = CallThread(g.do_result, "key", f2)
    wait_joined(g, "key", 2)
    block.set()
    res1, res2 = res1c.result(WAIT), res2c.result(WAIT)
    r3: Result[str] = res3.result()
    assert r3.shared is True
    assert res1 == res2 == r3.value == "func 1"


@pytest.mark.timeout(10)
def test_coalesces() -> None:
    """Seed TestCoalesces: 100 threads, loader sleeps 50 ms: exactly 1 call, all get "ok"."""
    g: Group[str, str] = Group()
    n = 100
    barrier = threading.Barrier(n)
    calls = 0
    lock = threading.Lock()

    def load() -> str:
        nonlocal calls
        with lock:
            calls += 1
        time.sleep(0.05)
        return "ok"

    def caller() -> str:
        barrier.wait(WAIT)
        return g.do("key", load)

    threads = [CallThread(caller) for _ in range(n)]
    assert [t.result() for t in threads] == ["ok"] * n
    assert calls == 1
    assert len(g) == 0


def test_not_a_cache() -> None:
    """Seed TestNotACache / E2: two sequential do calls run fn twice."""
    g: Group[str, int] = Group()
    loader = Loader(7)
    assert g.do("key", loader) == 7
    assert g.do("key", loader) == 7
    assert loader.calls == 2


# -- extra acceptance tests E1..E7 ------------------------------------------------------------


def test_shared_false_alone_true_for_leader_and_joiner() -> None:
    """E1 / point 3: a lone caller gets shared=False; leader and joiner of a pair both True."""
    g: Group[str, str] = Group()
    assert g.do_result("key", lambda: "v") == Result("v", None, False)

    gate = threading.Event()
    leader_fn = Loader("v", gate=gate)
    leader = CallThread(g.do_result, "key", leader_fn)
    leader_fn.wait_started()
    joiner = CallThread(g.do_result, "key", never_called)
    wait_joined(g, "key", 1)
    gate.set()
    assert leader.result() == Result("v", None, True)
    assert joiner.result() == Result("v", None, True)


def test_sequential_calls_run_fn_every_time_unshared() -> None:
    """E2 / point 2: sequential calls (every entry point) each run fn; shared is always False."""
    g: Group[str, object] = Group()
    loader = Loader()
    for _ in range(3):
        assert g.do_result("key", loader).shared is False
        g.do("key", loader)
        g.do_future("key", loader).result(WAIT)
    assert loader.calls == 9
    assert len(g) == 0


def test_abandoned_future_flight_finishes() -> None:
    """E3: callers that stop listening (drop, cancel) leave the flight running; later calls fine."""
    g: Group[str, str] = Group()
    gate = threading.Event()
    loader = Loader("first", gate=gate)
    g.do_future("key", loader)  # dropped at once
    loader.wait_started()
    abandoned = g.do_future("key", never_called)
    assert abandoned.cancel()
    del abandoned
    listener = g.do_future("key", never_called)
    gate.set()
    assert listener.result(WAIT) == "first"
    assert loader.calls == 1
    assert g.do("key", lambda: "later") == "later"
    assert len(g) == 0


def test_forget_unknown_key_and_twice_is_noop() -> None:
    """E4 / S24: forget on a fresh group, an unknown key, or twice does nothing."""
    g: Group[str, str] = Group()
    g.forget("nope")
    gate = threading.Event()
    loader = Loader("v", gate=gate)
    future = g.do_future("key", loader)
    loader.wait_started()
    g.forget("other")
    assert "key" in g
    g.forget("key")
    g.forget("key")
    assert len(g) == 0
    gate.set()
    assert future.result(WAIT) == "v"
    assert len(g) == 0


def test_forget_inside_fn_allows_concurrent_flight() -> None:
    """E4 / S22: fn forgets its own key; the next caller starts a concurrent flight."""
    g: Group[str, str] = Group()
    started, release = threading.Event(), threading.Event()

    def f1() -> str:
        g.forget("key")
        started.set()
        assert release.wait(WAIT)
        return "one"

    first = CallThread(g.do, "key", f1)
    assert started.wait(WAIT)
    second = g.do_future("key", lambda: "two")
    assert second.result(WAIT) == "two"  # completed while the first is still blocked
    assert first.is_alive()
    release.set()
    assert first.result() == "one"
    assert len(g) == 0


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt(), SystemExit(3)])
def test_key_usable_after_failed_flight(exc: BaseException) -> None:
    """E5: after a flight that raised (Exception or BaseException), the next call runs fn."""
    g: Group[str, str] = Group()

    def fn() -> str:
        raise exc

    def lead() -> None:
        with pytest.raises(type(exc)):
            g.do("key", fn)

    CallThread(lead).result()
    assert "key" not in g
    loader = Loader("again")
    assert g.do("key", loader) == "again"
    assert loader.calls == 1


def test_different_keys_never_wait_for_each_other() -> None:
    """E6 / point 10: key A blocked; key B completes (do, do_result, do_future) meanwhile."""
    g: Group[str, str] = Group()
    gate = threading.Event()
    a_loader = Loader("a", gate=gate)
    a = CallThread(g.do, "A", a_loader)
    a_loader.wait_started()
    assert g.do("B", lambda: "b") == "b"
    assert g.do_result("B", lambda: "b").value == "b"
    assert g.do_future("B", lambda: "b").result(WAIT) == "b"
    assert a.is_alive()
    assert "A" in g
    assert "B" not in g
    gate.set()
    assert a.result() == "a"


def test_forget_unshared_go() -> None:
    """E7 TestForgetUnshared (stdlib): false while shared, before and after the first finishes."""
    g: Group[str, int | None] = Group()
    key = "key"
    first_started, first_ch = threading.Event(), threading.Event()

    def f1() -> None:
        first_started.set()
        assert first_ch.wait(WAIT)
        return None

    first = CallThread(g.do, key, f1)
    assert first_started.wait(WAIT)
    assert g.forget_unshared(key) is True  # nobody joined: forgotten

    second_started, second_release = threading.Event(), threading.Event()

    def f2() -> int:
        second_started.set()
        assert second_release.wait(WAIT)
        return 2

    second = CallThread(g.do, key, f2)
    assert second_started.wait(WAIT)

    third_fn = Loader(raises=AssertionError("third must not be started"))
    result = g.do_future(key, third_fn)

    assert g.forget_unshared(key) is False, "before first finished, key is shared"
    first_ch.set()
    first.finish()
    assert g.forget_unshared(key) is False, "after first finished, key is still shared"

    second_release.set()
    assert result.result(WAIT) == 2
    assert second.result() == 2
    assert third_fn.calls == 0


def race_round(g: Group[str, int], key: str, n: int, delay: float) -> tuple[int, int]:
    """One round of TestDoAndForgetUnsharedRace: (loader runs, forget_unshared False count)."""
    lock = threading.Lock()
    calls = 0
    shared = 0
    barrier = threading.Barrier(n)

    def fn() -> int:
        nonlocal calls
        time.sleep(delay)
        with lock:
            calls += 1
            return calls

    def caller() -> None:
        nonlocal shared
        barrier.wait(WAIT)
        g.do(key, fn)
        if not g.forget_unshared(key):
            with lock:
                shared += 1

    threads = [CallThread(caller) for _ in range(n)]
    for t in threads:
        t.result()
    return calls, shared


@pytest.mark.timeout(30)
def test_do_and_forget_unshared_race() -> None:
    """E7 TestDoAndForgetUnsharedRace (n=200): once all do calls shared one flight, never False."""
    g: Group[str, int] = Group()
    d = 0.001
    for _attempt in range(10):
        calls, shared = race_round(g, "key", 200, d)
        if calls != 1:
            d *= 2  # the threads didn't park in do in time; give them longer
            continue
        assert shared == 0, f"after a single shared do, forget_unshared returned False {shared}x"
        break
    else:
        pytest.fail("never got all calls into a single flight")
    assert len(g) == 0


# -- point 1: one execution per key, joiners' fn never runs, same object ----------------------


def test_one_execution_all_callers_get_same_object() -> None:
    """Point 1: one loader run for do/do_result/do_future callers; joiners get the same object."""
    g: Group[str, object] = Group()
    payload = object()
    gate = threading.Event()
    leader_fn = Loader(payload, gate=gate)
    leader = CallThread(g.do, "key", leader_fn)
    leader_fn.wait_started()
    joiner_fn = Loader("joiner's own value")
    do_joiners = [CallThread(g.do, "key", joiner_fn) for _ in range(5)]
    result_joiners = [CallThread(g.do_result, "key", joiner_fn) for _ in range(5)]
    futures = [g.do_future("key", joiner_fn) for _ in range(5)]
    wait_joined(g, "key", 15)
    gate.set()
    assert leader.result() is payload
    assert all(t.result() is payload for t in do_joiners)
    for t in result_joiners:
        res = t.result()
        assert res.value is payload
        assert res.error is None
    assert all(f.result(WAIT) is payload for f in futures)
    assert leader_fn.calls == 1
    assert joiner_fn.calls == 0
    assert len(g) == 0


def test_in_flight_visible_through_len_and_contains() -> None:
    """Point 1: a flight is visible as `key in g` / len(g) exactly while it runs."""
    g: Group[str, str] = Group()
    assert len(g) == 0
    assert "key" not in g
    gate = threading.Event()
    loader = Loader("v", gate=gate)
    future = g.do_future("key", loader)
    loader.wait_started()
    assert "key" in g
    assert len(g) == 1
    assert "in_flight=1" in repr(g)
    gate.set()
    assert future.result(WAIT) == "v"
    assert "key" not in g
    assert len(g) == 0


# -- point 2: not a cache ---------------------------------------------------------------------


def test_entry_removed_before_any_caller_sees_result() -> None:
    """Point 2 / S19: when a future's callback or a caller sees the result, the entry is gone."""
    g: Group[str, object] = Group()
    gate = threading.Event()
    leader_fn = Loader("v", gate=gate)
    seen: list[tuple[bool, int]] = []

    def lead() -> tuple[object, bool]:
        value = g.do("key", leader_fn)
        return value, "key" in g

    leader = CallThread(lead)
    leader_fn.wait_started()
    future = g.do_future("key", never_called)
    future.add_done_callback(lambda f: seen.append(("key" in g, len(g))))
    gate.set()
    assert future.result(WAIT) == "v"
    assert leader.result() == ("v", False)
    assert seen == [(False, 0)]


def test_call_after_result_starts_new_flight() -> None:
    """Point 2 / S19: waiters that call again right after their result never get the old value."""
    g: Group[str, object] = Group()
    old = object()
    gate = threading.Event()
    leader_fn = Loader(old, gate=gate)
    new_values: list[object] = []
    new_lock = threading.Lock()

    def fresh() -> object:
        value = object()
        with new_lock:
            new_values.append(value)
        return value

    def twice() -> tuple[object, object]:
        return g.do("key", never_called), g.do("key", fresh)

    leader = CallThread(g.do, "key", leader_fn)
    leader_fn.wait_started()
    waiters = [CallThread(twice) for _ in range(10)]
    wait_joined(g, "key", 10)
    gate.set()
    assert leader.result() is old
    for t in waiters:
        first, second = t.result()
        assert first is old
        assert second is not old
        assert any(second is v for v in new_values)
    assert leader_fn.calls == 1
    assert len(new_values) >= 1
    assert len(g) == 0


# -- point 3: the shared flag -----------------------------------------------------------------


def test_shared_true_for_every_caller_of_a_multi_caller_flight() -> None:
    """Point 3 / S12-S13: with >=2 callers every Result is shared, the leader's included."""
    g: Group[str, str] = Group()
    gate = threading.Event()
    leader_fn = Loader("v", gate=gate)
    leader = CallThread(g.do_result, "key", leader_fn)
    leader_fn.wait_started()
    joiners = [CallThread(g.do_result, "key", never_called) for _ in range(3)]
    wait_joined(g, "key", 3)
    gate.set()
    results = [leader.result()] + [t.result() for t in joiners]
    assert all(r == Result("v", None, True) for r in results)


def test_shared_counts_do_future_joiners_and_errors() -> None:
    """Point 3 / S12: a do_future joiner makes the do_result leader's failed Result shared."""
    g: Group[str, str] = Group()
    gate = threading.Event()
    err = ValueError("x")
    leader_fn = Loader(raises=err, gate=gate)
    leader = CallThread(g.do_result, "key", leader_fn)
    leader_fn.wait_started()
    future = g.do_future("key", never_called)
    gate.set()
    assert leader.result() == Result(None, err, True)
    assert future.exception(WAIT) is err
    assert g.do_result("key", lambda: "alone") == Result("alone", None, False)


def test_shared_for_do_result_joiner_of_do_future_flight() -> None:
    """Point 3 / S13: a do_result joiner of a do_future-led flight sees shared=True."""
    g: Group[str, str] = Group()
    gate = threading.Event()
    loader = Loader("v", gate=gate)
    future = g.do_future("key", loader)
    joiner = CallThread(g.do_result, "key", never_called)
    wait_joined(g, "key", 1)
    gate.set()
    assert joiner.result() == Result("v", None, True)
    assert future.result(WAIT) == "v"


# -- point 4: forget and forget_unshared ------------------------------------------------------


def test_forgotten_flight_still_delivers_to_its_callers() -> None:
    """Point 4 / S21: callers of a forgotten flight get its value (shared); newcomers a new one."""
    g: Group[str, str] = Group()
    gate_old, gate_new = threading.Event(), threading.Event()
    old_fn = Loader("old", gate=gate_old)
    old_leader = CallThread(g.do_result, "key", old_fn)
    old_fn.wait_started()
    old_joiner = CallThread(g.do_result, "key", never_called)
    old_future = g.do_future("key", never_called)
    wait_joined(g, "key", 2)
    g.forget("key")
    assert "key" not in g
    new_fn = Loader("new", gate=gate_new)
    new_future = g.do_future("key", new_fn)
    new_fn.wait_started()
    gate_old.set()
    assert old_leader.result() == Result("old", None, True)
    assert old_joiner.result() == Result("old", None, True)
    assert old_future.result(WAIT) == "old"
    gate_new.set()
    assert new_future.result(WAIT) == "new"
    assert old_fn.calls == new_fn.calls == 1


def test_forgotten_flight_completion_keeps_newer_flight() -> None:
    """Point 4 / S23: a forgotten flight that has fully ended leaves the newer flight registered."""
    g: Group[str, str] = Group()
    gate_new = threading.Event()
    old_fn = Loader("old", gate=threading.Event())
    old = CallThread(g.do, "key", old_fn)
    old_fn.wait_started()
    g.forget("key")
    new_fn = Loader("new", gate=gate_new)
    new = g.do_future("key", new_fn)
    new_fn.wait_started()
    assert old_fn.gate is not None
    old_fn.gate.set()
    assert old.result() == "old"  # the old flight has ended, cleanup included
    assert "key" in g, "the old flight's cleanup removed the newer flight"
    third_fn = Loader("third")
    third = g.do_future("key", third_fn)
    gate_new.set()
    assert new.result(WAIT) == "new"
    assert third.result(WAIT) == "new"
    assert third_fn.calls == 0
    assert len(g) == 0


def test_forgotten_failed_flight_keeps_newer_flight() -> None:
    """Point 4 / S23: the identity check holds when the forgotten flight ends by an exception."""
    g: Group[str, str] = Group()
    old_gate, new_gate = threading.Event(), threading.Event()
    old_fn = Loader(raises=ValueError("old"), gate=old_gate)
    old_future = g.do_future("key", old_fn)
    old_fn.wait_started()
    g.forget("key")
    new_fn = Loader("new", gate=new_gate)
    new = CallThread(g.do, "key", new_fn)
    new_fn.wait_started()
    old_gate.set()
    with pytest.raises(ValueError, match="old"):
        old_future.result(WAIT)
    assert "key" in g
    joiner = g.do_future("key", never_called)
    new_gate.set()
    assert new.result() == "new"
    assert joiner.result(WAIT) == "new"


def test_forget_unshared_results() -> None:
    """Point 4 / S25: True when absent or unshared (and forgets), False when shared (and keeps)."""
    g: Group[str, str] = Group()
    assert g.forget_unshared("absent") is True

    gate = threading.Event()
    lone_fn = Loader("lone", gate=gate)
    lone = g.do_future("lone", lone_fn)
    lone_fn.wait_started()
    assert g.forget_unshared("lone") is True
    assert "lone" not in g

    shared_fn = Loader("shared", gate=gate)
    leader = g.do_future("shared", shared_fn)
    shared_fn.wait_started()
    joiner = g.do_future("shared", never_called)
    assert g.forget_unshared("shared") is False
    assert "shared" in g
    gate.set()
    assert lone.result(WAIT) == "lone"
    assert leader.result(WAIT) == joiner.result(WAIT) == "shared"
    assert len(g) == 0


# -- point 5: exceptions reach every caller, same object, short traceback -----------------------


@pytest.mark.timeout(15)
def test_exception_same_object_all_waiters_short_traceback() -> None:
    """Point 5: 100 do waiters get the same exception; traceback has the loader, stays short."""
    g: Group[str, None] = Group()
    gate = threading.Event()
    started = threading.Event()
    original = ValueError("boom")

    def failing_loader() -> None:
        started.set()
        assert gate.wait(WAIT)
        raise original

    outcomes: list[tuple[BaseException, list[str]]] = []
    lock = threading.Lock()

    def wait_for_it() -> None:
        try:
            g.do("key", never_called)
        except ValueError as exc:
            names = tb_names(exc)
            with lock:
                outcomes.append((exc, names))

    leader = CallThread(g.do, "key", failing_loader)
    assert started.wait(WAIT)
    waiters = [CallThread(wait_for_it) for _ in range(100)]
    wait_joined(g, "key", 100)
    gate.set()
    for t in waiters:
        t.finish()
    assert leader.exception() is original
    assert len(outcomes) == 100
    assert all(exc is original for exc, _ in outcomes)
    assert all("failing_loader" in names for _, names in outcomes)
    longest = max(len(names) for _, names in outcomes)
    assert longest <= MAX_FRAMES, f"traceback grew to {longest} frames"
    assert len(g) == 0


def test_exception_via_futures_short_traceback() -> None:
    """Point 5 / 8: 100 futures of a failed flight re-raise one exception with a short traceback."""
    g: Group[str, None] = Group()
    gate = threading.Event()
    started = threading.Event()

    def failing_loader() -> None:
        started.set()
        assert gate.wait(WAIT)
        raise ValueError("boom")

    futures = [g.do_future("key", failing_loader)]
    assert started.wait(WAIT)
    futures += [g.do_future("key", never_called) for _ in range(99)]
    gate.set()
    errors = []
    lengths = []
    for future in futures:
        for _ in range(2):  # asking the same future twice must not grow it either
            with pytest.raises(ValueError) as info:
                future.result(WAIT)
            errors.append(info.value)
            lengths.append(len(tb_names(info.value)))
            assert "failing_loader" in tb_names(info.value)
    assert all(e is errors[0] for e in errors)
    assert max(lengths) <= MAX_FRAMES, f"traceback grew to {max(lengths)} frames"


def test_result_unwrap_traceback_does_not_grow() -> None:
    """Point 5: Result.unwrap() of 100 do_result waiters re-raises without growing the traceback."""
    g: Group[str, None] = Group()
    gate = threading.Event()
    started = threading.Event()

    def failing_loader() -> None:
        started.set()
        assert gate.wait(WAIT)
        raise ValueError("boom")

    leader = CallThread(g.do_result, "key", failing_loader)
    assert started.wait(WAIT)
    waiters = [CallThread(g.do_result, "key", never_called) for _ in range(100)]
    wait_joined(g, "key", 100)
    gate.set()
    results = [leader.result()] + [t.result() for t in waiters]
    assert all(r.error is results[0].error for r in results)
    lengths = []
    for res in results:
        with pytest.raises(ValueError) as info:
            res.unwrap()
        lengths.append(len(tb_names(info.value)))
    assert max(lengths) <= MAX_FRAMES, f"traceback grew from {lengths[0]} to {max(lengths)} frames"


def test_exception_not_cached_key_works_at_once() -> None:
    """Point 5 / S26: a failed flight leaves nothing behind; the very next call runs fn."""
    g: Group[str, str] = Group()
    failing = Loader(raises=ValueError("boom"))
    with pytest.raises(ValueError):
        g.do("key", failing)
    assert len(g) == 0
    res = g.do_result("key", failing)
    assert isinstance(res.error, ValueError)
    assert g.do("key", lambda: "fine") == "fine"
    assert failing.calls == 2


# -- point 6: a leader ended by a BaseException that is not an Exception ------------------------


@pytest.mark.parametrize("leader_entry", ["do", "do_result"])
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_leader_base_exception_waiters_get_aborted(
    exc_type: type[BaseException], leader_entry: str
) -> None:
    """Point 6 / T8: leader re-raises; every waiter gets AbortedError caused by it; key free."""
    g: Group[str, str] = Group()
    gate = threading.Event()
    original = exc_type("stop")
    leader_fn = Loader(raises=original, gate=gate)
    leader = CallThread(getattr(g, leader_entry), "key", leader_fn)
    leader_fn.wait_started()
    do_waiters = [CallThread(g.do, "key", never_called) for _ in range(3)]
    result_waiters = [CallThread(g.do_result, "key", never_called) for _ in range(3)]
    futures = [g.do_future("key", never_called) for _ in range(3)]
    wait_joined(g, "key", 9)
    gate.set()

    assert leader.exception() is original
    for t in do_waiters:
        err = t.exception()
        assert isinstance(err, AbortedError)
        assert err.__cause__ is original
        assert err.key == "key"
    for t in result_waiters:
        res = t.result()
        assert isinstance(res.error, AbortedError)
        assert res.error.__cause__ is original
        assert res.value is None
        assert res.shared is True
    for f in futures:
        err = f.exception(WAIT)
        assert isinstance(err, AbortedError)
        assert err.__cause__ is original
    assert len(g) == 0
    assert g.do("key", lambda: "again") == "again"


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_do_future_leader_base_exception(
    exc_type: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Point 6: do_future loader ended by BaseException: all callers get AbortedError, no crash."""
    crashed: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args.exc_value))
    g: Group[str, str] = Group()
    gate = threading.Event()
    original = exc_type()
    loader = Loader(raises=original, gate=gate)
    own = g.do_future("key", loader)
    loader.wait_started()
    joiner = g.do_future("key", never_called)
    waiter = CallThread(g.do, "key", never_called)
    wait_joined(g, "key", 2)
    gate.set()
    for err in (own.exception(WAIT), joiner.exception(WAIT), waiter.exception()):
        assert isinstance(err, AbortedError)
        assert err.__cause__ is original
    assert loader.threads[0] is not threading.current_thread()
    loader.threads[0].join(WAIT)
    assert crashed == []
    assert len(g) == 0
    assert g.do_future("key", lambda: "again").result(WAIT) == "again"


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread()
    or signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
    reason="needs Python's own SIGINT handler in the main thread",
)
def test_interrupted_waiter_leaves_flight_alone() -> None:
    """Point 6: a do waiter hit by Ctrl-C stops waiting; the flight and other callers go on."""
    g: Group[str, str] = Group()
    gate = threading.Event()
    loader = Loader("v", gate=gate)
    leader = CallThread(g.do, "key", loader)
    loader.wait_started()
    other = g.do_future("key", never_called)
    main = threading.main_thread().ident
    assert main is not None

    def interrupt_main_once_it_waits() -> None:
        wait_joined(g, "key", 2)  # the main thread's do has joined and blocks until gate opens
        signal.pthread_kill(main, signal.SIGINT)

    interrupter = CallThread(interrupt_main_once_it_waits)
    with pytest.raises(KeyboardInterrupt):
        g.do("key", never_called)
    interrupter.result()
    assert "key" in g, "an interrupted waiter must not end the flight"
    gate.set()
    assert leader.result() == "v"
    assert other.result(WAIT) == "v"
    assert loader.calls == 1
    assert len(g) == 0


# -- point 8: do_future ----------------------------------------------------------------------


def test_do_future_returns_while_loader_blocked() -> None:
    """Point 8 / S17: do_future returns at once, leader and joiner alike, future not yet done."""
    g: Group[str, str] = Group()
    gate = threading.Event()
    loader = Loader("v", gate=gate)
    t0 = time.monotonic()
    leader = g.do_future("key", loader)
    joiner = g.do_future("key", never_called)
    assert time.monotonic() - t0 < 1.0
    loader.wait_started()
    assert not leader.done()
    assert not joiner.done()
    assert leader is not joiner
    gate.set()
    assert leader.result(WAIT) == joiner.result(WAIT) == "v"


def test_do_future_default_runs_each_flight_on_own_daemon_thread() -> None:
    """Point 8: by default each flight's loader runs on a daemon thread of its own, concurrently."""
    g: Group[str, threading.Thread] = Group()
    both = threading.Barrier(2)

    def loader() -> threading.Thread:
        both.wait(WAIT)  # only passes if the two flights run at the same time
        return threading.current_thread()

    a = g.do_future("A", loader)
    b = g.do_future("B", loader)
    ta, tb = a.result(WAIT), b.result(WAIT)
    assert ta is not tb
    assert threading.current_thread() not in (ta, tb)
    assert ta.daemon
    assert tb.daemon


def test_do_future_uses_given_executor(thread_pool: ThreadPoolExecutor) -> None:
    """Point 8: with executor=..., do_future loaders run on that executor's threads."""
    g: Group[str, str] = Group(executor=thread_pool)
    names = [g.do_future(f"k{i}", lambda: threading.current_thread().name) for i in range(4)]
    assert all(f.result(WAIT).startswith("sfpool") for f in names)


def test_do_future_busy_executor_still_returns_at_once() -> None:
    """Point 8: do_future never blocks, even when the executor has no free worker."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        g: Group[str, str] = Group(executor=pool)
        gate = threading.Event()
        loader = Loader("a", gate=gate)
        a = g.do_future("A", loader)
        loader.wait_started()
        t0 = time.monotonic()
        b = g.do_future("B", lambda: "b")
        assert time.monotonic() - t0 < 1.0
        assert not b.done()
        gate.set()
        assert a.result(WAIT) == "a"
        assert b.result(WAIT) == "b"
    finally:
        pool.shutdown(wait=False)


def test_future_timeout_and_cancel_affect_nobody_else() -> None:
    """Point 8 / S16: per-caller futures: one times out, the leader's is cancelled; others fine."""
    g: Group[str, str] = Group()
    gate = threading.Event()
    loader = Loader("v", gate=gate)
    leader = g.do_future("key", loader)
    loader.wait_started()
    impatient = g.do_future("key", never_called)
    patient = g.do_future("key", never_called)
    waiter = CallThread(g.do, "key", never_called)
    wait_joined(g, "key", 3)

    with pytest.raises(TimeoutError):
        impatient.result(timeout=0.05)
    assert leader.cancel()
    assert leader.cancelled()
    assert "key" in g, "cancelling a future must not end the flight"
    assert not patient.done()

    gate.set()
    assert patient.result(WAIT) == "v"
    assert impatient.result(WAIT) == "v"
    assert waiter.result() == "v"
    with pytest.raises(CancelledError):
        leader.result(0)
    assert loader.calls == 1
    assert len(g) == 0


def test_do_future_on_shut_down_executor_raises_and_leaves_no_entry() -> None:
    """Point 8: an executor that refuses work: do_future raises RuntimeError, no entry left."""
    pool = ThreadPoolExecutor(max_workers=1)
    pool.shutdown()
    g: Group[str, str] = Group(executor=pool)
    loader = Loader("v")
    with pytest.raises(RuntimeError):
        g.do_future("key", loader)
    assert len(g) == 0
    assert loader.calls == 0
    assert g.do("key", loader) == "v"


@pytest.mark.timeout(10)
def test_do_future_work_cancelled_by_executor_does_not_poison_key() -> None:
    """Point 8: work the executor drops (cancel_futures) must not hang callers or poison the key."""
    pool = ThreadPoolExecutor(max_workers=1)
    g: Group[str, str] = Group(executor=pool)
    gate = threading.Event()
    a_fn = Loader("a", gate=gate)
    a = g.do_future("A", a_fn)
    a_fn.wait_started()
    b_fn = Loader("b")
    b = g.do_future("B", b_fn)  # queued behind A; the executor will drop it
    b_joiner = g.do_future("B", never_called)
    pool.shutdown(wait=False, cancel_futures=True)
    gate.set()
    assert a.result(WAIT) == "a"
    assert b_fn.calls == 0
    done, _ = wait_futures([b], timeout=2.0)
    assert b in done, "the caller's future never settles after the executor dropped the work"
    assert "B" not in g, "key 'B' stays in flight forever; every later call of it would hang"
    assert isinstance(b.exception(0), AbortedError)
    assert b_joiner.exception(WAIT) is b.exception(0)
    assert g.do("B", lambda: "again") == "again"


# -- point 9: re-entry on the loader's own key -------------------------------------------------


@pytest.mark.parametrize("inner", ["do", "do_result"])
@pytest.mark.parametrize("outer", ["do", "do_result", "do_future", "do_future_executor"])
def test_reentrant_call_on_own_key_raises(outer: str, inner: str) -> None:
    """Point 9 / S4: fn calling do/do_result on its own key from its own thread: RuntimeError."""
    executor = DaemonExecutor() if outer == "do_future_executor" else None
    g: Group[object, object] = Group(executor=executor)
    key = ("self", 1)
    inner_fn = Loader("inner")

    def loader() -> object:
        try:
            getattr(g, inner)(key, inner_fn)
        except RuntimeError as exc:
            return exc
        return "no error"

    if outer.startswith("do_future"):
        outcome = g.do_future(key, loader).result(WAIT)
    else:
        outcome = CallThread(getattr(g, outer), key, loader).result()  # finishing == no deadlock
        if outer == "do_result":
            outcome = outcome.value
    assert isinstance(outcome, RuntimeError)
    assert repr(key) in str(outcome)
    assert inner_fn.calls == 0
    assert len(g) == 0


def test_loader_may_use_other_keys_and_forget_own() -> None:
    """Point 9 / S3: the lock is not held while fn runs: fn may call other keys and forget."""
    g: Group[str, str] = Group()

    def outer() -> str:
        g.forget("outer")
        inner = g.do("inner", lambda: "i")
        nested = g.do_future("nested", lambda: "n").result(WAIT)
        return inner + nested

    assert CallThread(g.do, "outer", outer).result() == "in"
    assert len(g) == 0


# -- point 10: keys and references -------------------------------------------------------------


@pytest.mark.parametrize("key", [0, 42, -1.5, ("t", 1), None, "", b"", frozenset({1, 2})], ids=repr)
def test_any_hashable_key(key: object) -> None:
    """Point 10 / S2: any hashable key (incl. None and "") coalesces and is removed afterwards."""
    g: Group[object, object] = Group()
    payload = object()
    gate = threading.Event()
    loader = Loader(payload, gate=gate)
    leader = CallThread(g.do, key, loader)
    loader.wait_started()
    assert key in g
    joiner = g.do_future(key, never_called)
    gate.set()
    assert leader.result() is payload
    assert joiner.result(WAIT) is payload
    assert key not in g
    assert g.do_result(key, lambda: 1) == Result(1, None, False)


@pytest.mark.parametrize("entry", ["do", "do_result", "do_future"])
@pytest.mark.parametrize("key", [[], {}, {1}, ("t", [1])], ids=repr)
def test_unhashable_key_raises_type_error_before_running(entry: str, key: object) -> None:
    """Point 10: an unhashable key raises TypeError before fn runs; nothing is left in flight."""
    g: Group[Any, str] = Group()
    loader = Loader("v")
    with pytest.raises(TypeError, match="hashable"):
        getattr(g, entry)(key, loader)
    time.sleep(0.01)  # a wrongly started do_future worker would have run by now
    assert loader.calls == 0
    assert len(g) == 0


@pytest.mark.parametrize("outcome", ["value", "error", "abort"])
def test_finished_group_holds_no_reference(outcome: str) -> None:
    """Point 10 / S20: after a flight, nothing keeps its value or exception alive."""
    g: Group[str, object] = Group()
    refs: list[weakref.ref[Any]] = []

    class Payload:
        pass

    class Boom(ValueError):  # built-in exceptions take no weak references; subclasses do
        pass

    class Interrupt(KeyboardInterrupt):
        pass

    def run_flight() -> None:
        gate = threading.Event()
        started = threading.Event()

        def loader() -> object:
            started.set()
            assert gate.wait(WAIT)
            if outcome == "value":
                obj = Payload()
                refs.append(weakref.ref(obj))
                return obj
            exc: BaseException = Boom("x") if outcome == "error" else Interrupt()
            refs.append(weakref.ref(exc))
            raise exc

        leader = CallThread(g.do, "key", loader)
        assert started.wait(WAIT)
        joiners = [CallThread(g.do, "key", never_called), CallThread(g.do_result, "key", loader)]
        future = g.do_future("key", never_called)
        wait_joined(g, "key", 3)
        gate.set()
        for t in [leader, *joiners]:
            t.finish()
        assert future.done() or wait_futures([future], timeout=WAIT).done
        assert len(g) == 0

    run_flight()
    assert len(refs) == 1
    gc.collect()
    assert refs[0]() is None, f"the flight's {outcome} is still referenced"
    assert len(g) == 0


# -- bad input ---------------------------------------------------------------------------------


def test_non_callable_fn_raises_understandable_type_error() -> None:
    """Bad input: a non-callable fn gives TypeError saying it is not callable; nothing left over."""
    g: Group[str, Any] = Group()
    with pytest.raises(TypeError, match="callable"):
        g.do("key", 42)  # type: ignore[arg-type]
    assert len(g) == 0

    try:
        res = g.do_result("key", 42)  # type: ignore[arg-type]
        error: BaseException | None = res.error
    except TypeError as exc:
        error = exc
    assert isinstance(error, TypeError)
    assert "callable" in str(error)

    try:
        error = g.do_future("key", 42).exception(WAIT)  # type: ignore[arg-type]
    except TypeError as exc:
        error = exc
    assert isinstance(error, TypeError)
    assert "callable" in str(error)
    assert len(g) == 0


def test_non_callable_joiner_gets_type_error_flight_unaffected() -> None:
    """Bad input: a do joiner passing a non-callable fn gets TypeError; the flight carries on."""
    g: Group[str, str] = Group()
    gate = threading.Event()
    loader = Loader("v", gate=gate)
    leader = CallThread(g.do, "key", loader)
    loader.wait_started()
    for entry in ("do", "do_result"):
        with pytest.raises(TypeError, match="callable"):
            getattr(g, entry)("key", None)
    assert "key" in g
    gate.set()
    assert leader.result() == "v"
    assert len(g) == 0


# -- point 11: many threads --------------------------------------------------------------------


class StressError(Exception):
    def __init__(self, key: object) -> None:
        super().__init__(key)
        self.key = key


class Token:
    __slots__ = ("key",)

    def __init__(self, key: object) -> None:
        self.key = key


STRESS_THREADS = 32
STRESS_OPS = 200
STRESS_KEYS: list[object] = ["a", "b", 1, None, ("t", 2)]


def run_stress(seed: int, *, forgets: bool) -> None:
    g: Group[object, Token] = Group()
    never_forgotten = STRESS_KEYS[0]
    forgettable = STRESS_KEYS[1:]
    ops = ["do", "do_result", "do_future"] + (["forget", "forget_unshared"] if forgets else [])
    weights = [40, 25, 25] + ([5, 5] if forgets else [])
    lock = threading.Lock()
    running: collections.Counter[object] = collections.Counter()
    overlaps: collections.Counter[object] = collections.Counter()
    runs: collections.Counter[object] = collections.Counter()
    loads = 0  # calls that could have run a loader
    forgot = 0
    problems: list[str] = []
    start = threading.Barrier(STRESS_THREADS)

    def make_loader(key: object, rng: random.Random) -> Callable[[], Token]:
        delay = rng.random() * 0.002
        fail = rng.random() < 0.15

        def loader() -> Token:
            with lock:
                running[key] += 1
                runs[key] += 1
                if running[key] > 1:
                    overlaps[key] += 1
            try:
                time.sleep(delay)
                if fail:
                    raise StressError(key)
                return Token(key)
            finally:
                with lock:
                    running[key] -= 1

        return loader

    def check(op: str, key: object, value: object, error: BaseException | None) -> None:
        if error is not None:
            if not (isinstance(error, StressError) and error.key == key):
                problems.append(f"{op}({key!r}) raised {error!r}")
        elif not (isinstance(value, Token) and value.key == key):
            problems.append(f"{op}({key!r}) returned {value!r}")

    def worker(i: int) -> None:
        nonlocal loads, forgot
        rng = random.Random(seed * 1000 + i)
        start.wait(WAIT)
        for _ in range(STRESS_OPS):
            key = rng.choice(STRESS_KEYS)
            op = rng.choices(ops, weights)[0]
            try:
                if op in ("forget", "forget_unshared"):
                    with lock:
                        forgot += 1
                    target = rng.choice(forgettable)
                    if op == "forget":
                        g.forget(target)
                    elif not isinstance(g.forget_unshared(target), bool):
                        problems.append("forget_unshared returned a non-bool")
                    continue
                with lock:
                    loads += 1
                fn = make_loader(key, rng)
                if op == "do":
                    try:
                        check(op, key, g.do(key, fn), None)
                    except StressError as exc:
                        check(op, key, None, exc)
                elif op == "do_result":
                    res = g.do_result(key, fn)
                    if (res.error is None) == (res.value is None):
                        problems.append(f"do_result({key!r}) gave {res!r}")
                    check(op, key, res.value, res.error)
                else:
                    future = g.do_future(key, fn)
                    if rng.random() < 0.1:
                        future.cancel()  # abandon it; the flight runs on
                    else:
                        try:
                            check(op, key, future.result(WAIT), None)
                        except StressError as exc:
                            check(op, key, None, exc)
                if rng.random() < 0.2:
                    time.sleep(rng.random() * 0.0005)
            except BaseException as exc:
                problems.append(f"{op}({key!r}): unexpected {exc!r}")

    threads = [
        threading.Thread(target=worker, args=(i,), daemon=True) for i in range(STRESS_THREADS)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a stress thread hangs"
    # flights whose only callers cancelled their futures may still be finishing
    while len(g) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(g) == 0
    assert problems == []
    assert all(n == 0 for n in running.values())
    total_runs = sum(runs.values())
    assert 0 < total_runs < loads, "no call was coalesced: the test did not exercise joining"
    if forgets:
        assert forgot > 0
        assert overlaps[never_forgotten] == 0, (
            f"overlapping loaders on a key never forgotten: {overlaps}"
        )
    else:
        assert sum(overlaps.values()) == 0, f"two loaders of one key overlapped: {overlaps}"


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.timeout(30)
def test_stress_one_loader_per_key(seed: int) -> None:
    """Point 11 / S7: 32 threads x 200 random ops, no forget: never two loaders of a key at once."""
    run_stress(seed, forgets=False)


@pytest.mark.parametrize("seed", [4, 5, 6])
@pytest.mark.timeout(30)
def test_stress_with_forget(seed: int) -> None:
    """Point 11: as above plus random forget/forget_unshared; unforgotten key never overlaps."""
    run_stress(seed, forgets=True)
