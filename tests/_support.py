"""Helpers shared by the test files: values, loaders, gates, bounded waits, caller threads.

Every wait here is bounded (``WAIT`` seconds unless told otherwise) and fails the test
instead of hanging.  Thread helpers block; the ``async`` ones work on asyncio and on trio.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
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


class Loader:
    """A loader that counts its calls, may wait at a gate or sleep, then returns or raises.

    With ``value`` it returns that object; without, a new :class:`Token` per call (kept in
    ``values``, the first one is ``value``), so two executions are told apart.
    ``is_async=True`` makes calling it return a coroutine (an async loader); the calls are
    counted when it is called, so a joiner's loader that is never called shows ``calls == 0``.
    ``args`` records each call's arguments, ``threads`` the thread each ran in.
    """

    def __init__(
        self,
        value: Any = _FRESH,
        *,
        name: str = "loader",
        raises: BaseException | None = None,
        gate: Gate | threading.Event | None = None,
        sleep: float = 0.0,
        is_async: bool = False,
    ) -> None:
        self.name = name
        self._value = value
        self.raises = raises
        self.gate = gate
        self.sleep = sleep
        self.is_async = is_async
        self.calls = 0
        self.values: list[Any] = []
        self.args: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.threads: list[threading.Thread] = []
        self.started = threading.Event()
        self.finished = threading.Event()
        self._lock = threading.Lock()

    @property
    def value(self) -> Any:
        if self._value is not _FRESH:
            return self._value
        assert self.values, "the loader never returned"
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

        self.started.set()
        if isinstance(self.gate, Gate):
            await self.gate.wait_async()
        elif self.gate is not None:
            await until(self.gate.is_set, WAIT, "the test to open the loader's gate")
        if self.sleep:
            await anyio.sleep(self.sleep)
        elif self.gate is None:
            await anyio.sleep(0)
        return self._end(value)

    def _end(self, value: Any) -> Any:
        self.finished.set()
        if self.raises is not None:
            raise self.raises
        with self._lock:
            self.values.append(value)
        return value

    def wait_started(self, timeout: float = WAIT) -> None:
        assert self.started.wait(timeout), f"{self.name} never started"

    async def started_async(self, timeout: float = WAIT) -> None:
        await until(self.started.is_set, timeout, f"{self.name} to start")


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
