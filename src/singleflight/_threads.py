"""The thread driver: :class:`Group`, safe from any number of threads.

One lock guards one dict of in-flight calls; the lock is never held while a
loader runs.  Waiting threads block on an :class:`threading.Event` created only
when somebody actually has to wait, so a call nobody joins costs two short
critical sections and the loader itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, InvalidStateError
from functools import partial
from threading import get_ident
from time import monotonic, perf_counter
from types import TracebackType
from typing import Any, Generic, Literal, ParamSpec, TypeVar

from ._flight import (
    Flight,
    Full,
    Table,
    bad_key,
    check_fn,
    check_options,
    reentry_error,
    waiter_error,
)
from ._flight import stats as _stats
from ._result import Result
from .errors import AbortedError, TooManyFlightsError, WaitTimeoutError, safe_repr
from .events import Event, EventHook, emit
from .stats import GroupStats

__all__ = ["Group"]

K = TypeVar("K")
V = TypeVar("V")
P = ParamSpec("P")


class _Call(Flight):
    """A flight run by a thread.

    ``owner`` is the ident of the thread running the loader (None until a
    detached loader starts).  ``error`` is what waiters raise and ``tb`` its
    traceback as the loader left it: re-raising with it each time keeps the
    shared exception's traceback from growing.  ``value`` and ``error`` are set
    when the call ends, before anyone reads them.
    """

    __slots__ = ("error", "event", "futures", "owner", "tb", "value")
    value: Any
    error: Exception | None
    tb: TracebackType | None

    def __init__(self, key: object, owner: int | None) -> None:
        self.key = key
        self.dups = 0
        self.event: threading.Event | None = None
        self.futures: list[_CallFuture[Any]] | None = None
        self.owner = owner


class _Abandoned(Exception):
    """Internal: a do_future() caller cancelled its future while it waited for a slot."""


class _CallFuture(Future[V]):
    """A caller's own future: ``result()`` re-raises a shared exception with the loader's traceback.

    ``concurrent.futures.Future.result`` re-raises the stored exception as it is,
    so an exception shared by many futures would gain frames on every call.
    """

    _tb: TracebackType | None = None
    _joined: float | None = None  # a joiner's join time, for wait_seconds

    def result(self, timeout: float | None = None) -> V:
        error = self.exception(timeout)
        if error is not None:
            raise error.with_traceback(self._tb)
        return super().result(0)


def _outcome(call: _Call) -> Any:
    """Return the flight's value, or raise its error as it was when the loader raised it."""
    error = call.error
    if error is None:
        return call.value
    raise error.with_traceback(call.tb)


def _publish(call: _Call) -> None:
    """Wake every waiter of a finished call.  Runs after the call has left the table."""
    if call.event is not None:
        call.event.set()
    if call.futures:
        error = call.error
        for future in call.futures:
            try:
                if error is None:
                    future.set_result(call.value)
                else:
                    future._tb = call.tb
                    future.set_exception(error)
            except InvalidStateError:
                pass  # the caller cancelled its own future; the others still get theirs


class Group(Generic[K, V]):
    """Coalesces concurrent calls that share a key into one execution, for threads.

    ``Group()`` needs no arguments.  Options:

    * ``executor``: runs the loaders of :meth:`do_future` (and of every flight
      when ``timeout`` is set); by default each such flight gets a daemon thread.
    * ``name``: labels the group's events and metrics.
    * ``on_event``: a callable given each :mod:`singleflight.events` event.
    * ``max_flights``: at most this many keys in flight; a call for a new key
      beyond it raises :class:`TooManyFlightsError` (``on_limit="raise"``) or waits
      for a flight to end (``on_limit="wait"``).  Joins are never refused.
    * ``timeout``: seconds a caller waits at most; then it alone raises
      ``TimeoutError`` and the flight goes on for the others.  So that the first
      caller can leave too, every flight's loader then runs on the executor.

    A group is not a cache: a flight's entry is removed before any of its callers
    sees the result, so a call made after that starts a new flight.  Nothing about
    a finished flight is kept.
    """

    __slots__ = (
        "__weakref__",
        "_calls",
        "_executor",
        "_lock",
        "_slot",
        "_slot_waiters",
        "_slow",
        "_table",
        "_timeout",
        "name",
    )

    def __init__(
        self,
        *,
        executor: Executor | None = None,
        name: str = "default",
        on_event: EventHook | None = None,
        max_flights: int | None = None,
        on_limit: Literal["raise", "wait"] = "raise",
        timeout: float | None = None,
    ) -> None:
        check_options(name, on_event, max_flights, on_limit, timeout)
        if executor is not None and not callable(getattr(executor, "submit", None)):
            raise TypeError(
                f"executor must be a concurrent.futures.Executor; got {safe_repr(executor)}"
            )
        self._lock = threading.Lock()
        self._table: Table[_Call] = Table(name, on_event, max_flights, on_limit)
        self._calls = self._table.calls
        self._executor = executor
        self.name = name
        self._timeout = timeout
        # Limits, timeouts and events take the general path; without them, do()
        # keeps its short one.
        self._slow = on_event is not None or max_flights is not None or timeout is not None
        self._slot = threading.Condition(self._lock)
        self._slot_waiters = 0

    def do(self, key: K, fn: Callable[P, V], /, *args: P.args, **kwargs: P.kwargs) -> V:
        """Run ``fn(*args, **kwargs)`` as the flight of ``key``, or join the one in flight.

        Returns the loader's value; every caller of one flight gets the same object.

        Errors: an :class:`Exception` from the loader is raised in every caller of
        the flight (the same object, with the loader's traceback).  A
        ``BaseException`` that is not an ``Exception`` (``KeyboardInterrupt``,
        ``SystemExit``) is re-raised in the thread that ran the loader only; the
        waiting threads raise :class:`AbortedError` caused by it.  ``TypeError`` if
        ``key`` is unhashable or ``fn`` not callable, before anything runs.
        ``RuntimeError`` if the loader calls ``do`` on its own key from its own
        thread (it would wait for itself).  A waiting ``do`` cannot be cancelled;
        use :meth:`do_future` to stop waiting without stopping the flight.
        """
        if self._slow:
            return _outcome(self._call(key, fn, args, kwargs))  # type: ignore[no-any-return]
        if not callable(fn):
            check_fn(fn)
        calls = self._calls
        # Table.enter() and lead() written out: every call of do() takes this
        # path, and a method call is a third of its cost (see the module docstring).
        with self._lock:
            try:
                call = calls.get(key)
            except TypeError:
                raise bad_key(key) from None
            if call is None:
                calls[key] = call = _Call(key, get_ident())
                self._table.flights += 1
                event = None
            else:
                event = self._join(call, perf_counter())
        if event is not None:
            event.wait()
            return _outcome(call)  # type: ignore[no-any-return]
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            self._settle(call, None, exc)
            raise
        # Table.settle() for a value with no hook, written out (see the module docstring).
        with self._lock:
            # Go's cleanup order: out of the table before anyone sees the value,
            # and only if still ours (Table.remove() written out).
            current = calls.pop(key, None)
            if current is not call and current is not None:
                calls[key] = current
            if dups := call.dups:
                self._table.wait_seconds += call.waiting * perf_counter() - call.joined
        if dups:
            call.value = value
            call.error = None
            _publish(call)
        return value

    def do_result(
        self, key: K, fn: Callable[P, V], /, *args: P.args, **kwargs: P.kwargs
    ) -> Result[V]:
        """Like :meth:`do`, but returns a :class:`Result` instead of raising the loader's error.

        ``Result.error`` holds the loader's :class:`Exception`, or an
        :class:`AbortedError` for a waiter whose leader was interrupted.  A
        ``BaseException`` that stopped the loader in this very thread is still
        raised, as are ``TypeError`` for an unhashable key or a non-callable
        ``fn`` and ``RuntimeError`` for a re-entrant call.
        """
        call = self._call(key, fn, args, kwargs)
        return Result(call.value, call.error, call.dups > 0)

    def do_future(
        self, key: K, fn: Callable[P, V], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[V]:
        """Start or join the flight of ``key`` and return at once with a future of its outcome.

        Go's ``DoChan``.  A new flight's loader runs on the group's executor (by
        default a daemon thread of its own).  Each caller gets its own future:
        waiting on it with a timeout, or cancelling it, affects nobody else, and
        the flight runs on.  The future holds the value, the loader's
        :class:`Exception`, or :class:`AbortedError`.  ``TypeError`` for an
        unhashable key or a non-callable ``fn`` is raised here; so is the
        executor's error if it refuses the work (every caller that joined
        meanwhile gets it too).
        """
        check_fn(fn)
        future: _CallFuture[V] = _CallFuture()
        table = self._table
        told: Event | None = None
        with self._lock:
            try:
                call = table.enter(key)
            except Full as full:
                refused: Full | None = full
            else:
                refused = None
                now = perf_counter()
                if call is None:
                    call = _Call(key, None)
                    told = self._lead(call)
                else:
                    told = table.join(call, now)
                    self._wait_for(call)
                    future._joined = now
                if call.futures is None:
                    call.futures = [future]
                else:
                    call.futures.append(future)
        if refused is not None:
            if not refused.wait:
                raise self._refuse(refused)
            # Wait for a slot on a thread of its own: do_future never blocks.  It
            # acts for the caller, so it runs in a copy of the caller's context
            # (what a wrapping group or a tracer set there is seen by the flight).
            threading.Thread(
                target=contextvars.copy_context().run,
                args=(self._call_into, future, key, fn, args, kwargs),
                daemon=True,
            ).start()
            return future
        assert call is not None
        if told is not None:
            emit(self._table.hook, told)  # type: ignore[arg-type]
        if future._joined is None:
            self._start(call, fn, args, kwargs)
        else:
            future.add_done_callback(partial(self._future_left, call))
        return future

    def forget(self, key: K) -> None:
        """Let the next call of ``key`` start a new flight.

        The flight in progress is not stopped; its callers still get its outcome,
        and when it ends it does not remove the newer flight.  A no-op for a key
        not in flight.
        """
        with self._lock:
            if self._table.forget(key) and self._slot_waiters:
                self._slot.notify()

    def forget_unshared(self, key: K) -> bool:
        """Forget ``key`` only if nobody joined its flight.

        Returns True if the key was forgotten or was not in flight, False if its
        flight is shared (it is then left alone).
        """
        with self._lock:
            forgotten, dropped = self._table.forget_unshared(key)
            if dropped and self._slot_waiters:
                self._slot.notify()
            return forgotten

    def stats(self) -> GroupStats:
        """The group's counters (see :class:`singleflight.stats.GroupStats`)."""
        with self._lock:
            return _stats([self._table])

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._calls

    def __len__(self) -> int:
        """The number of keys in flight."""
        with self._lock:
            return len(self._calls)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} in_flight={len(self)}>"

    # -- the slow paths --------------------------------------------------------------

    def _refuse(self, full: Full) -> TooManyFlightsError:
        """max_flights refused a call (counted by the table): tell it, return the error."""
        if full.event is not None:
            emit(self._table.hook, full.event)  # type: ignore[arg-type]
        assert full.error is not None
        return full.error

    def _lead(self, call: _Call) -> Event | None:
        """Register a new flight (the lock is held); its start event."""
        told = self._table.lead(call)
        if self._slot_waiters:
            # Callers of this key waiting for a slot can join it now.
            self._slot.notify_all()
        return told

    def _join(self, call: _Call, now: float) -> threading.Event:
        """Join ``call`` (the lock is held) and return the event to wait on."""
        if call.owner == get_ident():
            raise reentry_error(call.key)
        told = self._table.join(call, now)
        if told is not None:
            # Told under the lock, as a joiner of the fast path has no other
            # moment before it waits; only groups with a hook get here.
            emit(self._table.hook, told)  # type: ignore[arg-type]
        return self._wait_for(call)

    @staticmethod
    def _wait_for(call: _Call) -> threading.Event:
        if call.event is None:
            call.event = threading.Event()
        return call.event

    def _call(
        self,
        key: K,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        abandoned: Future[Any] | None = None,
    ) -> _Call:
        """The general path of do() and do_result(): limits, timeouts, events.

        Returns the finished call; raises TooManyFlightsError, TimeoutError (this
        caller alone leaves), the usage errors, or the BaseException that
        stopped a loader run in this thread.  ``abandoned`` is the future of a
        do_future() caller waiting for a slot: once it is cancelled the wait
        ends with _Abandoned, and no flight is started for it.
        """
        check_fn(fn)
        table = self._table
        begun = monotonic()
        deadline = None if self._timeout is None else begun + self._timeout
        told: Event | None = None
        joined: float | None = None
        call: _Call | None = None
        event: threading.Event | None = None
        refused: Full | None = None
        with self._lock:
            while True:
                if abandoned is not None and abandoned.cancelled():
                    raise _Abandoned
                try:
                    call = table.enter(key)
                except Full as full:
                    if not full.wait:
                        refused = full
                        break
                    remaining = None if deadline is None else deadline - monotonic()
                    if remaining is not None and remaining <= 0:
                        told = table.timed_out(key, monotonic() - begun)
                        break
                    self._slot_waiters += 1
                    try:
                        self._slot.wait(remaining)
                    finally:
                        self._slot_waiters -= 1
                    continue
                if call is None:
                    # With a timeout the loader runs elsewhere and this caller
                    # waits like a joiner (not counted as one), so it can leave.
                    call = _Call(key, get_ident() if deadline is None else None)
                    told = self._lead(call)
                else:
                    joined = perf_counter()
                    if call.owner == get_ident():
                        raise reentry_error(key)
                    told = table.join(call, joined)
                    # The event exists before the lock is let go: the flight may
                    # settle while this caller is telling its Joined event.
                    event = self._wait_for(call)
                break
        if refused is not None:
            raise self._refuse(refused)
        if told is not None:
            emit(table.hook, told)  # type: ignore[arg-type]
        if call is None:
            raise WaitTimeoutError(key, self._timeout)
        if joined is None and deadline is None:
            try:
                value = fn(*args, **kwargs)
            except BaseException as exc:
                self._settle(call, None, exc)
                if not isinstance(exc, Exception):
                    raise
                return call
            self._settle(call, value, None)
            return call
        if event is None:  # the leader, whose loader runs elsewhere: not started yet
            with self._lock:
                event = self._wait_for(call)
        if joined is None:
            self._start(call, fn, args, kwargs)
        if not event.wait(None if deadline is None else max(0.0, deadline - monotonic())):
            with self._lock:
                told = table.timed_out(key, monotonic() - begun)
                if joined is not None:
                    table.leave(call, joined, False)
            if told is not None:
                emit(table.hook, told)  # type: ignore[arg-type]
            raise WaitTimeoutError(key, self._timeout)
        return call

    def _future_left(self, call: _Call, future: Future[Any]) -> None:
        """A do_future() joiner's future is done: if cancelled, its caller left the flight."""
        if future.cancelled():
            joined = future._joined  # type: ignore[attr-defined]
            with self._lock:
                if call.futures is not None and future in call.futures:
                    call.futures.remove(future)
                    self._table.leave(call, joined, False)

    def _call_into(
        self,
        future: _CallFuture[Any],
        key: K,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """do_future() on a full group in "wait" mode: the call, made from a thread of its own.

        Cancelling ``future`` while this waits for a slot ends the wait (the
        future's done callback wakes the slot waiters) and starts nothing.
        Once the call has led or joined a flight it waits for it like any
        caller; the cancelled future just does not take the outcome.
        """
        future.add_done_callback(self._wake_slot_waiters)
        try:
            call = self._call(key, fn, args, kwargs, future)
        except _Abandoned:
            return
        except BaseException as exc:
            with contextlib.suppress(InvalidStateError):  # the caller cancelled its future
                future.set_exception(waiter_error(key, exc))
            return
        with contextlib.suppress(InvalidStateError):
            if call.error is None:
                future.set_result(call.value)
            else:
                future._tb = call.tb
                future.set_exception(call.error)

    def _wake_slot_waiters(self, future: Future[Any]) -> None:
        if future.cancelled():
            with self._lock:
                if self._slot_waiters:
                    self._slot.notify_all()

    def _start(
        self,
        call: _Call,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """Run a flight's loader on the executor, or on a daemon thread of its own.

        If the executor refuses the work, the flight ends with its error for
        every caller that joined meanwhile, and the error is raised here.
        """
        try:
            if self._executor is None:
                threading.Thread(
                    target=self._run,
                    args=(call, fn, args, kwargs),
                    name=f"singleflight {safe_repr(call.key)}",
                    daemon=True,
                ).start()
            else:
                work = self._executor.submit(self._run, call, fn, args, kwargs)
                work.add_done_callback(partial(self._dropped, call))
        except BaseException as exc:
            self._settle(call, None, exc)
            raise

    def _run(
        self,
        call: _Call,
        fn: Callable[..., V],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """Run a flight's loader on a worker thread (every caller waits on the call)."""
        call.owner = get_ident()
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            self._settle(call, None, exc)
            return
        self._settle(call, value, None)

    def _dropped(self, call: _Call, work: Future[None]) -> None:
        """The executor cancelled a flight's work before it ran: end the flight for its callers."""
        if work.cancelled():
            self._settle(call, None, AbortedError(call.key, "the executor dropped its work"))

    def _settle(self, call: _Call, value: Any, exc: BaseException | None) -> None:
        """End ``call``: the table removes it, then every waiter gets its outcome."""
        with self._lock:
            error, told = self._table.settle(call, exc)
            if self._slot_waiters:
                self._slot.notify()
        call.value = value
        call.error = error
        if error is not None:
            call.tb = error.__traceback__
        _publish(call)
        if told is not None:
            emit(self._table.hook, told)  # type: ignore[arg-type]
