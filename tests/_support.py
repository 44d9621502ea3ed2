"""Helpers shared by the test files: values, loaders, gates, bounded waits, caller threads.

Every wait here is bounded (``WAIT`` seconds unless told otherwise) and fails the test
instead of hanging.  Thread helpers block; the ``async`` ones work on asyncio and on trio.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

WAIT = 5.0  # upper bound of any single wait; a correct run never comes near it


class Token:
    """A loader's value: compared by identity, and weakly referenceable."""

    def __init__(self, name: str = "", key: object = None) -> None:
        self.name = name
        self.key = key

    def __repr__(self) -> str:
        return f"Token({self.name!r})"


class Boom(Exception):
    """A loader's failure."""


class Stop(BaseException):
    """A BaseException that is not an Exception (what ends a loader without a result)."""


def same_error(seen: BaseException | None, error: BaseException) -> bool:
    """``seen`` is ``error`` or an equal copy: what a caller of a flight that failed gets.

    The caller that started the flight gets the loader's exception itself; every other
    caller an equal copy of its own: same type, same ``args``, same ``__cause__`` and
    ``__suppress_context__``, and the loader's traceback frames (checked where it matters
    by the tests that say so).
    """
    return seen is error or (
        type(seen) is type(error)
        and seen is not None
        and seen.args == error.args
        and seen.__cause__ is error.__cause__
        and seen.__suppress_context__ == error.__suppress_context__
    )


def never_called(*args: Any, **kwargs: Any) -> Any:
    """A joiner's loader: a joiner's own fn must never run."""
    raise AssertionError("a joiner's fn ran")


# -- bounded waits ---------------------------------------------------------------------------


def wait_for(condition: Callable[[], object], timeout: float = WAIT, what: str = "") -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.001)


async def until(condition: Callable[[], object], timeout: float = WAIT, what: str = "") -> None:
    """Let other tasks run until ``condition`` holds; fail after ``timeout`` seconds.

    Works on asyncio and on trio; a thread may make ``condition`` true.
    """
    import anyio

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        await anyio.sleep(0.0005)


async def spin(n: int = 5) -> None:
    """Let the running loop (asyncio or trio) run ``n`` rounds of other tasks."""
    import anyio

    for _ in range(n):
        await anyio.sleep(0)


def run(coro: Coroutine[Any, Any, Any], timeout: float = WAIT) -> Any:
    """Run ``coro`` in a fresh asyncio loop, failing (not hanging) after ``timeout`` seconds."""

    async def main() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(main())


def wait_joined(g: Any, key: object, n: int, timeout: float = WAIT) -> None:
    """Wait until ``n`` callers joined the thread ``Group``'s flight of ``key``.

    White-box (reads ``Group._calls``): ``do`` joiners block inside the call, and the group
    says nothing public about them before the flight ends unless it was made with an
    ``on_event`` hook.  A joiner counted here is committed to this flight.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with g._lock:
            call = g._calls.get(key)
            if call is not None and call.dups >= n:
                return
        time.sleep(0.0005)
    raise AssertionError(f"{n} joiners expected on {key!r}")


# -- gates and loaders -----------------------------------------------------------------------


class Gate:
    """A one-shot gate a loader waits at until the test opens it; safe from any thread or loop.

    ``wait()`` blocks a thread; ``await wait_async()`` suspends a task (asyncio or trio).
    Both fail the test if the gate stays shut for ``WAIT`` seconds.
    """

    def __init__(self) -> None:
        self._open = threading.Event()

    def open(self) -> None:
        self._open.set()

    set = open  # so that a Gate can stand where a threading.Event is expected

    def is_open(self) -> bool:
        return self._open.is_set()

    is_set = is_open

    def wait(self, timeout: float = WAIT) -> bool:
        assert self._open.wait(timeout), "the test never opened the gate"
        return True

    async def wait_async(self, timeout: float = WAIT) -> None:
        await until(self._open.is_set, timeout, "the test to open the gate")


_FRESH: Any = object()


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _checkpoint() -> None:
    """Let the loop run other tasks once (asyncio's own sleep(0) on asyncio, as tests count)."""
    if _on_asyncio():
        await asyncio.sleep(0)
    else:
        import anyio

        await anyio.sleep(0)


class LoopEvent:
    """An event for tasks, made in the running loop at first use: an ``asyncio.Event`` on
    asyncio, anyio's (trio's) on trio.  ``is_set()`` works anywhere."""

    def __init__(self) -> None:
        self._event: Any = None

    def _get(self) -> Any:
        if self._event is None:
            if _on_asyncio():
                self._event = asyncio.Event()
            else:
                import anyio

                self._event = anyio.Event()
        return self._event

    def set(self) -> None:
        self._get().set()

    def is_set(self) -> bool:
        return self._event is not None and bool(self._event.is_set())

    async def wait(self) -> None:
        await self._get().wait()


class Meter:
    """Counts loaders running at once (``now``) and the most there ever were (``peak``)."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def enter(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        self.now -= 1


class Loader:
    """A loader that counts its calls, may wait at a gate or sleep, then returns or raises.

    With ``value`` it returns that object; without, a new :class:`Token` named after
    ``name`` per call (kept in ``values``; the first one is ``value``), so two executions are
    told apart.  ``args`` records each call's arguments, ``threads`` the thread it ran in.

    A thread loader (the default) waits at ``gate`` (a :class:`Gate` or a
    ``threading.Event``); ``started`` and ``finished`` are ``threading.Event`` objects.

    An async loader (``is_async=True``, or :class:`AsyncLoader`): calling it counts the call
    and returns a coroutine, so a joiner's loader that is never awaited still shows
    ``calls == 0`` only if it is never called.  At its first line, before any await, it
    records its task (``tasks``: the asyncio task, or None on trio; ``task_ids``: anyio's
    id).  It waits at ``gate`` (an ``asyncio.Event``, ``anyio.Event``, :class:`Gate` or
    ``threading.Event``), else sleeps ``sleep`` seconds, else suspends once (unless
    ``suspend=False``: then it never suspends).  ``self_cancel`` makes its asyncio task
    cancel itself after that.  Cancelled, it sets ``cancelled`` and, with ``cleanup``, waits
    for that event before re-raising.  ``meter`` counts loaders running at once.  Its
    ``started``, ``finished`` and ``cancelled`` are :class:`LoopEvent` objects.
    """

    def __init__(
        self,
        value: Any = _FRESH,
        *,
        name: str = "loader",
        raises: BaseException | None = None,
        gate: Any = None,
        sleep: float = 0.0,
        is_async: bool = False,
        suspend: bool = True,
        self_cancel: bool = False,
        cleanup: Any = None,
        meter: Meter | None = None,
    ) -> None:
        self.name = name
        self._value = value
        self.raises = raises
        self.gate = gate
        self.sleep = sleep
        self.is_async = is_async
        self.suspend = suspend
        self.self_cancel = self_cancel
        self.cleanup = cleanup
        self.meter = meter
        self.calls = 0
        self.values: list[Any] = []
        self.args: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.threads: list[threading.Thread] = []
        self.tasks: list[asyncio.Task[Any] | None] = []
        self.task_ids: list[int] = []
        self.started: Any = LoopEvent() if is_async else threading.Event()
        self.finished: Any = LoopEvent() if is_async else threading.Event()
        self.cancelled = LoopEvent()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Loader {self.name!r} calls={self.calls}>"

    @property
    def value(self) -> Any:
        if self._value is not _FRESH:
            return self._value
        assert self.values, f"{self.name} never returned"
        return self.values[0]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.calls += 1
            self.args.append((args, kwargs))
            self.threads.append(threading.current_thread())
            value = Token(f"{self.name}#{self.calls}") if self._value is _FRESH else self._value
        if self.is_async:
            return self._body_async(value)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT), "the test never opened the loader's gate"
        if self.sleep:
            time.sleep(self.sleep)
        return self._end(value)

    async def _body_async(self, value: Any) -> Any:
        import anyio

        # First line, before any await: the task the loader runs in.
        self.tasks.append(asyncio.current_task() if _on_asyncio() else None)
        self.task_ids.append(anyio.get_current_task().id)
        self.started.set()
        if self.meter is not None:
            self.meter.enter()
        try:
            if isinstance(self.gate, Gate):
                await self.gate.wait_async()
            elif isinstance(self.gate, threading.Event):
                await until(self.gate.is_set, WAIT, "the test to open the loader's gate")
            elif self.gate is not None:
                await self.gate.wait()
            if self.sleep:
                await anyio.sleep(self.sleep)
            elif self.gate is None and self.suspend:
                await _checkpoint()
            if self.self_cancel:
                task = asyncio.current_task()
                assert task is not None
                task.cancel()
                await asyncio.sleep(0)
        except anyio.get_cancelled_exc_class():
            self.cancelled.set()
            if self.cleanup is not None:
                await self.cleanup.wait()
            raise
        finally:
            if self.meter is not None:
                self.meter.leave()
        return self._end(value)

    def _end(self, value: Any) -> Any:
        self.finished.set()
        if self.raises is not None:
            raise self.raises
        with self._lock:
            self.values.append(value)
        return value

    def wait_started(self, timeout: float = WAIT) -> None:
        """Block until a thread loader has started."""
        assert self.started.wait(timeout), f"{self.name} never started"

    async def started_async(self, timeout: float = WAIT) -> None:
        """Let tasks run until the loader has started (thread or async loader)."""
        await until(self.started.is_set, timeout, f"{self.name} to start")


class AsyncLoader(Loader):
    """A :class:`Loader` that is async (``is_async=True``); the rest as for Loader."""

    def __init__(self, value: Any = _FRESH, **options: Any) -> None:
        super().__init__(value, is_async=True, **options)


# -- callers on threads of their own ---------------------------------------------------------


class CallThread(threading.Thread):
    """Runs one call on a daemon thread of its own and keeps its outcome."""

    def __init__(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
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
        except BaseException as exc:  # KeyboardInterrupt included: caught here, on purpose
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


# -- "exception was never retrieved" ---------------------------------------------------------


class _NeverRetrieved(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "never retrieved" in message:
            self.messages.append(message)


@pytest.fixture(scope="module")
def no_unretrieved_exceptions() -> Iterator[None]:
    """Fail the module if any task or future of it ended with an exception nobody retrieved.

    asyncio logs "exception was never retrieved" when such an object is collected.  One
    collection at the end of the module finds them all; collecting after every test would
    cost more than the tests themselves.  Use it as ``pytestmark =
    pytest.mark.usefixtures("no_unretrieved_exceptions")`` after importing it.
    """
    handler = _NeverRetrieved()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        yield
        gc.collect()
    finally:
        logger.removeHandler(handler)
    assert not handler.messages, handler.messages


# -- a child process, a private redis-server -------------------------------------------------


def run_in_child(check: Callable[[], None], timeout: int = 5) -> None:
    """Fork; run ``check`` in the child (killed by SIGALRM after ``timeout`` s); fail
    the test if the child failed, hung or died."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            # pytest-timeout's SIGALRM handler is inherited: the alarm must kill.
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(timeout)
            try:
                check()
                message = b"ok"
                code = 0
            except BaseException:
                message = traceback.format_exc().encode()
            os.write(write_end, message[-4000:])
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read().decode(errors="replace")
    if os.WIFSIGNALED(status):
        pytest.fail(f"the child hung (killed by signal {os.WTERMSIG(status)})")
    assert os.WEXITSTATUS(status) == 0, report


@contextmanager
def private_redis_server() -> Iterator[Any]:
    """A redis-server of the caller's own on a free 127.0.0.1 port (tests/redis/
    _redis_server.py's ``RedisServer``), killed on exit.  Without redis-py or a
    redis-server binary the test is skipped, unless SINGLEFLIGHT_REQUIRE_REDIS is set
    (as CI does): then it fails."""
    required = bool(os.environ.get("SINGLEFLIGHT_REQUIRE_REDIS"))
    redis_dir = str(Path(__file__).parent / "redis")
    sys.path.insert(0, redis_dir)
    try:
        from _redis_server import RedisServer, find_server
    except ImportError as exc:  # redis-py missing
        if required:
            pytest.fail(f"SINGLEFLIGHT_REQUIRE_REDIS is set but {exc}", pytrace=False)
        pytest.skip(str(exc))
    finally:
        sys.path.remove(redis_dir)
    binary = find_server("redis")
    if binary is None:
        if required:
            pytest.fail(
                "no redis-server binary, and SINGLEFLIGHT_REQUIRE_REDIS is set", pytrace=False
            )
        pytest.skip("no redis-server binary")
    with RedisServer(binary) as server:
        yield server
