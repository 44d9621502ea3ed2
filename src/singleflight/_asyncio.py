"""The asyncio driver: :class:`AsyncGroup`.

Each flight's loader runs in a task of its own, so no caller's cancellation
ever reaches it (unless ``cancel_abandoned`` asks for that once every caller has
left).  Callers wait on a future of their own, which is what lets one of them be
cancelled without disturbing the rest.  On Python 3.12+ the loader task starts
eagerly: a loader that finishes without suspending is done before ``do``
returns, and then there is no flight record and no future at all.

State is kept per event loop, so a group may be shared by several loops (in
threads, or one ``asyncio.run`` after another) whose calls never join each other.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
import weakref
from asyncio import (
    AbstractEventLoop,
    CancelledError,
    Future,
    InvalidStateError,
    Task,
    current_task,
    get_running_loop,
)
from collections.abc import Awaitable, Callable
from functools import partial
from inspect import isawaitable
from typing import Any, Generic, ParamSpec, TypeVar

from . import _flight
from ._flight import Flight, reentry_error, remove, waiter_error
from ._result import AbortedError, Result

__all__ = ["AsyncGroup"]

K = TypeVar("K")
V = TypeVar("V")
P = ParamSpec("P")

# Loader tasks share one name: a "Task-N" name per flight costs memory and a
# string format.  Eager start (3.12+) runs the loader until it first suspends.
_TASK_NAME = "singleflight loader"
_new_task: Callable[..., Task[Any]]
if sys.version_info >= (3, 12):
    _new_task = partial(Task, eager_start=True, name=_TASK_NAME)
else:  # pragma: no cover - exercised on 3.11 only
    _new_task = partial(Task, name=_TASK_NAME)

# Waiter futures are made with Future(loop=...) rather than loop.create_future():
# the latter is a Python-level method call on asyncio's loops, a tenth of the
# cost of joining a flight.

# Done callbacks of loader tasks need no context variables; sharing one empty
# context saves a copy_context() per flight.
_NO_CONTEXT = contextvars.Context()

_Table = dict[Any, "_AsyncFlight"]


class _AsyncFlight(Flight):
    """A flight whose loader task is running, and the futures of its callers.

    ``waiters`` is the first caller's future, or a list once a second one waits
    (most flights have one caller).  ``left`` counts the callers that stopped
    waiting, for ``cancel_abandoned``; counting those (rare) rather than the
    callers still waiting keeps the join path free of it.  The flight is its task's done callback:
    a bound method would cost an object per flight.
    """

    __slots__ = ("key", "left", "table", "task", "waiters")

    def __init__(self, table: _Table, key: object, task: Task[Any]) -> None:
        self.dups = 0
        self.table = table
        self.key = key
        self.task = task
        self.waiters: asyncio.Future[Any] | list[asyncio.Future[Any]] | None = None
        self.left = 0

    def add_waiter(self, loop: AbstractEventLoop) -> asyncio.Future[Any]:
        future: Future[Any] = Future(loop=loop)
        waiters = self.waiters
        if waiters is None:
            self.waiters = future
        elif isinstance(waiters, list):
            waiters.append(future)
        else:
            self.waiters = [waiters, future]
        return future

    def __call__(self, task: asyncio.Future[Any]) -> None:
        """The loader task is done: remove the flight, then hand its outcome to every waiter."""
        remove(self.table, self.key, self)
        value = None
        error: Exception | None = None
        if task.cancelled():
            error = AbortedError(self.key, "its loader task was cancelled")
        else:
            exc = task.exception()
            if exc is None:
                value = task.result()
            else:
                error = waiter_error(self.key, exc)
        waiters = self.waiters
        if waiters is None:
            return
        if not isinstance(waiters, list):
            waiters = [waiters]
        if error is None:
            for future in waiters:
                try:
                    future.set_result(value)
                except InvalidStateError:
                    pass  # a caller that left cancelled its own future
        else:
            for future in waiters:
                try:
                    future.set_exception(error)
                except InvalidStateError:
                    continue
                # Like Go's DoChan channel, a future its caller dropped (or was
                # cancelled just after this) is no error to log.
                future._log_traceback = False


# In a table while a new flight's task is starting eagerly.  Only the loader
# itself can run then, so any call that finds it is the loader re-entering.
_STARTING = _AsyncFlight({}, None, None)  # type: ignore[arg-type]


def _dead_ref() -> None:
    return None


async def _await(awaitable: Awaitable[V]) -> V:
    return await awaitable


class AsyncGroup(Generic[K, V]):
    """Coalesces concurrent calls that share a key into one execution, for asyncio.

    ``fn`` is an async function (or any callable returning an awaitable); it is
    called as ``fn(*args, **kwargs)`` and runs in a task of its own, never in a
    caller's task.  With ``cancel_abandoned=False`` (the default, as in Go) a
    loader runs on when every caller has left; with ``True`` it is cancelled
    once its last caller has left.

    Calls are grouped per running event loop: calls from different loops never
    join each other.
    """

    __slots__ = ("__weakref__", "_cancel_abandoned", "_current", "_tables", "_tables_lock")

    def __init__(self, *, cancel_abandoned: bool = False) -> None:
        self._cancel_abandoned = cancel_abandoned
        self._tables: weakref.WeakKeyDictionary[AbstractEventLoop, _Table] = (
            weakref.WeakKeyDictionary()
        )
        self._tables_lock = threading.Lock()
        # The last loop used and its table, read as one tuple so that threads
        # running different loops never pair one loop with another's table.
        self._current: tuple[Callable[[], AbstractEventLoop | None], _Table] = (_dead_ref, {})

    async def do(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> V:
        """Run ``fn(*args, **kwargs)`` as the flight of ``key``, or join the one in flight.

        Returns the loader's value; every caller of one flight gets the same object.

        Errors: the loader's :class:`Exception` is raised in every caller (the
        same object, with the loader's traceback).  A loader task that ends
        cancelled, or stopped by another ``BaseException``, gives its callers
        :class:`AbortedError`, never a ``CancelledError`` they did not ask for.
        ``TypeError`` for an unhashable key, before anything runs;
        ``RuntimeError`` when the loader calls ``do`` on its own key.

        Cancellation: cancelling a caller makes that caller alone raise
        ``CancelledError``; the flight and its other callers go on.  When the
        last caller has left, the loader is cancelled if the group was made with
        ``cancel_abandoned=True`` and runs on otherwise.
        """
        flight, future = self._enter(key, fn, args, kwargs)
        del args, kwargs  # the loader has them; a parked caller need not keep them
        if flight is None:
            return _outcome(key, future)  # type: ignore[no-any-return]
        try:
            return await future  # type: ignore[no-any-return]
        except CancelledError:
            self._leave(flight, future)
            raise

    async def do_result(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Result[V]:
        """Like :meth:`do`, but returns a :class:`Result` instead of raising the loader's error.

        ``Result.error`` holds the loader's :class:`Exception` or an
        :class:`AbortedError`.  Cancelling the caller still raises
        ``CancelledError`` in it, with the same effect on the flight as for
        :meth:`do`; ``TypeError`` and ``RuntimeError`` are raised as by :meth:`do`.
        """
        flight, future = self._enter(key, fn, args, kwargs)
        del args, kwargs
        try:
            if flight is None:
                value = _outcome(key, future)
            else:
                try:
                    value = await future
                except CancelledError:
                    self._leave(flight, future)
                    raise
        except Exception as exc:
            return Result(None, exc, flight is not None and flight.dups > 0)
        return Result(value, None, flight is not None and flight.dups > 0)

    def do_future(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> asyncio.Future[V]:
        """Start or join the flight of ``key`` and return at once with a future of its outcome.

        Go's ``DoChan``; call it with the event loop running.  Each caller gets
        its own future: cancelling it, or waiting on it with a timeout, affects
        nobody else (with ``cancel_abandoned=True`` the loader is cancelled once
        every caller's future has been cancelled or abandoned by its awaiter).
        The future holds the value, the loader's :class:`Exception`, or
        :class:`AbortedError`.  ``TypeError`` and ``RuntimeError`` as for :meth:`do`.
        """
        flight, future = self._enter(key, fn, args, kwargs)
        if flight is None:
            # Finished while starting: the caller still gets a future of its own.
            task = future
            future = task.get_loop().create_future()
            try:
                future.set_result(_outcome(key, task))
            except Exception as exc:
                future.set_exception(exc)
                future._log_traceback = False  # as for every waiter: see _AsyncFlight.__call__
        else:
            future.add_done_callback(partial(self._leave, flight), context=_NO_CONTEXT)
        return future

    def forget(self, key: K) -> None:
        """Let the next call of ``key`` start a new flight.

        The flight in progress is not cancelled; its callers still get its
        outcome, and when it ends it does not remove the newer flight.  Acts on
        the running loop's flights; called outside an event loop, on every loop's.
        """
        for table in self._tables_of_caller():
            _flight.forget(table, key)

    def forget_unshared(self, key: K) -> bool:
        """Forget ``key`` only if nobody joined its flight.

        Returns True if forgotten or not in flight, False if the flight is shared.
        Acts on the running loop's flights (outside a loop, on every loop's).
        """
        forgotten = True
        for table in self._tables_of_caller():
            forgotten = _flight.forget_unshared(table, key) and forgotten
        return forgotten

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is in flight in the running loop (outside a loop: in any loop)."""
        return any(key in table for table in self._tables_of_caller())

    def __len__(self) -> int:
        """The number of keys in flight, over every event loop that is not closed."""
        with self._tables_lock:
            self._prune_closed()
            return sum(len(table) for table in self._tables.values())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} in_flight={len(self)}>"

    # -- the mechanism -------------------------------------------------------------

    def _enter(
        self,
        key: K,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[_AsyncFlight | None, asyncio.Future[Any]]:
        """Lead or join the flight of ``key``: the bookkeeping of every entry point.

        Returns the flight and the future this caller waits on; or, when the
        loader finished while it was being started, no flight and the finished
        loader task (its entry already gone).  Being a plain function, its frame
        is gone once it returns: the coroutines that call it stay small while
        they wait.
        """
        loop = get_running_loop()
        current = self._current
        table = current[1] if current[0]() is loop else self._table_of(loop)
        try:
            flight = table.get(key)
        except TypeError:
            raise _bad_key(key) from None
        if flight is not None:
            if flight is _STARTING or flight.task is current_task(loop):
                raise reentry_error(key)
            flight.dups += 1
            # add_waiter() written out: with many callers on one key this is the hot path.
            future: Future[Any] = Future(loop=loop)
            waiters = flight.waiters
            if isinstance(waiters, list):
                waiters.append(future)
            elif waiters is None:
                flight.waiters = future
            else:
                flight.waiters = [waiters, future]
            return flight, future
        # Hold the key while the task starts, so that a loader calling do() on
        # its own key is told so instead of waiting on itself.
        table[key] = _STARTING
        returned = None
        try:
            returned = fn(*args, **kwargs)
            task = _new_task(returned, loop=loop)
        except BaseException as exc:
            task = _launch_failed(table, key, loop, fn, returned, exc)  # type: ignore[assignment]
        if task.done():
            # Finished without suspending: no waiter can exist, so no flight
            # record is needed.  Release the key unless the loader forgot it.
            if table.get(key) is _STARTING:
                del table[key]
            return None, task
        flight = _AsyncFlight(table, key, task)
        if table.get(key) is _STARTING:
            table[key] = flight
        # else the loader forgot its key while starting; the flight runs unlisted.
        task.add_done_callback(flight, context=_NO_CONTEXT)
        return flight, flight.add_waiter(loop)

    def _leave(self, flight: _AsyncFlight, future: asyncio.Future[Any]) -> None:
        """A caller stopped waiting: with ``cancel_abandoned``, the last one cancels the loader."""
        if not future.cancelled():
            return
        flight.left += 1
        waiters = flight.waiters
        waiting = len(waiters) if isinstance(waiters, list) else 1
        task = flight.task
        if flight.left >= waiting and self._cancel_abandoned and not task.done():
            # Forget first: a caller arriving after this starts a new flight
            # instead of joining one that is being cancelled.
            remove(flight.table, flight.key, flight)
            task.cancel()

    def _table_of(self, loop: AbstractEventLoop) -> _Table:
        """The flights of ``loop`` (the slow path, taken when the loop changes)."""
        with self._tables_lock:
            table = self._tables.get(loop)
            if table is None:
                self._prune_closed()
                table = self._tables[loop] = {}
            self._current = (weakref.ref(loop), table)
        return table

    def _prune_closed(self) -> None:
        """Drop the tables of closed loops (the tables lock is held).

        A loop closed with flights still pending can never finish them, and its
        table would keep it alive: its flights hold tasks that hold the loop.
        """
        for loop in [loop for loop in self._tables if loop.is_closed()]:
            del self._tables[loop]
        current_loop = self._current[0]()
        if current_loop is not None and current_loop.is_closed():
            self._current = (_dead_ref, {})

    def _tables_of_caller(self) -> list[_Table]:
        """The running loop's table, or every table when called outside a loop."""
        try:
            loop = get_running_loop()
        except RuntimeError:
            with self._tables_lock:
                self._prune_closed()
                return list(self._tables.values())
        with self._tables_lock:
            table = self._tables.get(loop)
        return [] if table is None else [table]


def _outcome(key: object, task: asyncio.Future[Any]) -> Any:
    """The outcome of a loader task that finished while it was being started.

    The same as its waiters would get: the value, the loader's Exception, or
    AbortedError for a task that ended cancelled or by another BaseException.
    """
    if task.cancelled():
        raise AbortedError(key, "its loader task was cancelled")
    exc = task.exception()
    if exc is not None:
        raise waiter_error(key, exc).with_traceback(exc.__traceback__)
    return task.result()


def _bad_key(key: object) -> TypeError:
    return TypeError(f"singleflight keys must be hashable; got {type(key).__name__} {key!r}")


def _launch_failed(
    table: _Table,
    key: object,
    loop: AbstractEventLoop,
    fn: object,
    returned: object,
    exc: BaseException,
) -> asyncio.Future[Any]:
    """``fn`` raised, or returned something a task cannot run.

    An awaitable that is not a coroutine gets a coroutine awaiting it.  A result
    that is not awaitable is a usage error: ``TypeError`` naming ``fn`` is raised.
    An :class:`Exception` raised by ``fn`` itself is the flight's outcome, as if
    its coroutine had raised it: a finished future holding it is returned.  Any
    other ``BaseException`` is raised.  Nobody can have joined yet, so the key
    is simply released.
    """
    if isinstance(exc, TypeError) and returned is not None:
        if isawaitable(returned):
            return _new_task(_await(returned), loop=loop)
        exc = TypeError(
            f"AsyncGroup needs fn to be an async function or to return an awaitable; "
            f"{fn!r} returned {type(returned).__name__}"
        )
    if table.get(key) is _STARTING:
        del table[key]
    if returned is None and isinstance(exc, Exception):
        failed: asyncio.Future[Any] = Future(loop=loop)
        failed.set_exception(exc)
        return failed
    raise exc
