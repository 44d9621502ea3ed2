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
from inspect import isawaitable
from time import perf_counter
from types import TracebackType
from typing import Any, Generic

from ._options import missing

try:
    # singleflight/anyio.py importing "anyio": imports are absolute, so this is
    # the third-party package, never this module.
    import anyio
    import anyio.lowlevel
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise missing("anyio", "anyio", "AnyIO 4 or later") from exc

from ._flight import (
    Failure,
    Flight,
    Full,
    Table,
    check_fn,
    cycle_error,
    loader_timed_out,
    not_awaitable,
)
from ._loops import LoopGroup, LoopState, asyncio_call_soon
from ._protocols import Args, AsyncFn, K, Kwargs, P, V
from ._result import Result
from .errors import AbortedError
from .events import Event, emit

__all__ = ["AnyIOGroup", "FlightFuture"]


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

    @classmethod
    def of(cls, table: Table[_AnyIOFlight], token: object) -> _Run:
        return cls(table, token, not isinstance(token, asyncio.AbstractEventLoop))

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


class AnyIOGroup(LoopGroup[K, _Run], Generic[K, V]):
    """Coalesces concurrent calls that share a key into one execution, on asyncio or trio.

    Options as :class:`~singleflight.AsyncGroup` (``max_flights`` per event loop
    or trio run; ``timeout`` covers the wait for a slot and for the outcome).
    ``fn`` returns an awaitable of the running backend, run in a task of its
    own outside every caller's cancel scope.  Calls from different loops or
    runs never join each other.
    """

    __slots__ = ()
    _make_state = staticmethod(_Run.of)

    async def do(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> V:
        """Run ``fn(*args, **kwargs)`` as the flight of ``key``, or join the one in flight.

        Returns:
          * the loader's value, the same object for every caller.

        Raises (see the contract):
          * the loader's :class:`Exception` (a non-awaitable return's ``TypeError``
            and the ``loader_timeout`` ``TimeoutError`` included): itself in the
            first caller, an equal copy in every other;
          * :class:`AbortedError` when the loader ended cancelled or by another
            ``BaseException``;
          * the usage errors, :class:`~singleflight.TooManyFlightsError` and
            :class:`~singleflight.WaitTimeoutError` as ``AsyncGroup.do``.

        Cancellation: a cancelled caller (its scope, ``move_on_after``,
        ``task.cancel()``) alone raises the backend's cancellation; one waiting
        for a slot passes a slot it was just handed on.  The loader runs on
        unless ``cancel_orphaned`` and every caller has left.
        """
        flight, joined = await self._settled(key, fn, args, kwargs)
        error = flight.error_for(joined)
        if error is not None:
            raise error
        return flight.value  # type: ignore[no-any-return]

    async def do_result(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Result[V]:
        """Like :meth:`do`, but the loader's error is returned in the :class:`Result`.

        Raises: as :meth:`do`, for everything but the loader's error;
        cancellation as for :meth:`do`.
        """
        flight, joined = await self._settled(key, fn, args, kwargs)
        return Result(flight.value, flight.error_for(joined), flight.dups > 0)

    def do_future(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> FlightFuture[V]:
        """Start or join the flight of ``key``; return at once with a :class:`FlightFuture`.

        Go's ``DoChan``; needs no task group.  The future holds what :meth:`do`
        returns or raises; the usage errors and a refusal are raised here.  A
        call that must wait for a slot waits in a task of its own, under its
        ``timeout``; if the run ends meanwhile, the future holds
        :class:`AbortedError`.

        Cancellation: cancelling the future affects nobody else; cancelled while
        it waits for a slot, it starts nothing.
        """
        future: FlightFuture[V]
        try:
            flight, joined = self._enter(key, fn, args, kwargs, waits=False)
        except Full:  # on_limit="wait" (a refusal is raised by _enter)
            future = FlightFuture(self)
            scope = future._scope = anyio.CancelScope()
            deadline = None if self._timeout is None else self._deadline()
            run = self._state_here()
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

    # -- the mechanism -------------------------------------------------------------

    @staticmethod
    def _token() -> object:
        return _run_token()[0]

    def _parked(self) -> int:
        """Callers of the running loop or run waiting for a slot (white-box, for tests)."""
        return len(self._state_here().slot_waiters)

    def _deadline(self) -> float:
        """This caller's deadline on the backend's clock (``timeout`` is set)."""
        self._state_here()  # outside any loop or run: the error that says so
        return anyio.current_time() + (self._timeout or 0.0)

    def _enter(
        self, key: K, fn: AsyncFn, args: Args, kwargs: Kwargs, waits: bool = True
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
        run = self._state_here()
        table = run.table
        try:
            flight = table.enter(key)
        except Full as full:
            if full.wait:
                raise
            raise self._refuse(full) from None
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

    async def _settled(
        self, key: K, fn: AsyncFn, args: Any, kwargs: Any
    ) -> tuple[_AnyIOFlight, float | None]:
        """do() and do_result(): lead or join the flight of ``key``, wait for its end."""
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
        return flight, joined

    def _stop_awaiting(self, flight: _AnyIOFlight) -> None:
        """This caller's wait on ``flight`` is over: if it is a loader, it waits no more."""
        table = flight.run.table
        if table.loaders:
            own = table.loaders.get(flight.run.current_task())
            if own is not None and own.awaits is flight:
                own.awaits = None

    async def _admit(
        self, key: K, fn: AsyncFn, args: Args, kwargs: Kwargs, deadline: float | None
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
            run = self._state_here()
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
                self._timed_out(key, self._waited(deadline))

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
            self._timed_out(flight.key, self._waited(deadline))

    def _waited(self, deadline: float | None) -> float:
        return anyio.current_time() - ((deadline or 0.0) - (self._timeout or 0.0))

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
        fn: AsyncFn,
        args: Args,
        kwargs: Kwargs,
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

    async def _fly(self, flight: _AnyIOFlight, fn: AsyncFn, args: Args, kwargs: Kwargs) -> None:
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
