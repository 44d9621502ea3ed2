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

from . import _flight
from ._flight import Flight, reentry_error, remove, waiter_error
from ._options import check_options
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

__all__ = ["Group"]

K = TypeVar("K")
V = TypeVar("V")
P = ParamSpec("P")


class _Call(Flight):
    """A flight run by a thread.

    ``owner`` is the ident of the thread running the loader.  ``error`` is what
    waiters raise and ``tb`` its traceback as the loader left it: re-raising
    with it each time keeps the shared exception's traceback from growing.
    """

    __slots__ = (
        "error",
        "event",
        "futures",
        "joined_at",
        "owner",
        "started",
        "tb",
        "value",
        "waiting",
    )
    value: Any
    error: Exception | None
    tb: TracebackType | None
    # Set by the first joiner: the joiners still waiting and the sum of their
    # join times, so their total wait is known at the end without a lock per wake.
    waiting: int
    joined_at: float
    started: float  # set only when an on_event hook needs durations

    def __init__(self, owner: int | None) -> None:
        # value and error are set when the call ends, before anyone reads them.
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


def _bad_key(key: object) -> TypeError:
    return TypeError(f"singleflight keys must be hashable; got {type(key).__name__} {key!r}")


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
        "_aborted",
        "_calls",
        "_errors",
        "_executor",
        "_flights",
        "_joins",
        "_lock",
        "_max_flights",
        "_on_event",
        "_on_limit",
        "_rejected",
        "_shared",
        "_slot",
        "_slot_waiters",
        "_slow",
        "_timeout",
        "_timeouts",
        "_wait_seconds",
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
            raise TypeError(f"executor must be a concurrent.futures.Executor; got {executor!r}")
        self._lock = threading.Lock()
        self._calls: dict[K, _Call] = {}
        self._executor = executor
        self.name = name
        self._on_event = on_event
        self._max_flights = max_flights
        self._on_limit = on_limit
        self._timeout = timeout
        # Limits, timeouts and events take the general path; without them, do()
        # keeps its short one.
        self._slow = on_event is not None or max_flights is not None or timeout is not None
        self._slot = threading.Condition(self._lock)
        self._slot_waiters = 0
        self._flights = self._joins = self._shared = self._errors = self._aborted = 0
        self._timeouts = self._rejected = 0
        self._wait_seconds = 0.0

    def do(self, key: K, fn: Callable[P, V], /, *args: P.args, **kwargs: P.kwargs) -> V:
        """Run ``fn(*args, **kwargs)`` as the flight of ``key``, or join the one in flight.

        Returns the loader's value; every caller of one flight gets the same object.

        Errors: an :class:`Exception` from the loader is raised in every caller of
        the flight (the same object, with the loader's traceback).  A
        ``BaseException`` that is not an ``Exception`` (``KeyboardInterrupt``,
        ``SystemExit``) is re-raised in the thread that ran the loader only; the
        waiting threads raise :class:`AbortedError` caused by it.  ``TypeError`` if
        ``key`` is unhashable, before anything runs.  ``RuntimeError`` if the
        loader calls ``do`` on its own key from its own thread (it would wait for
        itself).  A waiting ``do`` cannot be cancelled; use :meth:`do_future` to
        stop waiting without stopping the flight.
        """
        if self._slow:
            return _outcome(self._call(key, fn, args, kwargs))  # type: ignore[no-any-return]
        calls = self._calls
        # The lead path below is _enter() and _settle() written out: every call
        # of do() takes it, and a method call is a third of its cost.
        with self._lock:
            try:
                call = calls.get(key)
            except TypeError:
                raise _bad_key(key) from None
            if call is None:
                calls[key] = call = _Call(get_ident())
                self._flights += 1
                event = None
            else:
                event = self._join(key, call, fn)
        if event is not None:
            event.wait()
            return _outcome(call)  # type: ignore[no-any-return]
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            self._settle(key, call, None, exc)
            raise
        with self._lock:
            # Remove the entry before anyone can see the value (Go 8fcdb60), and
            # only if it is still ours: after forget() it may be a newer flight.
            current = calls.pop(key, None)
            if current is not call and current is not None:
                calls[key] = current
            # dups is final: joiners only join under the lock while the entry is present.
            if dups := call.dups:
                self._wait_seconds += call.waiting * perf_counter() - call.joined_at
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
        raised, as are ``TypeError`` for an unhashable key and ``RuntimeError``
        for a re-entrant call.
        """
        if self._slow:
            call = self._call(key, fn, args, kwargs)
            return Result(call.value, call.error, call.dups > 0)
        call, event = self._enter(key, fn)
        try:
            if event is not None:
                event.wait()
                value = _outcome(call)
            else:
                try:
                    value = fn(*args, **kwargs)
                except BaseException as exc:
                    self._settle(key, call, None, exc)
                    raise
                self._settle(key, call, value, None)
        except Exception as exc:
            return Result(None, exc, call.dups > 0)
        return Result(value, None, call.dups > 0)

    def do_future(
        self, key: K, fn: Callable[P, V], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[V]:
        """Start or join the flight of ``key`` and return at once with a future of its outcome.

        Go's ``DoChan``.  A new flight's loader runs on the group's executor (by
        default a daemon thread of its own).  Each caller gets its own future:
        waiting on it with a timeout, or cancelling it, affects nobody else, and
        the flight runs on.  The future holds the value, the loader's
        :class:`Exception`, or :class:`AbortedError`.  ``TypeError`` for an
        unhashable key is raised here; so is the executor's error if it refuses
        the work (every caller that joined meanwhile gets it too).
        """
        future: _CallFuture[V] = _CallFuture()
        hook = self._on_event
        with self._lock:
            call = self._lookup(key)
            full = call is None and self._full()
            if not full:
                lead = call is None
                if call is None:
                    call = self._lead(key, None)
                else:
                    self._join(key, call, fn)
                if call.futures is None:
                    call.futures = [future]
                else:
                    call.futures.append(future)
        if full:
            if self._on_limit == "raise":
                raise self._reject(key)
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
        if hook is not None:
            emit(hook, (FlightStarted if lead else Joined)(self.name, key, id(call)))
        if lead:
            self._start(key, call, fn, args, kwargs)
        return future

    def forget(self, key: K) -> None:
        """Let the next call of ``key`` start a new flight.

        The flight in progress is not stopped; its callers still get its outcome,
        and when it ends it does not remove the newer flight.  A no-op for a key
        not in flight.
        """
        with self._lock:
            _flight.forget(self._calls, key)
            if self._slot_waiters:
                self._slot.notify()

    def forget_unshared(self, key: K) -> bool:
        """Forget ``key`` only if nobody joined its flight.

        Returns True if the key was forgotten or was not in flight, False if its
        flight is shared (it is then left alone).
        """
        with self._lock:
            forgotten = _flight.forget_unshared(self._calls, key)
            if self._slot_waiters:
                self._slot.notify()
            return forgotten

    def stats(self) -> GroupStats:
        """The group's counters (see :class:`singleflight.stats.GroupStats`)."""
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
                in_flight=len(self._calls),
                wait_seconds=self._wait_seconds,
            )

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

    def _lookup(self, key: K) -> _Call | None:
        try:
            return self._calls.get(key)
        except TypeError:
            raise _bad_key(key) from None

    def _full(self) -> bool:
        return self._max_flights is not None and len(self._calls) >= self._max_flights

    def _reject(self, key: K) -> TooManyFlightsError:
        """Count a refused call; its event goes out once the lock is released."""
        with self._lock:
            self._rejected += 1
            in_flight = len(self._calls)
        if self._on_event is not None:
            emit(self._on_event, Rejected(self.name, key, in_flight))
        assert self._max_flights is not None
        return TooManyFlightsError(key, self._max_flights)

    def _lead(self, key: K, owner: int | None) -> _Call:
        """Register a new flight of ``key`` (the lock is held)."""
        self._calls[key] = call = _Call(owner)
        self._flights += 1
        if self._slot_waiters:
            # Callers of this key waiting for a slot can join it now.
            self._slot.notify_all()
        if self._on_event is not None:
            call.started = perf_counter()
        return call

    def _enter(self, key: K, fn: object) -> tuple[_Call, threading.Event | None]:
        """Lead (no event) or join (the event to wait on) the flight of ``key``."""
        with self._lock:
            call = self._lookup(key)
            if call is None:
                return self._lead(key, get_ident()), None
            return call, self._join(key, call, fn)

    def _join(self, key: object, call: _Call, fn: object) -> threading.Event:
        """Join ``call`` (the group's lock is held) and return the event to wait on."""
        if call.owner == get_ident():
            raise reentry_error(key)
        if not callable(fn):
            raise TypeError(f"fn must be callable; got {type(fn).__name__} {fn!r}")
        if call.dups == 0:
            self._shared += 1
            call.waiting = 0
            call.joined_at = 0.0
        call.dups += 1
        self._joins += 1
        call.waiting += 1
        call.joined_at += perf_counter()
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
        hook = self._on_event
        begun = monotonic()
        deadline = None if self._timeout is None else begun + self._timeout
        slot_timed_out = False
        with self._lock:
            call = self._lookup(key)
            while call is None and self._full() and self._on_limit == "wait":
                if abandoned is not None and abandoned.cancelled():
                    raise _Abandoned
                remaining = None if deadline is None else deadline - monotonic()
                if remaining is not None and remaining <= 0:
                    self._timeouts += 1
                    slot_timed_out = True
                    break
                self._slot_waiters += 1
                try:
                    self._slot.wait(remaining)
                finally:
                    self._slot_waiters -= 1
                call = self._lookup(key)
            if abandoned is not None and abandoned.cancelled():
                raise _Abandoned
            full = call is None and self._full()
            if slot_timed_out or full:
                pass
            elif call is None:
                lead = True
                call = self._lead(key, get_ident() if deadline is None else None)
                # With a timeout the loader runs elsewhere and this caller waits
                # like a joiner, so that it can leave.
                event = None if deadline is None else _event_of(call)
                if event is not None:
                    call.waiting = 0
                    call.joined_at = 0.0
            else:
                lead = False
                event = self._join(key, call, fn)
        if slot_timed_out:
            if hook is not None:
                emit(hook, TimedOut(self.name, key, monotonic() - begun))
            raise _timeout_error(key, self._timeout)
        if full:
            raise self._reject(key)
        assert call is not None
        if hook is not None:
            emit(hook, (FlightStarted if lead else Joined)(self.name, key, id(call)))
        if lead and deadline is None:
            try:
                value = fn(*args, **kwargs)
            except BaseException as exc:
                self._settle(key, call, None, exc)
                if not isinstance(exc, Exception):
                    raise
                return call
            self._settle(key, call, value, None)
            return call
        if lead:
            self._start(key, call, fn, args, kwargs)
        assert event is not None
        started = perf_counter()
        if not event.wait(None if deadline is None else max(0.0, deadline - monotonic())):
            self._timed_out(key, call, lead, started)
        return call

    def _timed_out(self, key: K, call: _Call, lead: bool, started: float) -> None:
        """This caller's timeout passed: count it, leave the flight, raise TimeoutError."""
        waited = perf_counter() - started
        with self._lock:
            self._timeouts += 1
            if not lead:  # a joiner's wait is counted now rather than at the end
                call.waiting -= 1
                call.joined_at -= started
                self._wait_seconds += waited
        if self._on_event is not None:
            emit(self._on_event, TimedOut(self.name, key, waited))
        raise _timeout_error(key, self._timeout)

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
        key: K,
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
                    args=(key, call, fn, args, kwargs),
                    name=f"singleflight {key!r}",
                    daemon=True,
                ).start()
            else:
                work = self._executor.submit(self._run, key, call, fn, args, kwargs)
                work.add_done_callback(partial(self._dropped, key, call))
        except BaseException as exc:
            self._settle(key, call, None, exc)
            raise

    def _run(
        self,
        key: K,
        call: _Call,
        fn: Callable[..., V],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """Run a flight's loader on a worker thread."""
        call.owner = get_ident()
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            # Every caller waits on the call itself; nothing is left for the
            # worker thread to report.
            self._settle(key, call, None, exc)
            return
        self._settle(key, call, value, None)

    def _dropped(self, key: K, call: _Call, work: Future[None]) -> None:
        """The executor cancelled a flight's work before it ran: end the flight for its callers."""
        if work.cancelled():
            self._settle(key, call, None, AbortedError(key, "the executor dropped its work"))

    def _settle(self, key: K, call: _Call, value: Any, exc: BaseException | None) -> None:
        """End ``call``: remove it from the table, then hand its outcome to every waiter."""
        error = None if exc is None else waiter_error(key, exc)
        aborted = isinstance(error, AbortedError)
        with self._lock:
            remove(self._calls, key, call)
            if aborted:
                self._aborted += 1
            elif error is not None:
                self._errors += 1
            if call.dups:
                self._wait_seconds += call.waiting * perf_counter() - call.joined_at
            if self._slot_waiters:
                self._slot.notify()
        call.value = value
        call.error = error
        if error is not None:
            call.tb = error.__traceback__
        _publish(call)
        hook = self._on_event
        if hook is not None:
            duration = perf_counter() - call.started
            callers = call.dups + 1
            if error is None:
                emit(hook, FlightFinished(self.name, key, id(call), duration, callers))
            elif aborted:
                emit(hook, FlightAborted(self.name, key, id(call), duration, callers, exc))
            else:
                emit(hook, FlightFailed(self.name, key, id(call), duration, callers, error))


def _event_of(call: _Call) -> threading.Event:
    if call.event is None:
        call.event = threading.Event()
    return call.event


def _timeout_error(key: object, timeout: float | None) -> WaitTimeoutError:
    return WaitTimeoutError(key, timeout)
