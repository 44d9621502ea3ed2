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
from collections.abc import Awaitable, Callable, Coroutine, Generator
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import InvalidStateError
from functools import partial
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

from ._flight import (
    Failure,
    Flight,
    Full,
    Table,
    check_flag,
    check_fn,
    check_options,
    check_seconds,
    cycle_error,
    loader_timed_out,
    not_awaitable,
)
from ._flight import stats as _stats
from ._loops import LoopState, Registry, asyncio_call_soon, wake_in_loop
from ._result import Result
from .errors import AbortedError, WaitTimeoutError
from .events import Event, EventHook, emit
from .stats import GroupStats

__all__ = ["AnyIOGroup", "FlightFuture"]

K = TypeVar("K")
V = TypeVar("V")
P = ParamSpec("P")

_TASK_NAME = "singleflight loader"
_FUTURE_TASK_NAME = "singleflight do_future"


class _Run(LoopState):
    """The flights of one asyncio event loop or one ``trio.run``.

    It holds no reference to its loop or root task (it is the value of a weak
    dictionary keyed by them).  ``running`` keeps its asyncio tasks alive:
    the loop itself holds tasks only weakly.  Trio's system nursery holds its own.
    """

    __slots__ = ("running", "slot_waiters", "trio")

    def __init__(self, table: Table[_AnyIOFlight], token: object, trio: bool) -> None:
        if trio:
            import trio as trio_module

            super().__init__(table, trio_module.lowlevel.current_trio_token().run_sync_soon)
        else:
            super().__init__(table, asyncio_call_soon(token))
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

    ``failure`` is how it failed (None for a value): the caller that started it
    raises the loader's exception, every other caller an equal copy of its own.
    """

    __slots__ = (
        "event",
        "failure",
        "futures",
        "run",
        "scope",
        "started",
        "task",
        "value",
    )

    def __init__(self, run: _Run, key: object) -> None:
        self.dups = 0
        # The do_future() callers, resolved when the flight settles.
        self.futures: list[FlightFuture[Any]] | None = None
        self.run = run
        self.key = key
        self.event = anyio.Event()
        self.scope = anyio.CancelScope()
        self.task: object = None
        self.awaits = None
        self.value: Any = None
        self.failure: Failure | None = None

    def error_for(self, joined: float | None) -> Exception | None:
        """What a caller raises: the loader's exception for the caller that started
        the flight (``joined`` None), an equal copy for any other; None for a value."""
        failure = self.failure
        if failure is None:
            return None
        return failure.own() if joined is None else failure.copy()


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


_PENDING, _DONE, _CANCELLED = 0, 1, 2


class FlightFuture(Generic[V]):
    """One :meth:`AnyIOGroup.do_future` caller's handle on its flight's outcome.

    Works alike on asyncio and trio.  ``await future`` (or ``await
    future.wait()``) returns the loader's value, or raises the loader's
    :class:`Exception` (with the loader's traceback; the future of the call
    that started the flight holds the exception itself, any other an equal
    copy of its own), :class:`AbortedError`, or, for a future that had to wait for a
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

    def _resolve(self, value: Any, error: Exception | None) -> None:
        if self._state != _PENDING:
            return  # cancelled: the outcome is not this caller's any more
        self._state = _DONE
        self._flight = None
        self._value, self._error = value, error
        self._tb = None if error is None else error.__traceback__
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
        "_cancel_orphaned",
        "_limited",
        "_loader_timeout",
        "_loops",
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
        self._limited = max_flights is not None
        self._timeout = timeout
        self._loader_timeout = loader_timeout
        make_table = partial(Table, name, on_event, max_flights, on_limit)
        self._loops: Registry[_Run] = Registry(
            lambda token: _Run(
                make_table(), token, not isinstance(token, asyncio.AbstractEventLoop)
            ),
            make_table(),
        )

    async def do(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> V:
        """Run ``fn(*args, **kwargs)`` as the flight of ``key``, or join the one in flight.

        Returns the loader's value; every caller of one flight gets the same object.

        Errors: the loader's :class:`Exception` is raised in every caller, with
        the loader's traceback: in the first caller the exception itself, in
        every other an equal copy of its own (see the README); so is a ``TypeError`` when
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
        if self._limited:
            flight, joined = await self._admit(key, fn, args, kwargs, deadline)
        else:
            flight, joined = self._enter(key, fn, args, kwargs)
        del args, kwargs  # the loader has them; a parked caller need not keep them
        if not flight.event.is_set():
            await self._wait(flight, joined, deadline)
        else:
            self._stop_awaiting(flight)
        error = flight.error_for(joined)
        if error is not None:
            raise error
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
        if self._limited:
            flight, joined = await self._admit(key, fn, args, kwargs, deadline)
        else:
            flight, joined = self._enter(key, fn, args, kwargs)
        del args, kwargs
        if not flight.event.is_set():
            await self._wait(flight, joined, deadline)
        else:
            self._stop_awaiting(flight)
        return Result(flight.value, flight.error_for(joined), flight.dups > 0)

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
            flight, joined = self._enter(key, fn, args, kwargs, waits=False)
        except Full:  # on_limit="wait" (a refusal is raised by _enter)
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
            future._resolve(flight.value, flight.error_for(joined))
            return future
        future._flight = flight
        future._joined = joined
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
        for here, run in self._runs_of_caller():
            if run.table.forget(key):
                wake_in_loop(run, here, run.free_slot)

    def forget_unshared(self, key: K) -> bool:
        """Forget ``key`` only if nobody joined its flight.

        Returns True if forgotten or not in flight, False if the flight is shared
        (it is then left alone).  Acts on the running loop's or run's flights
        (outside any, on every one's), freeing slots as :meth:`forget` does.
        """
        forgotten = True
        for here, run in self._runs_of_caller():
            gone, dropped = run.table.forget_unshared(key)
            forgotten = gone and forgotten
            if dropped:
                wake_in_loop(run, here, run.free_slot)
        return forgotten

    def stats(self) -> GroupStats:
        """The group's counters (see :class:`singleflight.stats.GroupStats`).

        ``timeouts`` counts callers that left at their ``timeout`` (not loaders
        stopped by ``loader_timeout``: those are ``errors``); ``rejected``
        counts calls refused by ``max_flights``.
        """
        return _stats(self._loops.tables())

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is in flight in the running loop or run (outside any: in any)."""
        return any(key in run.table.calls for _, run in self._runs_of_caller())

    def __len__(self) -> int:
        """The number of keys in flight, over every loop and run still alive."""
        return sum(len(run.table.calls) for run in self._loops.all())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} in_flight={len(self)}>"

    # -- the mechanism -------------------------------------------------------------

    def _run(self) -> _Run:
        token, _ = _run_token()
        current = self._loops.current
        run = current[1] if current[0]() is token else self._loops.state_of(token)
        assert run is not None
        return run

    def _parked(self) -> int:
        """Callers of the running loop or run waiting for a slot (white-box, for tests)."""
        return len(self._run().slot_waiters)

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
        waits: bool = True,
    ) -> tuple[_AnyIOFlight, float | None]:
        """Lead or join the flight of ``key``; a leader's loader task is started here.

        Returns the flight and this caller's join time (None for the leader).
        Raises TooManyFlightsError for a new key when ``max_flights`` flights are
        open (``on_limit="raise"``), or, internally, Full (``"wait"``), and
        ReentryError when this caller is a loader whose flight the flight of
        ``key`` waits on.  A loader that ``waits`` on the flight (do(), not
        do_future()) is recorded as waiting on it until :meth:`_stop_awaiting`.
        """
        check_fn(fn)
        run = self._run()
        table = run.table
        try:
            flight = table.enter(key)
        except Full as full:
            if full.wait:
                raise
            if full.event is not None:
                emit(table.hook, full.event)  # type: ignore[arg-type]
            assert full.error is not None
            raise full.error from None
        told: Event | None
        # The flight whose loader this task runs, if any.
        own = table.loaders.get(run.current_task()) if table.loaders else None
        if flight is not None:
            if own is not None:
                error = cycle_error(flight, own)
                if error is not None:
                    raise error
                if waits:
                    own.awaits = flight
            joined = perf_counter()
            told = table.join(flight, joined)
            if told is not None:
                emit(table.hook, told)  # type: ignore[arg-type]
            return flight, joined
        if run.slot_waiters:
            # Callers of this key waiting for a slot can join it now.
            run.wake_slot_waiters()
        flight = _AnyIOFlight(run, key)
        told = table.lead(flight)
        try:
            if told is not None:
                emit(table.hook, told)  # type: ignore[arg-type]
            if own is not None and waits:
                own.awaits = flight  # before the loader runs: it may close a cycle
            task = run.spawn(_TASK_NAME, self._fly, flight, fn, args, kwargs)
        except BaseException as exc:
            # A hook raised, or the loop or run is shutting down.
            if own is not None and own.awaits is flight:
                own.awaits = None
            self._settle(flight, exc)
            raise
        # An eager task factory may have run the loader already; it set this too.
        flight.task = task
        return flight, None

    def _stop_awaiting(self, flight: _AnyIOFlight) -> None:
        """This caller's wait on ``flight`` is over: if it is a loader, it waits no more."""
        table = flight.run.table
        if table.loaders:
            own = table.loaders.get(flight.run.current_task())
            if own is not None and own.awaits is flight:
                own.awaits = None

    async def _admit(
        self,
        key: K,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float | None,
    ) -> tuple[_AnyIOFlight, float | None]:
        """_enter(), waiting for a slot while ``max_flights`` is reached (``on_limit="wait"``).

        Raises WaitTimeoutError if no slot frees by ``deadline``.  A caller that is
        cancelled, or times out, leaves the queue; a slot it was handed in that
        same step goes to the next caller.
        """
        while True:
            try:
                return self._enter(key, fn, args, kwargs)
            except Full:
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

    async def _wait(
        self, flight: _AnyIOFlight, joined: float | None, deadline: float | None
    ) -> None:
        """Wait for the outcome until ``deadline``; a caller leaving may abandon the loader.

        ``joined`` is this caller's join time (None for the leader).  Raises
        WaitTimeoutError at the deadline, unless the outcome came in the same step.
        """
        try:
            if deadline is None:
                await flight.event.wait()
            else:
                with anyio.CancelScope(deadline=deadline):
                    await flight.event.wait()
        finally:
            self._stop_awaiting(flight)
            if not flight.event.is_set():
                self._leave(flight, joined)
        if not flight.event.is_set():
            self._timed_out(flight.key, deadline)

    def _timed_out(self, key: object, deadline: float | None) -> NoReturn:
        table = self._run().table
        waited = anyio.current_time() - ((deadline or 0.0) - (self._timeout or 0.0))
        told = table.timed_out(key, waited)
        if told is not None:
            emit(table.hook, told)  # type: ignore[arg-type]
        raise WaitTimeoutError(key, self._timeout)

    def _leave(self, flight: _AnyIOFlight, joined: float | None) -> None:
        """A caller stopped waiting: with ``cancel_orphaned``, the last one cancels the loader."""
        run = flight.run
        if run.table.leave(flight, joined, self._cancel_orphaned):
            run.free_slot()
            flight.scope.cancel()

    def _future_left(self, flight: _AnyIOFlight, joined: float | None) -> None:
        """A do_future() caller's future was cancelled before its flight ended."""
        self._leave(flight, joined)

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
                flight, joined = await self._admit(key, fn, args, kwargs, deadline)
                del args, kwargs
                if not flight.event.is_set():
                    await self._wait(flight, joined, deadline)
                future._resolve(flight.value, flight.error_for(joined))
        except Exception as exc:
            future._resolve(None, exc)
        except BaseException as exc:
            error = AbortedError(key, f"its do_future() task was stopped by {type(exc).__name__}")
            error.__cause__ = exc
            future._resolve(None, error)
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
        flight.run.table.loaders[flight.task] = flight
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
                        raise not_awaitable("AnyIOGroup", fn, returned)
                    seconds = self._loader_timeout
                    if seconds is None:
                        flight.value = await returned
                    else:
                        with anyio.move_on_after(seconds) as limit:
                            flight.value = await returned
                        if limit.cancelled_caught:
                            raise loader_timed_out(flight.key, seconds)
            if outcome is None and flight.scope.cancelled_caught:
                outcome = AbortedError(flight.key, "every caller left (cancel_orphaned=True)")
        except BaseException as exc:
            outcome = exc
        self._settle(flight, outcome)
        if not flight.run.trio and isinstance(outcome, KeyboardInterrupt | SystemExit):
            raise outcome

    def _settle(self, flight: _AnyIOFlight, exc: BaseException | None) -> None:
        """End the flight: the table removes its entry, then every caller wakes with its outcome."""
        run = flight.run
        if flight.task is not None:
            run.table.loaders.pop(flight.task, None)
        cancelled = exc is not None and isinstance(exc, _cancelled_class(run.trio))
        failure, told = run.table.settle(flight, exc, cancelled)
        # A slot freed, or the flight was forgotten earlier (maybe from outside the
        # run): a slot waiter looks again now (a spurious wake costs only a retry).
        run.free_slot()
        if failure is not None:
            flight.value = None
            flight.failure = failure
        futures, flight.futures = flight.futures, None
        flight.event.set()
        if futures:
            for future in futures:
                future._resolve(flight.value, flight.error_for(future._joined))
        if told is not None:
            emit(run.table.hook, told)  # type: ignore[arg-type]

    def _runs_of_caller(self) -> list[tuple[bool, _Run]]:
        """The running loop's or run's state, or every one outside any; each with
        whether it is the caller's."""
        try:
            token, _ = _run_token()
        except RuntimeError:
            return [(False, run) for run in self._loops.all()]
        run = self._loops.get(token)
        return [] if run is None else [(True, run)]
