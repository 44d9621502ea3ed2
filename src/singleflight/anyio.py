"""The AnyIO driver: :class:`AnyIOGroup`, one group for asyncio and trio alike.

Same contract as :class:`~singleflight.AsyncGroup`: each flight's loader runs in
a task of its own, detached from every caller's cancel scope, and callers wait
on an :class:`anyio.Event` of the flight, which is cancel-safe, so one caller's
cancellation never reaches the loader or the other callers.  AnyIO cannot start
a detached task, so that one step switches on the backend: an asyncio task of
the running loop, or a trio *system* task.  The loader runs inside an
:class:`anyio.CancelScope` kept on the flight, which is how ``cancel_abandoned``
stops it on either backend.

State is kept per event loop (asyncio) or per ``trio.run`` (keyed by its root
task), so calls from different loops or runs never join each other.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable
from inspect import isawaitable
from time import perf_counter
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypeVar

try:
    # singleflight/anyio.py importing "anyio": imports are absolute, so this is
    # the third-party package, never this module.
    import anyio
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "singleflight.anyio needs AnyIO 4 or later: install pysingleflight[anyio]"
    ) from exc

from . import _flight
from ._flight import Flight, check_options, reentry_error, remove, waiter_error
from ._result import AbortedError, Result
from .events import (
    EventHook,
    FlightAborted,
    FlightFailed,
    FlightFinished,
    FlightStarted,
    GroupStats,
    Joined,
    emit,
)

__all__ = ["AnyIOGroup"]

K = TypeVar("K")
V = TypeVar("V")
P = ParamSpec("P")

_TASK_NAME = "singleflight loader"


class _Run:
    """The flights of one asyncio event loop or one ``trio.run``.

    It holds no reference to its loop or root task (it is the value of a weak
    dictionary keyed by them).  ``running`` keeps asyncio loader tasks alive:
    the loop itself holds tasks only weakly.  Trio's system nursery holds its own.
    """

    __slots__ = ("running", "table", "trio")

    def __init__(self, trio: bool) -> None:
        self.table: dict[Any, _AnyIOFlight] = {}
        self.trio = trio
        self.running: set[asyncio.Task[None]] = set()

    def current_task(self) -> object:
        if self.trio:
            import trio

            return trio.lowlevel.current_task()
        return asyncio.current_task()


class _AnyIOFlight(Flight):
    """A flight whose loader runs in a task of its own; its callers wait on ``event``.

    ``left`` counts callers that stopped waiting (for ``cancel_abandoned``).
    ``error`` is what every caller raises, ``tb`` its traceback as the loader
    left it: re-raising with it keeps a shared exception's traceback from growing.
    """

    __slots__ = (
        "error",
        "event",
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


class AnyIOGroup(Generic[K, V]):
    """Coalesces concurrent calls that share a key into one execution, on asyncio or trio.

    ``fn`` is an async function (or any callable returning an awaitable of the
    running backend); it is called as ``fn(*args, **kwargs)`` in a task of its
    own, never in a caller's task or cancel scope.  Options:

    * ``cancel_abandoned``: with ``False`` (the default, as in Go) a loader runs
      on when every caller has left; with ``True`` it is cancelled once its last
      caller has left.
    * ``name``: labels the group's events.
    * ``on_event``: a callable given each :mod:`singleflight.events` event, in
      the task where it happens (the final event in the loader's task).

    Calls are grouped per asyncio event loop or ``trio.run``: calls from
    different loops or runs never join each other.  A group is not a cache: a
    flight's entry is removed before any caller sees its outcome.
    """

    __slots__ = (
        "__weakref__",
        "_aborted",
        "_cancel_abandoned",
        "_current",
        "_errors",
        "_flights",
        "_joins",
        "_lock",
        "_on_event",
        "_runs",
        "_shared",
        "_wait_seconds",
        "name",
    )

    def __init__(
        self,
        *,
        cancel_abandoned: bool = False,
        name: str = "default",
        on_event: EventHook | None = None,
    ) -> None:
        check_options(name, on_event, None, "raise", None)
        if not isinstance(cancel_abandoned, bool):
            raise TypeError(f"cancel_abandoned must be a bool; got {cancel_abandoned!r}")
        self._cancel_abandoned = cancel_abandoned
        self.name = name
        self._on_event = on_event
        # Guards the runs and the counters: a group may be shared by loops in
        # several threads.  Each run's table is only touched by its own thread.
        self._lock = threading.Lock()
        self._runs: weakref.WeakKeyDictionary[Any, _Run] = weakref.WeakKeyDictionary()
        # The last run used, read as one tuple so that threads running different
        # loops never pair one loop with another's table.
        self._current: tuple[Callable[[], object], _Run] = (_dead_ref, _Run(False))
        self._flights = self._joins = self._shared = self._errors = self._aborted = 0
        self._wait_seconds = 0.0

    async def do(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> V:
        """Run ``fn(*args, **kwargs)`` as the flight of ``key``, or join the one in flight.

        Returns the loader's value; every caller of one flight gets the same object.

        Errors: the loader's :class:`Exception` is raised in every caller (the
        same object, with the loader's traceback); so is a ``TypeError`` when
        ``fn`` returned something that is not awaitable.  A loader that ends
        cancelled (by ``cancel_abandoned``, by the end of the ``asyncio.run`` or
        ``trio.run``, or by anything else) or by another ``BaseException`` gives
        its callers :class:`AbortedError`, never a cancellation they did not ask
        for.  ``TypeError`` for an unhashable key or a non-callable ``fn``, and
        ``RuntimeError`` when the loader calls ``do`` on its own key, are raised
        before anything runs.

        Cancellation: cancelling a caller (its cancel scope, ``move_on_after``,
        ``fail_after``, ``task.cancel()``) makes that caller alone raise the
        backend's cancellation exception; the flight and its other callers go
        on.  When the last caller has left, the loader is cancelled if the group
        was made with ``cancel_abandoned=True`` and runs on otherwise.
        """
        flight = self._enter(key, fn, args, kwargs)
        del args, kwargs  # the loader has them; a parked caller need not keep them
        if not flight.event.is_set():
            await self._wait(flight, flight.dups > 0)
        error = flight.error
        if error is not None:
            raise error.with_traceback(flight.tb)
        return flight.value  # type: ignore[no-any-return]

    async def do_result(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Result[V]:
        """Like :meth:`do`, but returns a :class:`Result` instead of raising the loader's error.

        ``Result.error`` holds the loader's :class:`Exception` or an
        :class:`AbortedError`; ``Result.shared`` is true when the flight had two
        or more callers.  Cancelling the caller still raises the backend's
        cancellation in it, with the same effect on the flight as for
        :meth:`do`; ``TypeError`` and ``RuntimeError`` are raised as by :meth:`do`.
        """
        flight = self._enter(key, fn, args, kwargs)
        del args, kwargs
        if not flight.event.is_set():
            await self._wait(flight, flight.dups > 0)
        return Result(flight.value, flight.error, flight.dups > 0)

    def forget(self, key: K) -> None:
        """Let the next call of ``key`` start a new flight.

        The flight in progress is not cancelled; its callers still get its
        outcome, and when it ends it does not remove the newer flight.  Acts on
        the running loop's (or trio run's) flights; outside any, on every one's.
        """
        for table in self._tables_of_caller():
            _flight.forget(table, key)

    def forget_unshared(self, key: K) -> bool:
        """Forget ``key`` only if nobody joined its flight.

        Returns True if forgotten or not in flight, False if the flight is shared
        (it is then left alone).  Acts on the running loop's or run's flights
        (outside any, on every one's).
        """
        forgotten = True
        for table in self._tables_of_caller():
            forgotten = _flight.forget_unshared(table, key) and forgotten
        return forgotten

    def stats(self) -> GroupStats:
        """The group's counters (see :class:`singleflight.events.GroupStats`).

        ``timeouts`` and ``rejected`` are always 0: the group has no timeout or
        ``max_flights`` option (use the backend's cancel scopes to stop waiting).
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
                timeouts=0,
                rejected=0,
                in_flight=in_flight,
                wait_seconds=self._wait_seconds,
            )

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is in flight in the running loop or run (outside any: in any)."""
        return any(key in table for table in self._tables_of_caller())

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

    def _enter(
        self,
        key: K,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> _AnyIOFlight:
        """Lead or join the flight of ``key``; a leader's loader task is started here."""
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
        flight = table[key] = _AnyIOFlight(run, key)
        with self._lock:
            self._flights += 1
        if hook is not None:
            flight.started = perf_counter()
            emit(hook, FlightStarted(self.name, key, id(flight)))
        try:
            if run.trio:
                import trio

                # System tasks start with an empty context; give the loader the
                # leader's, as asyncio's create_task does.
                task: object = trio.lowlevel.spawn_system_task(
                    self._fly,
                    flight,
                    fn,
                    args,
                    kwargs,
                    name=_TASK_NAME,
                    context=contextvars.copy_context(),
                )
            else:
                atask = asyncio.get_running_loop().create_task(
                    self._fly(flight, fn, args, kwargs), name=_TASK_NAME
                )
                run.running.add(atask)
                atask.add_done_callback(run.running.discard)
                task = atask
        except BaseException as exc:
            # The loop or run is shutting down.  Nobody can have joined yet.
            self._settle(flight, exc)
            raise
        # An eager task factory may have run the loader already; it set this too.
        flight.task = task
        return flight

    async def _wait(self, flight: _AnyIOFlight, joiner: bool) -> None:
        """Wait for the flight's outcome; a caller leaving early may abandon the loader.

        ``joiner`` (``dups > 0`` right after entering: only a joiner sees that)
        says whether the wait counts in ``wait_seconds``.
        """
        joined = perf_counter()
        try:
            await flight.event.wait()
        finally:
            if joiner:
                with self._lock:
                    self._wait_seconds += perf_counter() - joined
            if not flight.event.is_set():
                self._leave(flight)

    def _leave(self, flight: _AnyIOFlight) -> None:
        """A caller stopped waiting: with ``cancel_abandoned``, the last one cancels the loader."""
        flight.left += 1
        if self._cancel_abandoned and flight.left > flight.dups:
            # Forget first: a caller arriving after this starts a new flight
            # instead of joining one that is being cancelled.
            remove(flight.run.table, flight.key, flight)
            flight.scope.cancel()

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
                    flight.value = await returned
            if outcome is None and flight.scope.cancelled_caught:
                outcome = AbortedError(flight.key, "every caller left (cancel_abandoned=True)")
        except BaseException as exc:
            outcome = exc
        self._settle(flight, outcome)
        if not flight.run.trio and isinstance(outcome, KeyboardInterrupt | SystemExit):
            raise outcome

    def _settle(self, flight: _AnyIOFlight, exc: BaseException | None) -> None:
        """End the flight: remove its entry, then wake every caller with its outcome."""
        key = flight.key
        remove(flight.run.table, key, flight)
        error: Exception | None = None
        if exc is not None:
            flight.value = None
            if isinstance(exc, _cancelled_class(flight.run.trio)):
                error = AbortedError(key, "its loader task was cancelled")
                error.__cause__ = exc
            else:
                error = waiter_error(key, exc)
            flight.error = error
            flight.tb = error.__traceback__
        aborted = isinstance(error, AbortedError)
        with self._lock:
            if aborted:
                self._aborted += 1
            elif error is not None:
                self._errors += 1
        flight.event.set()
        hook = self._on_event
        if hook is not None:
            duration = perf_counter() - flight.started
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

    def _tables_of_caller(self) -> list[dict[Any, _AnyIOFlight]]:
        """The running loop's or run's table, or every table outside any."""
        try:
            token, _ = _run_token()
        except RuntimeError:
            with self._lock:
                self._prune_closed()
                return [run.table for run in self._runs.values()]
        with self._lock:
            run = self._runs.get(token)
        return [] if run is None else [run.table]
