"""The AnyIO driver: :class:`AnyIOGroup`, one group for asyncio and trio alike.

Same contract as :class:`~singleflight.AsyncGroup`: each flight's loader runs in
a task of its own, detached from every caller's cancel scope, and callers wait
on an :class:`anyio.Event` of the flight, which is cancel-safe, so one caller's
cancellation never reaches the loader or the other callers.  AnyIO cannot start
a detached task, so that one step switches on the backend: an asyncio task of
the running loop, or a trio *system* task.  The loader runs inside an
:class:`anyio.CancelScope` kept on the flight, which is how ``cancel_orphaned``
stops it on either backend.

State is kept per event loop (asyncio) or per ``trio.run`` (keyed by its root
task), so calls from different loops or runs never join each other.

Callers waiting for a slot under ``max_flights`` park on an :class:`anyio.Event`
of their run; :meth:`AnyIOGroup.do_future` hands back a :class:`FlightFuture`,
which needs no task group: it is resolved by the flight itself, or, when it
must wait for a slot, by a detached task started the same way as a loader.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import InvalidStateError
from inspect import isawaitable
from time import perf_counter
from types import TracebackType
from typing import Any, Generic, Literal, NoReturn, ParamSpec, TypeVar

try:
    # singleflight/anyio.py importing "anyio": imports are absolute, so this is
    # the third-party package, never this module.
    import anyio
    import anyio.lowlevel
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "singleflight.anyio needs AnyIO 4 or later: install pysingleflight[anyio]"
    ) from exc

from . import _flight
from ._flight import Flight, reentry_error, waiter_error
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

__all__ = ["AnyIOGroup", "FlightFuture"]

K = TypeVar("K")
V = TypeVar("V")
P = ParamSpec("P")

_TASK_NAME = "singleflight loader"
_FUTURE_TASK_NAME = "singleflight do_future"


class _Run:
    """The flights of one asyncio event loop or one ``trio.run``.

    It holds no reference to its loop or root task (it is the value of a weak
    dictionary keyed by them).  ``running`` keeps its asyncio tasks alive:
    the loop itself holds tasks only weakly.  Trio's system nursery holds its own.
    """

    __slots__ = ("running", "slot_waiters", "table", "trio")

    def __init__(self, trio: bool) -> None:
        self.table: dict[Any, _AnyIOFlight] = {}
        self.trio = trio
        self.running: set[asyncio.Task[None]] = set()
        # Callers waiting for a slot under max_flights (on_limit="wait"), oldest
        # first.  A caller that stops waiting takes its own event out.
        self.slot_waiters: list[anyio.Event] = []

    def current_task(self) -> object:
        if self.trio:
            import trio

            return trio.lowlevel.current_task()
        return asyncio.current_task()

    def spawn(self, name: str, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> object:
        """Start ``fn(*args)`` in a task detached from every caller's cancel scope.

        ``fn`` must never raise (a trio system task's error crashes the run).
        """
        if self.trio:
            import trio

            # System tasks start with an empty context; give them the caller's,
            # as asyncio's create_task does.
            return trio.lowlevel.spawn_system_task(
                fn, *args, name=name, context=contextvars.copy_context()
            )
        task = asyncio.get_running_loop().create_task(fn(*args), name=name)
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        return task

    def free_slot(self) -> None:
        """A flight left the table: let the first caller waiting for a slot look again."""
        if self.slot_waiters:
            self.slot_waiters.pop(0).set()

    def wake_slot_waiters(self) -> None:
        """A flight started: callers of its key waiting for a slot may join it now.

        The others look again and wait on; a spurious wake costs a retry, never a slot.
        """
        waiting, self.slot_waiters = self.slot_waiters, []
        for slot in waiting:
            slot.set()

    def drop_slot_waiter(self, slot: anyio.Event) -> None:
        """A caller stopped waiting for a slot; one it was handed in that step is passed on."""
        if slot.is_set():
            self.free_slot()
        else:
            self.slot_waiters.remove(slot)


class _AnyIOFlight(Flight):
    """A flight whose loader runs in a task of its own; its callers wait on ``event``.

    ``left`` counts callers that stopped waiting (for ``cancel_orphaned``).
    ``error`` is what every caller raises, ``tb`` its traceback as the loader
    left it: re-raising with it keeps a shared exception's traceback from growing.
    """

    __slots__ = (
        "error",
        "event",
        "futures",
        "key",
        "left",
        "run",
        "scope",
        "started",
        "task",
        "tb",
        "value",
    )

    def __init__(self, run: _Run, key: object) -> None:
        self.dups = 0
        # The do_future() callers, resolved when the flight settles.
        self.futures: list[FlightFuture[Any]] | None = None
        self.left = 0
        self.run = run
        self.key = key
        self.event = anyio.Event()
        self.scope = anyio.CancelScope()
        self.task: object = None
        self.value: Any = None
        self.error: Exception | None = None
        self.tb: TracebackType | None = None
        self.started = 0.0


def _dead_ref() -> None:
    return None


def _bad_key(key: object) -> TypeError:
    return TypeError(f"singleflight keys must be hashable; got {type(key).__name__} {key!r}")


def _cancelled_class(trio: bool) -> type[BaseException]:
    if trio:
        import trio as trio_module

        return trio_module.Cancelled
    return asyncio.CancelledError


def _run_token() -> tuple[object, bool]:
    """The running asyncio loop or trio run's root task, and whether it is trio."""
    loop = asyncio._get_running_loop()
    if loop is not None:
        return loop, False
    trio_module = sys.modules.get("trio")
    if trio_module is not None:
        try:
            root = trio_module.lowlevel.current_root_task()
        except RuntimeError:
            root = None
        if root is not None:
            return root, True
    raise RuntimeError(
        "AnyIOGroup must be used from a running asyncio event loop or trio.run "
        "(directly or through anyio.run)"
    )


class _NoSlot(Exception):
    """Internal: ``max_flights`` is reached and the caller is to wait for a slot."""


_PENDING, _DONE, _CANCELLED = 0, 1, 2


class FlightFuture(Generic[V]):
    """One :meth:`AnyIOGroup.do_future` caller's handle on its flight's outcome.

    Works alike on asyncio and trio.  ``await future`` (or ``await
    future.wait()``) returns the loader's value, or raises the loader's
    :class:`Exception` (the object every caller gets, with the loader's
    traceback), :class:`AbortedError`, or, for a future that had to wait for a
    slot under ``max_flights``, :class:`~singleflight.WaitTimeoutError`.  Any number
    of tasks may await it, as often as they like.

    Cancellation: :meth:`cancel` makes this caller leave; the flight goes on
    for its other callers (with ``cancel_orphaned=True`` it is cancelled once
    every caller has left).  As with an asyncio future, an awaiter cancelled
    while it awaits (its cancel scope, ``move_on_after``) cancels the future;
    awaiting a cancelled future raises :class:`concurrent.futures.CancelledError`,
    an :class:`Exception`: the backend's own cancellation belongs to its scopes.

    Use it from the event loop or trio run that made it (it is not thread-safe).
    """

    __slots__ = (
        "__weakref__",
        "_error",
        "_event",
        "_flight",
        "_group",
        "_joined",
        "_scope",
        "_state",
        "_tb",
        "_value",
    )

    def __init__(self, group: AnyIOGroup[Any, Any]) -> None:
        self._group = group
        self._state = _PENDING
        self._event = anyio.Event()
        # The flight it joined or leads; None while it waits for a slot, in a
        # task of its own run in ``_scope``.
        self._flight: _AnyIOFlight | None = None
        self._scope: anyio.CancelScope | None = None
        # When it joined a flight, for wait_seconds; None for a leader.
        self._joined: float | None = None
        self._value: Any = None
        self._error: Exception | None = None
        self._tb: TracebackType | None = None

    def done(self) -> bool:
        """Whether the outcome is in or the future was cancelled."""
        return self._state != _PENDING

    def cancelled(self) -> bool:
        """Whether :meth:`cancel` (or a cancelled awaiter) cancelled the future."""
        return self._state == _CANCELLED

    def cancel(self) -> bool:
        """Make this caller leave its flight, or its wait for a slot (nothing is started then).

        Returns False, doing nothing, if the future is already done or
        cancelled.  Its awaiters wake and raise
        :class:`concurrent.futures.CancelledError`; the flight's other callers
        are not affected.
        """
        if self._state != _PENDING:
            return False
        self._state = _CANCELLED
        self._event.set()
        flight, self._flight = self._flight, None
        if flight is not None:
            if flight.futures is not None:
                flight.futures.remove(self)
            self._group._future_left(flight, self._joined)
        elif self._scope is not None:
            self._scope.cancel()  # its task leaves the queue or the flight itself
        return True

    def result(self) -> V:
        """The value, or raise the flight's error as :meth:`exception` tells it.

        Raises :class:`concurrent.futures.CancelledError` if cancelled and
        :class:`concurrent.futures.InvalidStateError` if not done yet.
        """
        error = self.exception()
        if error is not None:
            raise error.with_traceback(self._tb)
        return self._value  # type: ignore[no-any-return]

    def exception(self) -> Exception | None:
        """The flight's error, or None if it has a value; raises as :meth:`result` does."""
        if self._state == _CANCELLED:
            raise FutureCancelled("the do_future() caller was cancelled")
        if self._state == _PENDING:
            raise InvalidStateError("the flight's outcome is not in yet: await the future first")
        return self._error

    async def wait(self) -> V:
        """Wait for the outcome and return it as :meth:`result` does.

        Cancelling the awaiter raises the backend's cancellation in it and
        cancels the future (this caller leaves its flight).
        """
        if self._state == _PENDING:
            try:
                await self._event.wait()
            finally:
                if self._state == _PENDING:
                    self.cancel()
        return self.result()

    def __await__(self) -> Generator[Any, None, V]:
        return self.wait().__await__()

    def __repr__(self) -> str:
        state = ("pending", "done", "cancelled")[self._state]
        return f"<{type(self).__name__} {state}>"

    def _resolve(self, value: Any, error: Exception | None, tb: TracebackType | None) -> None:
        if self._state != _PENDING:
            return  # cancelled: the outcome is not this caller's any more
        self._state = _DONE
        self._flight = None
        self._value, self._error, self._tb = value, error, tb
        self._event.set()


class AnyIOGroup(Generic[K, V]):
    """Coalesces concurrent calls that share a key into one execution, on asyncio or trio.

    ``fn`` is an async function (or any callable returning an awaitable of the
    running backend); it is called as ``fn(*args, **kwargs)`` in a task of its
    own, never in a caller's task or cancel scope.  Options:

    * ``cancel_orphaned``: with ``False`` (the default, as in Go) a loader runs
      on when every caller has left; with ``True`` it is cancelled once its last
      caller has left.
    * ``name``: labels the group's events.
    * ``on_event``: a callable given each :mod:`singleflight.events` event, in
      the task where it happens (the final event in the loader's task).
    * ``max_flights``, ``on_limit``: at most this many keys in flight per event
      loop or trio run; a call for a new key beyond it raises
      :class:`~singleflight.TooManyFlightsError` (``"raise"``) or waits for a flight
      to end (``"wait"``).  Joins are never refused.
    * ``timeout``: seconds a caller waits at most, for a slot and for the
      outcome together; then it alone raises :class:`~singleflight.WaitTimeoutError`
      (per call, ``anyio.fail_after()`` around the await does the same).
    * ``loader_timeout``: seconds a loader may run; then it is cancelled and
      the flight fails for everyone with ``TimeoutError``.

    Calls are grouped per asyncio event loop or ``trio.run``: calls from
    different loops or runs never join each other.  A group is not a cache: a
    flight's entry is removed before any caller sees its outcome.
    """

    __slots__ = (
        "__weakref__",
        "_aborted",
        "_cancel_orphaned",
        "_current",
        "_errors",
        "_flights",
        "_joins",
        "_loader_timeout",
        "_lock",
        "_max_flights",
        "_on_event",
        "_on_limit",
        "_rejected",
        "_runs",
        "_shared",
        "_timeout",
        "_timeouts",
        "_wait_seconds",
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
        # Guards the runs and the counters: a group may be shared by loops in
        # several threads.  Each run's table is only touched by its own thread.
        self._lock = threading.Lock()
        self._runs: weakref.WeakKeyDictionary[Any, _Run] = weakref.WeakKeyDictionary()
        # The last run used, read as one tuple so that threads running different
        # loops never pair one loop with another's table.
        self._current: tuple[Callable[[], object], _Run] = (_dead_ref, _Run(False))
        self._flights = self._joins = self._shared = self._errors = self._aborted = 0
        self._timeouts = self._rejected = 0
        self._wait_seconds = 0.0

    async def do(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> V:
        """Run ``fn(*args, **kwargs)`` as the flight of ``key``, or join the one in flight.

        Returns the loader's value; every caller of one flight gets the same object.

        Errors: the loader's :class:`Exception` is raised in every caller (the
        same object, with the loader's traceback); so is a ``TypeError`` when
        ``fn`` returned something that is not awaitable, and the
        ``TimeoutError`` of a loader stopped by ``loader_timeout``.  A loader
        that ends cancelled (by ``cancel_orphaned``, by the end of the
        ``asyncio.run`` or ``trio.run``, or by anything else) or by another
        ``BaseException`` gives its callers :class:`AbortedError`, never a
        cancellation they did not ask for.  ``TypeError`` for an unhashable key
        or a non-callable ``fn``, ``RuntimeError`` when the loader calls ``do``
        on its own key, and :class:`~singleflight.TooManyFlightsError` for a new key
        when ``max_flights`` flights are open (``on_limit="raise"``) are raised
        before anything runs.  With ``timeout``, a caller still waiting (for a
        slot or for the outcome) at its deadline alone raises
        :class:`~singleflight.WaitTimeoutError`; the flight goes on for the others.

        Cancellation: cancelling a caller (its cancel scope, ``move_on_after``,
        ``fail_after``, ``task.cancel()``) makes that caller alone raise the
        backend's cancellation exception; the flight and its other callers go
        on, and a caller waiting for a slot leaves the queue (a slot it was just
        handed goes to the next caller).  When the last caller of a flight has
        left (cancelled or timed out), the loader is cancelled if the group was
        made with ``cancel_orphaned=True`` and runs on otherwise.
        """
        deadline = None if self._timeout is None else self._deadline()
        if self._max_flights is None:
            flight = self._enter(key, fn, args, kwargs)
        else:
            flight = await self._admit(key, fn, args, kwargs, deadline)
        del args, kwargs  # the loader has them; a parked caller need not keep them
        if not flight.event.is_set():
            await self._wait(flight, flight.dups > 0, deadline)
        error = flight.error
        if error is not None:
            raise error.with_traceback(flight.tb)
        return flight.value  # type: ignore[no-any-return]

    async def do_result(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Result[V]:
        """Like :meth:`do`, but returns a :class:`Result` instead of raising the loader's error.

        ``Result.error`` holds the loader's :class:`Exception` (a
        ``loader_timeout`` ``TimeoutError`` included) or an
        :class:`AbortedError`; ``Result.shared`` is true when the flight had two
        or more callers.  This caller's own :class:`~singleflight.WaitTimeoutError`
        and cancellation are raised, not returned, with the same effect on the
        flight as for :meth:`do`; so are ``TypeError``, ``RuntimeError`` and
        :class:`~singleflight.TooManyFlightsError`, as by :meth:`do`.
        """
        deadline = None if self._timeout is None else self._deadline()
        if self._max_flights is None:
            flight = self._enter(key, fn, args, kwargs)
        else:
            flight = await self._admit(key, fn, args, kwargs, deadline)
        del args, kwargs
        if not flight.event.is_set():
            await self._wait(flight, flight.dups > 0, deadline)
        return Result(flight.value, flight.error, flight.dups > 0)

    def do_future(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> FlightFuture[V]:
        """Start or join the flight of ``key`` and return at once with a :class:`FlightFuture`.

        Go's ``DoChan``; call it from a task of the running loop or trio run.
        No task group is needed: the future is resolved by the flight, and one
        that must wait for a slot (``max_flights`` reached, ``on_limit="wait"``)
        waits in a task of its own, as a loader runs.  Each caller gets its own
        future: cancelling it affects nobody else (with
        ``cancel_orphaned=True`` the loader is cancelled once every caller has
        left); cancelled while it waits for a slot, it starts nothing.

        The future holds the value, the loader's :class:`Exception`, or
        :class:`AbortedError`.  ``timeout`` does not bound it, except while it
        waits for a slot: then its deadline covers that wait and the outcome,
        as for :meth:`do`, and passing it puts
        :class:`~singleflight.WaitTimeoutError` in the future.  If the run ends while
        such a future waits, it holds :class:`AbortedError`.  ``TypeError``,
        ``RuntimeError`` and :class:`~singleflight.TooManyFlightsError`
        (``on_limit="raise"``) are raised here, as by :meth:`do`.
        """
        future: FlightFuture[V]
        try:
            flight = self._enter(key, fn, args, kwargs)
        except _NoSlot:
            future = FlightFuture(self)
            scope = future._scope = anyio.CancelScope()
            deadline = None if self._timeout is None else self._deadline()
            run = self._run()
            run.spawn(
                _FUTURE_TASK_NAME,
                self._call_for,
                run,
                future,
                scope,
                key,
                fn,
                args,
                kwargs,
                deadline,
            )
            return future
        future = FlightFuture(self)
        if flight.event.is_set():  # an eager task factory ran the loader to its end
            future._resolve(flight.value, flight.error, flight.tb)
            return future
        future._flight = flight
        if flight.dups:
            future._joined = perf_counter()
        if flight.futures is None:
            flight.futures = [future]
        else:
            flight.futures.append(future)
        return future

    def forget(self, key: K) -> None:
        """Let the next call of ``key`` start a new flight.

        The flight in progress is not cancelled; its callers still get its
        outcome, and when it ends it does not remove the newer flight.  Its slot
        under ``max_flights`` is free at once.  Acts on the running loop's (or
        trio run's) flights; outside any, on every one's (a caller there waiting
        for a slot then gets it when the forgotten flight ends).
        """
        runs, inside = self._runs_of_caller()
        for run in runs:
            before = len(run.table)
            _flight.forget(run.table, key)
            if inside and len(run.table) < before:
                run.free_slot()

    def forget_unshared(self, key: K) -> bool:
        """Forget ``key`` only if nobody joined its flight.

        Returns True if forgotten or not in flight, False if the flight is shared
        (it is then left alone).  Acts on the running loop's or run's flights
        (outside any, on every one's), freeing slots as :meth:`forget` does.
        """
        forgotten = True
        runs, inside = self._runs_of_caller()
        for run in runs:
            before = len(run.table)
            forgotten = _flight.forget_unshared(run.table, key) and forgotten
            if inside and len(run.table) < before:
                run.free_slot()
        return forgotten

    def stats(self) -> GroupStats:
        """The group's counters (see :class:`singleflight.stats.GroupStats`).

        ``timeouts`` counts callers that left at their ``timeout`` (not loaders
        stopped by ``loader_timeout``: those are ``errors``); ``rejected``
        counts calls refused by ``max_flights``.
        """
        in_flight = len(self)
        with self._lock:
            return GroupStats(
                calls=self._flights + self._joins,
                flights=self._flights,
                joins=self._joins,
                shared=self._shared,
                errors=self._errors,
                aborted=self._aborted,
                timeouts=self._timeouts,
                rejected=self._rejected,
                in_flight=in_flight,
                wait_seconds=self._wait_seconds,
            )

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is in flight in the running loop or run (outside any: in any)."""
        return any(key in run.table for run in self._runs_of_caller()[0])

    def __len__(self) -> int:
        """The number of keys in flight, over every loop and run still alive."""
        with self._lock:
            self._prune_closed()
            return sum(len(run.table) for run in self._runs.values())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} in_flight={len(self)}>"

    # -- the mechanism -------------------------------------------------------------

    def _run(self) -> _Run:
        token, is_trio = _run_token()
        current = self._current
        if current[0]() is token:
            return current[1]
        with self._lock:
            run = self._runs.get(token)
            if run is None:
                self._prune_closed()
                run = self._runs[token] = _Run(is_trio)
            self._current = (weakref.ref(token), run)
        return run

    def _deadline(self) -> float:
        """This caller's deadline on the backend's clock (``timeout`` is set)."""
        self._run()  # outside any loop or run: the error that says so
        return anyio.current_time() + (self._timeout or 0.0)

    def _enter(
        self,
        key: K,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> _AnyIOFlight:
        """Lead or join the flight of ``key``; a leader's loader task is started here.

        Raises TooManyFlightsError (or, internally, _NoSlot) for a new key when
        ``max_flights`` flights are open.
        """
        run = self._run()
        table = run.table
        try:
            flight = table.get(key)
        except TypeError:
            raise _bad_key(key) from None
        if not callable(fn):
            raise TypeError(f"fn must be an async function; got {type(fn).__name__} {fn!r}")
        hook = self._on_event
        if flight is not None:
            if flight.task is not None and flight.task is run.current_task():
                raise reentry_error(key)
            flight.dups += 1
            with self._lock:
                self._joins += 1
                if flight.dups == 1:
                    self._shared += 1
            if hook is not None:
                emit(hook, Joined(self.name, key, id(flight)))
            return flight
        limit = self._max_flights
        if limit is not None:
            if len(table) >= limit:
                if self._on_limit == "wait":
                    raise _NoSlot
                with self._lock:
                    self._rejected += 1
                if hook is not None:
                    emit(hook, Rejected(self.name, key, len(table)))
                raise TooManyFlightsError(key, limit)
            if run.slot_waiters:
                # Callers of this key waiting for a slot can join it now.
                run.wake_slot_waiters()
        flight = table[key] = _AnyIOFlight(run, key)
        with self._lock:
            self._flights += 1
        if hook is not None:
            flight.started = perf_counter()
            emit(hook, FlightStarted(self.name, key, id(flight)))
        try:
            task = run.spawn(_TASK_NAME, self._fly, flight, fn, args, kwargs)
        except BaseException as exc:
            # The loop or run is shutting down.  Nobody can have joined yet.
            self._settle(flight, exc)
            raise
        # An eager task factory may have run the loader already; it set this too.
        flight.task = task
        return flight

    async def _admit(
        self,
        key: K,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float | None,
    ) -> _AnyIOFlight:
        """_enter(), waiting for a slot while ``max_flights`` is reached (``on_limit="wait"``).

        Raises WaitTimeoutError if no slot frees by ``deadline``.  A caller that is
        cancelled, or times out, leaves the queue; a slot it was handed in that
        same step goes to the next caller.
        """
        while True:
            try:
                return self._enter(key, fn, args, kwargs)
            except _NoSlot:
                pass
            run = self._run()
            slot = anyio.Event()
            run.slot_waiters.append(slot)
            until = math.inf if deadline is None else deadline
            try:
                with anyio.CancelScope(deadline=until) as scope:
                    await slot.wait()
                    # Woken and cancelled in one step, the task would still run
                    # on to start a flight: it leaves here, passing the slot on.
                    await anyio.lowlevel.checkpoint_if_cancelled()
            except BaseException:
                run.drop_slot_waiter(slot)
                raise
            if scope.cancelled_caught:
                run.drop_slot_waiter(slot)
                self._timed_out(key, deadline)

    async def _wait(self, flight: _AnyIOFlight, joiner: bool, deadline: float | None) -> None:
        """Wait for the outcome until ``deadline``; a caller leaving may abandon the loader.

        ``joiner`` (``dups > 0`` right after entering: only a joiner sees that)
        says whether the wait counts in ``wait_seconds``.  Raises WaitTimeoutError
        at the deadline, unless the outcome came in the same step.
        """
        joined = perf_counter()
        try:
            if deadline is None:
                await flight.event.wait()
            else:
                with anyio.CancelScope(deadline=deadline):
                    await flight.event.wait()
        finally:
            if joiner:
                with self._lock:
                    self._wait_seconds += perf_counter() - joined
            if not flight.event.is_set():
                self._leave(flight)
        if not flight.event.is_set():
            self._timed_out(flight.key, deadline)

    def _timed_out(self, key: object, deadline: float | None) -> NoReturn:
        timeout = self._timeout or 0.0
        with self._lock:
            self._timeouts += 1
        if self._on_event is not None:
            waited = anyio.current_time() - ((deadline or 0.0) - timeout)
            emit(self._on_event, TimedOut(self.name, key, waited))
        raise WaitTimeoutError(key, self._timeout)

    def _leave(self, flight: _AnyIOFlight) -> None:
        """A caller stopped waiting: with ``cancel_orphaned``, the last one cancels the loader."""
        flight.left += 1
        if self._cancel_orphaned and flight.left > flight.dups:
            # Forget first: a caller arriving after this starts a new flight
            # instead of joining one that is being cancelled.
            run = flight.run
            if run.table.get(flight.key) is flight:
                del run.table[flight.key]
                run.free_slot()
            flight.scope.cancel()

    def _future_left(self, flight: _AnyIOFlight, joined: float | None) -> None:
        """A do_future() caller's future was cancelled before its flight ended."""
        if joined is not None:
            with self._lock:
                self._wait_seconds += perf_counter() - joined
        self._leave(flight)

    async def _call_for(
        self,
        run: _Run,
        future: FlightFuture[Any],
        scope: anyio.CancelScope,
        key: K,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float | None,
    ) -> None:
        """The task of a do_future() caller waiting for a slot: do()'s work, into ``future``.

        ``future.cancel()`` cancels ``scope``: the caller leaves the queue or its
        flight.  It never raises (see :meth:`_fly`); being stopped otherwise (the
        run ends) puts an AbortedError in the future.
        """
        if scope.cancel_called:
            return  # cancelled before this task first ran: it must not start a flight
        try:
            with scope:
                flight = await self._admit(key, fn, args, kwargs, deadline)
                del args, kwargs
                if not flight.event.is_set():
                    await self._wait(flight, flight.dups > 0, deadline)
                future._resolve(flight.value, flight.error, flight.tb)
        except Exception as exc:
            future._resolve(None, exc, exc.__traceback__)
        except BaseException as exc:
            error = AbortedError(key, f"its do_future() task was stopped by {type(exc).__name__}")
            error.__cause__ = exc
            future._resolve(None, error, None)
            if not run.trio and isinstance(exc, KeyboardInterrupt | SystemExit):
                raise

    async def _fly(
        self,
        flight: _AnyIOFlight,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """The loader task: run ``fn``, then settle the flight.  It never raises.

        A trio system task must not (an error there crashes the whole run), and
        an asyncio loader task's error would be logged as never retrieved.  Only
        ``KeyboardInterrupt`` and ``SystemExit`` are re-raised on asyncio, where
        they stop the loop as in any asyncio task; trio does not allow that.
        Past ``loader_timeout`` the loader is cancelled and the flight's outcome
        is a ``TimeoutError`` saying so.
        """
        flight.task = flight.run.current_task()
        outcome: BaseException | None = None
        try:
            with flight.scope:
                if flight.scope.cancel_called:
                    # Every caller left before the loader started: do not start it.
                    outcome = AbortedError(flight.key, "every caller left before it started")
                else:
                    returned = fn(*args, **kwargs)
                    del args, kwargs
                    if not isawaitable(returned):
                        raise TypeError(
                            f"AnyIOGroup needs fn to be an async function or to return an "
                            f"awaitable; {fn!r} returned {type(returned).__name__}"
                        )
                    seconds = self._loader_timeout
                    if seconds is None:
                        flight.value = await returned
                    else:
                        with anyio.move_on_after(seconds) as limit:
                            flight.value = await returned
                        if limit.cancelled_caught:
                            raise TimeoutError(
                                f"the loader of key {flight.key!r} ran past "
                                f"loader_timeout={seconds}s"
                            )
            if outcome is None and flight.scope.cancelled_caught:
                outcome = AbortedError(flight.key, "every caller left (cancel_orphaned=True)")
        except BaseException as exc:
            outcome = exc
        self._settle(flight, outcome)
        if not flight.run.trio and isinstance(outcome, KeyboardInterrupt | SystemExit):
            raise outcome

    def _settle(self, flight: _AnyIOFlight, exc: BaseException | None) -> None:
        """End the flight: remove its entry, then wake every caller with its outcome."""
        key = flight.key
        run = flight.run
        if run.table.get(key) is flight:
            del run.table[key]
            run.free_slot()
        elif run.slot_waiters:
            # Forgotten, maybe from outside the run, which could not wake anyone:
            # a slot waiter looks again now (a spurious wake costs only a retry).
            run.free_slot()
        error: Exception | None = None
        if exc is not None:
            flight.value = None
            if isinstance(exc, _cancelled_class(run.trio)):
                error = AbortedError(key, "its loader task was cancelled")
                error.__cause__ = exc
            else:
                error = waiter_error(key, exc)
            flight.error = error
            flight.tb = error.__traceback__
        aborted = isinstance(error, AbortedError)
        futures, flight.futures = flight.futures, None
        now = perf_counter()
        with self._lock:
            if aborted:
                self._aborted += 1
            elif error is not None:
                self._errors += 1
            if futures:
                self._wait_seconds += sum(now - f._joined for f in futures if f._joined is not None)
        flight.event.set()
        if futures:
            for future in futures:
                future._resolve(flight.value, error, flight.tb)
        hook = self._on_event
        if hook is not None:
            duration = now - flight.started
            callers = flight.dups + 1
            fid = id(flight)
            if error is None:
                emit(hook, FlightFinished(self.name, key, fid, duration, callers))
            elif aborted:
                cause = exc if error is not exc else None
                emit(hook, FlightAborted(self.name, key, fid, duration, callers, cause))
            else:
                emit(hook, FlightFailed(self.name, key, fid, duration, callers, error))

    def _prune_closed(self) -> None:
        """Drop the runs of closed asyncio loops (the lock is held).

        A loop closed with flights pending can never finish them, and their
        tasks would keep the loop, the weak key of its run, alive.
        """
        closed = [
            loop
            for loop in self._runs
            if isinstance(loop, asyncio.AbstractEventLoop) and loop.is_closed()
        ]
        for loop in closed:
            del self._runs[loop]

    def _runs_of_caller(self) -> tuple[list[_Run], bool]:
        """The running loop's or run's state, or every one outside any; and whether inside."""
        try:
            token, _ = _run_token()
        except RuntimeError:
            with self._lock:
                self._prune_closed()
                return list(self._runs.values()), False
        with self._lock:
            run = self._runs.get(token)
        return ([] if run is None else [run]), True
