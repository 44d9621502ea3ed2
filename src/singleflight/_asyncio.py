"""The asyncio driver: :class:`AsyncGroup`.

Each flight's loader runs in a task of its own, so no caller's cancellation
ever reaches it (unless ``cancel_orphaned`` asks for that once every caller has
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
import itertools
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
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from inspect import isawaitable
from time import perf_counter
from typing import Any, Generic, Literal, NoReturn, ParamSpec, TypeVar

from . import _flight
from ._flight import Flight, reentry_error, remove, waiter_error
from ._options import check_flag, check_options, check_seconds
from ._result import Result
from .errors import AbortedError, TooManyFlightsError, WaitTimeoutError
from .events import (
    EventHook,
    FlightAborted,
    FlightFailed,
    FlightFinished,
    FlightStarted,
    Joined,
    Rejected,
    TimedOut,
    emit,
)
from .stats import GroupStats

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

# Flight ids in events (a flight's record may not exist when it starts).
_flight_ids = itertools.count(1)


class _LoopState:
    """One event loop's flights of a group, and its counters.

    Only that loop's thread touches it, so the counters need no lock;
    ``AsyncGroup.stats()`` adds them up over the loops.
    """

    __slots__ = (
        "aborted",
        "errors",
        "finalizer",
        "flights",
        "hook",
        "joins",
        "name",
        "rejected",
        "shared",
        "slot_waiters",
        "table",
        "timeouts",
        "wait_seconds",
    )

    def __init__(self, name: str, hook: EventHook | None) -> None:
        self.table: dict[Any, _AsyncFlight] = {}
        # The group's name and hook, not the group: a state outliving its
        # group (in a finalizer) must not keep it alive.
        self.name = name
        self.hook = hook
        self.finalizer: weakref.finalize[Any, Any] | None = None
        self.flights = self.joins = self.shared = self.errors = self.aborted = 0
        self.timeouts = self.rejected = 0
        self.wait_seconds = 0.0
        # Callers waiting for a slot under max_flights with on_limit="wait".
        self.slot_waiters: list[asyncio.Future[None]] = []

    def add_to(self, totals: _LoopState) -> None:
        """Fold these counters into ``totals`` (a loop is gone; its counts are not)."""
        totals.flights += self.flights
        totals.joins += self.joins
        totals.shared += self.shared
        totals.errors += self.errors
        totals.aborted += self.aborted
        totals.timeouts += self.timeouts
        totals.rejected += self.rejected
        totals.wait_seconds += self.wait_seconds

    def free_slot(self) -> None:
        """A flight left the table: let the first caller waiting for a slot retry."""
        while self.slot_waiters:
            waiter = self.slot_waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return


class _AsyncFlight(Flight):
    """A flight whose loader task is running, and the futures of its callers.

    ``waiters`` is the first caller's future, or a list once a second one waits
    (most flights have one caller).  ``left`` counts the callers that stopped
    waiting, for ``cancel_orphaned``; counting those (rare) rather than the
    callers still waiting keeps the join path free of it.  ``joined_at`` sums
    the joiners' join times, for ``wait_seconds``.  The flight is its task's
    done callback: a bound method would cost an object per flight.
    """

    __slots__ = (
        "fid",
        "joined_at",
        "joiners_left",
        "key",
        "left",
        "started",
        "state",
        "task",
        "waiters",
    )
    # Set only in a group with options (events, limits, timeouts): its start
    # time and its id in events.
    started: float
    fid: int

    def __init__(self, state: _LoopState, key: object, task: Task[Any]) -> None:
        self.dups = 0
        self.state = state
        self.key = key
        self.task = task
        self.waiters: asyncio.Future[Any] | list[asyncio.Future[Any]] | None = None
        self.left = 0
        self.joiners_left = 0
        self.joined_at = 0.0

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
        state = self.state
        remove(state.table, self.key, self)
        value = None
        error: Exception | None = None
        cause: BaseException | None = None
        if task.cancelled():
            error = AbortedError(self.key, "its loader task was cancelled")
        else:
            cause = task.exception()
            if cause is None:
                value = task.result()
            else:
                error = waiter_error(self.key, cause)
        if error is not None:
            if isinstance(error, AbortedError):
                state.aborted += 1
            else:
                state.errors += 1
        if self.dups:
            state.wait_seconds += (self.dups - self.joiners_left) * perf_counter() - self.joined_at
        if state.slot_waiters:
            state.free_slot()
        hook = state.hook
        if hook is not None:
            self.emit_end(hook, error, cause)
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

    def emit_end(
        self, hook: EventHook, error: Exception | None, cause: BaseException | None
    ) -> None:
        name = self.state.name
        duration = perf_counter() - self.started
        callers = self.dups + 1
        if error is None:
            emit(hook, FlightFinished(name, self.key, self.fid, duration, callers))
        elif isinstance(error, AbortedError):
            emit(hook, FlightAborted(name, self.key, self.fid, duration, callers, cause))
        else:
            emit(hook, FlightFailed(name, self.key, self.fid, duration, callers, error))


# In a table while a new flight's task is starting eagerly.  Only the loader
# itself can run then, so any call that finds it is the loader re-entering.
_STARTING = _AsyncFlight(None, None, None)  # type: ignore[arg-type]


# What fn "returned" while it has not returned yet (None is a possible return).
_NOTHING: Any = object()


def _dead_ref() -> None:
    return None


async def _await(awaitable: Awaitable[V]) -> V:
    return await awaitable


class _NoSlot(Exception):
    """Internal: max_flights is reached and the caller is to wait on ``slot``."""

    def __init__(self, slot: asyncio.Future[None]) -> None:
        self.slot = slot


class AsyncGroup(Generic[K, V]):
    """Coalesces concurrent calls that share a key into one execution, for asyncio.

    ``fn`` is an async function (or any callable returning an awaitable); it is
    called as ``fn(*args, **kwargs)`` and runs in a task of its own, never in a
    caller's task.  Options:

    * ``cancel_orphaned``: ``False`` (the default, as in Go) lets a loader run
      on when every caller has left; ``True`` cancels it once its last caller left.
    * ``name``, ``on_event``: as for :class:`~singleflight.Group`.
    * ``max_flights``, ``on_limit``: at most this many keys in flight per event
      loop; a call for a new key beyond it raises :class:`TooManyFlightsError`
      (``"raise"``) or waits for a flight to end (``"wait"``).  Joins are never refused.
    * ``timeout``: seconds a caller waits at most; then it alone raises
      ``TimeoutError`` (per call, ``asyncio.timeout()`` around the await does the same).
    * ``loader_timeout``: seconds a loader may run; then its task is cancelled
      and the flight fails for everyone with ``TimeoutError``.

    Calls are grouped per running event loop: calls from different loops never
    join each other.
    """

    __slots__ = (
        "__weakref__",
        "_cancel_orphaned",
        "_current",
        "_loader_timeout",
        "_max_flights",
        "_on_event",
        "_on_limit",
        "_retired",
        "_slow",
        "_states",
        "_states_lock",
        "_timeout",
        "name",
    )

    def __init__(
        self,
        *,
        cancel_orphaned: bool = False,
        name: str = "default",
        on_event: EventHook | None = None,
        max_flights: int | None = None,
        on_limit: Literal["raise", "wait"] = "raise",
        timeout: float | None = None,
        loader_timeout: float | None = None,
    ) -> None:
        check_options(name, on_event, max_flights, on_limit, timeout)
        check_seconds("loader_timeout", loader_timeout)
        check_flag("cancel_orphaned", cancel_orphaned)
        self._cancel_orphaned = cancel_orphaned
        self.name = name
        self._on_event = on_event
        self._max_flights = max_flights
        self._on_limit = on_limit
        self._timeout = timeout
        self._loader_timeout = loader_timeout
        # Limits, timeouts and events take the general path; without them the
        # short one.
        self._slow = (
            on_event is not None
            or max_flights is not None
            or timeout is not None
            or loader_timeout is not None
        )
        self._states: weakref.WeakKeyDictionary[AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        # Reentrant: a loop collected while it is held runs _retire(), which takes it.
        self._states_lock = threading.RLock()
        # The last loop used and its state, read as one tuple so that threads
        # running different loops never pair one loop with another's state.
        self._current: tuple[Callable[[], AbstractEventLoop | None], _LoopState] = (
            _dead_ref,
            _LoopState(name, on_event),
        )
        # The counters of loops that are gone, so that stats() never goes back.
        self._retired = _LoopState(name, on_event)

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
        ``cancel_orphaned=True`` and runs on otherwise.
        """
        if self._slow:
            deadline = self._deadline()
            flight, future = await self._admit(key, fn, args, kwargs, deadline)
            return await self._wait(key, flight, future, deadline)  # type: ignore[no-any-return]
        flight, future = self._enter(key, fn, args, kwargs)
        del args, kwargs  # the loader has them; a parked caller need not keep them
        if flight is None:
            return self._outcome(key, future)  # type: ignore[no-any-return]
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
        if self._slow:
            deadline = self._deadline()
            flight, future = await self._admit(key, fn, args, kwargs, deadline)
            try:
                value = await self._wait(key, flight, future, deadline)
            except WaitTimeoutError:
                raise
            except Exception as exc:
                return Result(None, exc, flight is not None and flight.dups > 0)
            return Result(value, None, flight is not None and flight.dups > 0)
        flight, future = self._enter(key, fn, args, kwargs)
        del args, kwargs
        try:
            if flight is None:
                value = self._outcome(key, future)
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
        nobody else (with ``cancel_orphaned=True`` the loader is cancelled once
        every caller's future has been cancelled or abandoned by its awaiter).
        The future holds the value, the loader's :class:`Exception`, or
        :class:`AbortedError`.  ``TypeError`` and ``RuntimeError`` as for :meth:`do`.
        """
        try:
            flight, future = self._enter(key, fn, args, kwargs)
        except _NoSlot as no_slot:
            # Waiting for a slot must not block: the call runs in a task of its
            # own, which is this caller's future (cancelling it is leaving).
            no_slot.slot.cancel()
            call = get_running_loop().create_task(self.do(key, fn, *args, **kwargs))
            call.add_done_callback(_mark_retrieved, context=_NO_CONTEXT)
            return call
        if flight is None:
            # Finished while starting: the caller still gets a future of its own.
            task = future
            future = task.get_loop().create_future()
            try:
                future.set_result(self._outcome(key, task))
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
        A caller waiting for a slot under ``max_flights`` is woken to look again
        (from another thread, in its own loop's next step).
        """
        for loop, state in self._states_of_caller():
            _flight.forget(state.table, key)
            if state.slot_waiters:
                _free_slot(loop, state)

    def forget_unshared(self, key: K) -> bool:
        """Forget ``key`` only if nobody joined its flight.

        Returns True if forgotten or not in flight, False if the flight is shared.
        Acts on the running loop's flights (outside a loop, on every loop's).
        """
        forgotten = True
        for loop, state in self._states_of_caller():
            forgotten = _flight.forget_unshared(state.table, key) and forgotten
            if state.slot_waiters:
                _free_slot(loop, state)
        return forgotten

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is in flight in the running loop (outside a loop: in any loop)."""
        return any(key in state.table for _, state in self._states_of_caller())

    def __len__(self) -> int:
        """The number of keys in flight, over every event loop that is not closed."""
        with self._states_lock:
            self._prune_closed()
            return sum(len(state.table) for state in self._states.values())

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
        they wait.  Raises TooManyFlightsError (or, internally, _NoSlot) when
        ``max_flights`` is reached.
        """
        loop = get_running_loop()
        current = self._current
        state = current[1] if current[0]() is loop else self._state_of(loop)
        table = state.table
        try:
            flight = table.get(key)
        except TypeError:
            raise _bad_key(key) from None
        if flight is not None:
            if flight is _STARTING or flight.task is current_task(loop):
                raise reentry_error(key)
            if not flight.dups:
                state.shared += 1
            flight.dups += 1
            state.joins += 1
            flight.joined_at += perf_counter()
            if self._on_event is not None:
                emit(self._on_event, Joined(self.name, key, flight.fid))
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
        mark = self._admit_lead(state, key) if self._slow else None
        state.flights += 1
        # Hold the key while the task starts, so that a loader calling do() on
        # its own key is told so instead of waiting on itself.
        table[key] = _STARTING
        returned: Any = _NOTHING
        try:
            returned = fn(*args, **kwargs)
            if self._loader_timeout is not None:
                returned = _with_deadline(returned, fn, self._loader_timeout, key)
            task = _new_task(returned, loop=loop)
        except BaseException as exc:
            try:
                task = _launch_failed(table, key, loop, fn, returned, exc)  # type: ignore[assignment]
            except BaseException as raised:
                if isinstance(raised, Exception):
                    state.errors += 1
                else:
                    state.aborted += 1
                if mark is not None:  # the flight was told as started: tell its end
                    failed: Future[Any] = Future(loop=loop)
                    failed.set_exception(raised)
                    self._ended_while_starting(state, key, failed, mark)
                    failed.exception()
                raise
        if task.done():
            # Finished without suspending: no waiter can exist, so no flight
            # record is needed.  Release the key unless the loader forgot it.
            if table.get(key) is _STARTING:
                del table[key]
            if mark is not None:
                self._ended_while_starting(state, key, task, mark)
            return None, task
        flight = _AsyncFlight(state, key, task)
        if mark is not None:
            flight.started, flight.fid = mark
        if table.get(key) is _STARTING:
            table[key] = flight
        # else the loader forgot its key while starting; the flight runs unlisted.
        task.add_done_callback(flight, context=_NO_CONTEXT)
        return flight, flight.add_waiter(loop)

    def _admit_lead(self, state: _LoopState, key: K) -> tuple[float, int]:
        """A new flight is about to start: apply max_flights, tell on_event.

        Returns the start time (for the flight's duration) and the flight's id
        in events (the record does not exist yet).
        """
        if self._max_flights is not None and len(state.table) >= self._max_flights:
            if self._on_limit == "wait":
                slot: asyncio.Future[None] = Future(loop=get_running_loop())
                state.slot_waiters.append(slot)
                raise _NoSlot(slot)
            state.rejected += 1
            if self._on_event is not None:
                emit(self._on_event, Rejected(self.name, key, len(state.table)))
            raise TooManyFlightsError(key, self._max_flights)
        if state.slot_waiters:
            # Callers of this key waiting for a slot can join it now; the
            # others look again and wait on.
            waiting, state.slot_waiters = state.slot_waiters, []
            for slot in waiting:
                if not slot.done():
                    slot.set_result(None)
        fid = next(_flight_ids)
        if self._on_event is not None:
            emit(self._on_event, FlightStarted(self.name, key, fid))
        return perf_counter(), fid

    def _ended_while_starting(
        self, state: _LoopState, key: K, task: asyncio.Future[Any], mark: tuple[float, int]
    ) -> None:
        """Events and slots for a flight that finished inside its start (no record was made)."""
        if state.slot_waiters:
            state.free_slot()
        hook = self._on_event
        if hook is None:
            return
        started, fid = mark
        duration = perf_counter() - started
        if task.cancelled():
            emit(hook, FlightAborted(self.name, key, fid, duration, 1, None))
        elif (exc := task.exception()) is None:
            emit(hook, FlightFinished(self.name, key, fid, duration, 1))
        elif isinstance(exc, Exception):
            emit(hook, FlightFailed(self.name, key, fid, duration, 1, exc))
        else:
            emit(hook, FlightAborted(self.name, key, fid, duration, 1, exc))

    def _outcome(self, key: object, task: asyncio.Future[Any]) -> Any:
        """The outcome of a loader task that finished while it was being started.

        The same as its waiters would get: the value, the loader's Exception, or
        AbortedError for a task that ended cancelled or by another BaseException.
        """
        if task.cancelled():
            self._state_here().aborted += 1
            raise AbortedError(key, "its loader task was cancelled")
        exc = task.exception()
        if exc is not None:
            error = waiter_error(key, exc)
            state = self._state_here()
            if error is exc:
                state.errors += 1
            else:
                state.aborted += 1
            raise error.with_traceback(exc.__traceback__)
        return task.result()

    def _deadline(self) -> float | None:
        """When a caller starting now stops waiting: one deadline for the slot and the result."""
        return None if self._timeout is None else get_running_loop().time() + self._timeout

    async def _admit(
        self,
        key: K,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float | None,
    ) -> tuple[_AsyncFlight | None, asyncio.Future[Any]]:
        """_enter(), waiting for a slot while max_flights is reached (on_limit="wait").

        Raises WaitTimeoutError if no slot frees before ``deadline``.
        """
        while True:
            try:
                return self._enter(key, fn, args, kwargs)
            except _NoSlot as no_slot:
                try:
                    async with asyncio.timeout_at(deadline):
                        await no_slot.slot
                except BaseException as exc:
                    slot = no_slot.slot
                    if slot.done() and not slot.cancelled():
                        # Woken for a slot in the very step it left: pass it on.
                        self._state_here().free_slot()
                    else:
                        slot.cancel()
                    if isinstance(exc, TimeoutError):
                        self._timed_out(key, self._timeout or 0.0)
                    raise

    async def _wait(
        self,
        key: K,
        flight: _AsyncFlight | None,
        future: asyncio.Future[Any],
        deadline: float | None,
    ) -> Any:
        """Wait for this caller's outcome, until ``deadline`` (the call's, slot wait included)."""
        if flight is None:
            return self._outcome(key, future)
        if deadline is None:
            try:
                return await future
            except CancelledError:
                self._leave(flight, future)
                raise
        try:
            async with asyncio.timeout_at(deadline):
                return await future
        except CancelledError:
            self._leave(flight, future)
            raise
        except TimeoutError:
            if future.done() and not future.cancelled():
                # The outcome arrived in the same loop step as the timeout (or
                # it is the loader's own TimeoutError): it is this caller's.
                return future.result()
            self._leave(flight, future)
            self._timed_out(key, self._timeout or 0.0)

    def _timed_out(self, key: K, waited: float) -> NoReturn:
        self._state_here().timeouts += 1
        if self._on_event is not None:
            emit(self._on_event, TimedOut(self.name, key, waited))
        raise WaitTimeoutError(key, self._timeout)

    def _leave(self, flight: _AsyncFlight, future: asyncio.Future[Any]) -> None:
        """A caller stopped waiting: with ``cancel_orphaned``, the last one cancels the loader."""
        if not future.cancelled():
            return
        flight.left += 1
        waiters = flight.waiters
        waiting = len(waiters) if isinstance(waiters, list) else 1
        first = waiters[0] if isinstance(waiters, list) else waiters
        if future is not first and flight.dups > flight.joiners_left:
            # A joiner left: its join time is not known here, so it is taken
            # as the average of those still waiting (wait_seconds is a sum).
            average = flight.joined_at / (flight.dups - flight.joiners_left)
            flight.joiners_left += 1
            flight.joined_at -= average
            flight.state.wait_seconds += perf_counter() - average
        task = flight.task
        if flight.left >= waiting and self._cancel_orphaned and not task.done():
            # Forget first: a caller arriving after this starts a new flight
            # instead of joining one that is being cancelled.
            remove(flight.state.table, flight.key, flight)
            if flight.state.slot_waiters:
                flight.state.free_slot()
            task.cancel()

    def stats(self) -> GroupStats:
        """The group's counters, summed over its event loops (see GroupStats)."""
        with self._states_lock:
            self._prune_closed()
            states = [*self._states.values(), self._retired]
        return GroupStats(
            calls=sum(s.flights + s.joins for s in states),
            flights=sum(s.flights for s in states),
            joins=sum(s.joins for s in states),
            shared=sum(s.shared for s in states),
            errors=sum(s.errors for s in states),
            aborted=sum(s.aborted for s in states),
            timeouts=sum(s.timeouts for s in states),
            rejected=sum(s.rejected for s in states),
            in_flight=sum(len(s.table) for s in states),
            wait_seconds=sum(s.wait_seconds for s in states),
        )

    def _state_here(self) -> _LoopState:
        loop = get_running_loop()
        current = self._current
        return current[1] if current[0]() is loop else self._state_of(loop)

    def _state_of(self, loop: AbstractEventLoop) -> _LoopState:
        """The state of ``loop`` (the slow path, taken when the loop changes)."""
        with self._states_lock:
            state = self._states.get(loop)
            if state is None:
                self._prune_closed()
                state = self._states[loop] = _LoopState(self.name, self._on_event)
                state.finalizer = weakref.finalize(loop, _retire, weakref.ref(self), state)
            self._current = (weakref.ref(loop), state)
        return state

    def _prune_closed(self) -> None:
        """Drop the states of closed loops (the states lock is held).

        A loop closed with flights still pending can never finish them, and its
        state would keep it alive: its flights hold tasks that hold the loop.
        Their counters go with them.
        """
        for loop in [loop for loop in self._states if loop.is_closed()]:
            state = self._states.pop(loop)
            if state.finalizer is not None and state.finalizer.detach() is not None:
                state.add_to(self._retired)
        current_loop = self._current[0]()
        if current_loop is not None and current_loop.is_closed():
            self._current = (_dead_ref, self._retired)

    def _states_of_caller(self) -> list[tuple[AbstractEventLoop | None, _LoopState]]:
        """The running loop's state, or every state when called outside a loop, each
        with its loop when that is not the running one (None when it is)."""
        try:
            loop = get_running_loop()
        except RuntimeError:
            with self._states_lock:
                self._prune_closed()
                return list(self._states.items())
        with self._states_lock:
            state = self._states.get(loop)
        return [] if state is None else [(None, state)]


def _free_slot(loop: AbstractEventLoop | None, state: _LoopState) -> None:
    """Wake a slot waiter of ``state``: here, or in ``loop``'s thread (futures are not
    thread-safe)."""
    if loop is None:
        state.free_slot()
        return
    try:
        loop.call_soon_threadsafe(state.free_slot)
    except RuntimeError:
        pass  # the loop closed: nobody waits in it any more


def _retire(group_ref: weakref.ref[AsyncGroup[Any, Any]], state: _LoopState) -> None:
    """A loop was collected: keep its counters in its group's totals."""
    group = group_ref()
    if group is not None:
        with group._states_lock:
            state.add_to(group._retired)


def _mark_retrieved(task: asyncio.Future[Any]) -> None:
    """A do_future() task its caller may drop: its error is no error to log."""
    if not task.cancelled():
        task.exception()


async def _deadline(awaitable: Awaitable[V], seconds: float, key: object) -> V:
    """Run a loader under ``loader_timeout``: past it, the flight fails with TimeoutError."""
    try:
        async with asyncio.timeout(seconds) as scope:
            return await awaitable
    except TimeoutError:
        if scope.expired():
            raise TimeoutError(
                f"the loader of key {key!r} ran past loader_timeout={seconds}s"
            ) from None
        raise


def _with_deadline(
    returned: object, fn: object, seconds: float, key: object
) -> Coroutine[Any, Any, Any]:
    if not isawaitable(returned):
        raise TypeError(
            f"AsyncGroup needs fn to be an async function or to return an awaitable; "
            f"{fn!r} returned {type(returned).__name__}"
        )
    return _deadline(returned, seconds, key)


def _bad_key(key: object) -> TypeError:
    return TypeError(f"singleflight keys must be hashable; got {type(key).__name__} {key!r}")


def _launch_failed(
    table: dict[Any, _AsyncFlight],
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
    if isinstance(exc, TypeError) and returned is not _NOTHING:
        if isawaitable(returned):
            return _new_task(_await(returned), loop=loop)
        exc = TypeError(
            f"AsyncGroup needs fn to be an async function or to return an awaitable; "
            f"{fn!r} returned {type(returned).__name__}"
        )
    if table.get(key) is _STARTING:
        del table[key]
    if returned is _NOTHING and isinstance(exc, Exception):
        failed: asyncio.Future[Any] = Future(loop=loop)
        failed.set_exception(exc)
        return failed
    raise exc
