"""The thread driver, `singleflight.Group`: what only threads have.

The contract every group keeps is in tests/groups/test_contract.py; this file has what is
particular to threads: callers racing into a flight, a leader that runs the loader in its own
thread (and so sees a KeyboardInterrupt or SystemExit itself), do_future's executor, a
shared exception's traceback, Ctrl-C in a waiter, and many threads at once.

Every wait is bounded: threads are joined with a timeout and asserted finished, events are
waited on with a timeout.  Overlap between callers is made with events, plus one white-box
helper (``wait_joined``) that watches the group's private waiter count.
"""

from __future__ import annotations

import collections
import itertools
import random
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import pytest

from singleflight import AbortedError, Group

from .._support import WAIT, CallThread, Loader, Token, never_called, same_error, wait_joined

pytestmark = pytest.mark.timeout(10)

MAX_FRAMES = 15  # a shared exception's traceback must stay this short whatever the waiter count


# -- helpers -----------------------------------------------------------------------------------


def tb_names(exc: BaseException) -> list[str]:
    return [frame.name for frame in traceback.extract_tb(exc.__traceback__)]


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


# -- callers racing into one flight ------------------------------------------------------------


class ErrValue(Exception):
    def __str__(self) -> str:
        return "error value"


@pytest.mark.timeout(10)
def test_coalesces() -> None:
    """100 threads released together, the loader waits until the 99 others have joined:
    exactly 1 call, all get "ok"."""
    g: Group[str, str] = Group()
    n = 100
    barrier = threading.Barrier(n)
    calls = 0
    lock = threading.Lock()

    def load() -> str:
        nonlocal calls
        with lock:
            calls += 1
        wait_joined(g, "key", n - 1)  # not a sleep: a loaded machine may be slower than it
        return "ok"

    def caller() -> str:
        barrier.wait(WAIT)
        return g.do("key", load)

    threads = [CallThread(caller) for _ in range(n)]
    assert [t.result() for t in threads] == ["ok"] * n
    assert calls == 1
    assert len(g) == 0


# -- callers that stop listening; forget_unshared racing do ------------------------------------


def test_abandoned_future_flight_finishes() -> None:
    """Callers that stop listening (drop, cancel) leave the flight running; later calls fine."""
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
    """Go's TestDoAndForgetUnsharedRace (n=200): after a shared flight, never False."""
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


# -- not a cache -------------------------------------------------------------------------------


def test_entry_removed_before_any_caller_sees_result() -> None:
    """When a future's callback or a caller sees the result, the entry is gone."""
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


# -- a shared exception's traceback stays short ------------------------------------------------


@pytest.mark.timeout(15)
def test_exception_equal_copy_for_every_waiter_short_traceback() -> None:
    """The leader gets the loader's exception, 100 do waiters an equal copy each; every
    traceback has the loader's frame and stays short."""
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
    assert all(same_error(exc, original) and exc is not original for exc, _ in outcomes)
    assert len({id(exc) for exc, _ in outcomes}) == 100
    assert all("failing_loader" in names for _, names in outcomes)
    longest = max(len(names) for _, names in outcomes)
    assert longest <= MAX_FRAMES, f"traceback grew to {longest} frames"
    assert len(g) == 0


def test_exception_via_futures_short_traceback() -> None:
    """100 futures of a failed flight each re-raise their own exception (the first future
    the loader's, the others an equal copy), always the same one, with a short traceback."""
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
    assert all(errors[i] is errors[i + 1] for i in range(0, len(errors), 2))
    assert all(same_error(e, errors[0]) for e in errors)
    assert len({id(e) for e in errors}) == 100
    assert max(lengths) <= MAX_FRAMES, f"traceback grew to {max(lengths)} frames"


def test_result_unwrap_traceback_does_not_grow() -> None:
    """Result.unwrap() of 100 do_result waiters re-raises without growing the traceback."""
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
    assert all(r.error is not None and same_error(r.error, results[0].error) for r in results)
    lengths = []
    for res in results:
        with pytest.raises(ValueError) as info:
            res.unwrap()
        lengths.append(len(tb_names(info.value)))
    assert max(lengths) <= MAX_FRAMES, f"traceback grew from {lengths[0]} to {max(lengths)} frames"


# -- a leader ended by a BaseException that is not an Exception --------------------------------


@pytest.mark.parametrize("leader_entry", ["do", "do_result"])
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_leader_base_exception_waiters_get_aborted(
    exc_type: type[BaseException], leader_entry: str
) -> None:
    """Leader re-raises; every waiter gets AbortedError caused by it; key free."""
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
    assert g.do("key", lambda: "again") == "again"  # the key is free at once
    assert g.do("key", lambda: "again") == "again"


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_do_future_leader_base_exception(
    exc_type: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Do_future loader ended by BaseException: all callers get AbortedError, no crash."""
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


@pytest.fixture
def python_sigint_handler() -> Iterator[None]:
    """Python's own SIGINT handler (KeyboardInterrupt) for the test, whatever the process
    had (a pytest-xdist worker may have another); the previous one back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGINT handlers are set in the main thread")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("python_sigint_handler")
def test_interrupted_waiter_leaves_flight_alone() -> None:
    """A do waiter hit by Ctrl-C stops waiting; the flight and other callers go on."""
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


# -- do_future ---------------------------------------------------------------------------------


def test_do_future_default_runs_each_flight_on_own_daemon_thread() -> None:
    """By default each flight's loader runs on a daemon thread of its own, concurrently."""
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
    """With executor=..., do_future loaders run on that executor's threads."""
    g: Group[str, str] = Group(executor=thread_pool)
    names = [g.do_future(f"k{i}", lambda: threading.current_thread().name) for i in range(4)]
    assert all(f.result(WAIT).startswith("sfpool") for f in names)


def test_do_future_busy_executor_still_returns_at_once() -> None:
    """Do_future never blocks, even when the executor has no free worker."""
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
    """Per-caller futures: one times out, the leader's is cancelled; others fine."""
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
    """An executor that refuses work: do_future raises RuntimeError, no entry left."""
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
    """Work the executor drops (cancel_futures) must not hang callers or poison the key."""
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
    assert same_error(b_joiner.exception(WAIT), b.exception(0))  # type: ignore[arg-type]
    assert g.do("B", lambda: "again") == "again"


# -- re-entry on the loader's own key -------------------------------------------------


@pytest.mark.parametrize("inner", ["do", "do_result"])
def test_reentrant_call_on_own_key_from_an_executor_thread_raises(inner: str) -> None:
    """A do_future loader on an executor's thread calling its own key gets RuntimeError.

    (The contract suite checks every entry point without an executor.)
    """
    g: Group[object, object] = Group(executor=DaemonExecutor())
    key = ("self", 1)
    inner_fn = Loader("inner")

    def loader() -> object:
        try:
            getattr(g, inner)(key, inner_fn)
        except RuntimeError as exc:
            return exc
        return "no error"

    outcome = g.do_future(key, loader).result(WAIT)
    assert isinstance(outcome, RuntimeError)
    assert repr(key) in str(outcome)
    assert inner_fn.calls == 0
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


# -- many threads ------------------------------------------------------------------------------


class StressError(Exception):
    def __init__(self, key: object) -> None:
        super().__init__(key)
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
                return Token(key=key)
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
    """32 threads x 200 random ops, no forget: never two loaders of a key at once."""
    run_stress(seed, forgets=False)


@pytest.mark.parametrize("seed", [4, 5, 6])
@pytest.mark.timeout(30)
def test_stress_with_forget(seed: int) -> None:
    """As above plus random forget/forget_unshared; unforgotten key never overlaps."""
    run_stress(seed, forgets=True)


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_a_joiner_whose_joined_hook_outlasts_the_flight_still_gets_the_value(
    timeout: float | None,
) -> None:
    # The joiner tells Joined after joining; the flight ends while its hook runs.
    from singleflight.events import Event, Joined

    hook_entered = threading.Event()
    leader_done = threading.Event()

    def hook(event: Event) -> None:
        if isinstance(event, Joined):
            hook_entered.set()
            assert leader_done.wait(WAIT)

    g: Group[str, Token] = Group(on_event=hook, timeout=timeout)
    gate = threading.Event()
    loader = Loader(name="v", gate=gate)
    leader = CallThread(g.do, "k", loader)
    loader.wait_started()
    joiner = CallThread(g.do, "k", never_called)
    assert hook_entered.wait(WAIT)
    gate.set()
    assert leader.result() is loader.value
    leader_done.set()
    assert joiner.result() is loader.value
