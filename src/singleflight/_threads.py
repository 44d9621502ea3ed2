"""The thread driver: :class:`Group`.

One reentrant lock guards the table, never held while a loader runs; waiters
block on a :class:`threading.Event` made only when somebody has to wait.  A
caller interrupted after it registered a flight still ends that flight.
"""

from __future__ import annotations

import contextvars
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, InvalidStateError
from functools import partial
from threading import get_ident
from time import monotonic, perf_counter
from types import CoroutineType, TracebackType
from typing import Any, Generic, Literal

from ._flight import (
    Failure,
    Flight,
    Full,
    Table,
    bad_key,
    check_fn,
)
from ._flight import stats as _stats
from ._options import check_options
from ._protocols import K, P, V
from ._result import Result
from .errors import AbortedError, ReentryError, TooManyFlightsError, WaitTimeoutError, safe_repr
from .events import Event, EventHook, emit
from .stats import GroupStats

# A call's owner once it has ended: never a thread's ident.
_ENDED: Any = object()


class _Telling(int):
    """The owner of a call whose thread tells its start before its loader runs.

    Equal to that thread's ident, so ``do()`` from a hook there is re-entry (it
    would wait for a loader that starts only once the hook returns); not an
    ``int`` exactly, so ``do_future()`` there, which never waits, joins.
    """

    __slots__ = ()


class _Call(Flight):
    """A flight run by a thread.

    ``owner`` is the ident of the thread running the loader (a :class:`_Telling`
    one while that thread tells the flight's start; of a detached loader: the
    thread registering it until it is handed over, then None until it starts;
    ``_ENDED`` once the call has ended: a settled call
    is never mistaken for a re-entry by a thread that got a dead thread's
    ident).  ``value`` and ``failure`` are set when the call ends, before
    anyone is woken.
    """

    __slots__ = ("event", "failure", "futures", "owner", "value")
    value: Any
    failure: Failure | None

    def __init__(self, key: object, owner: int | None) -> None:
        self.key = key
        self.dups = 0
        self.event: threading.Event | None = None
        self.futures: list[_CallFuture[Any]] | None = None
        self.owner: Any = owner


class _CallFuture(Future[V]):
    """A caller's own future: ``result()`` re-raises with the loader's traceback, not
    one grown by every earlier ``result()``."""

    _tb: TracebackType | None = None
    _joined: float | None = None  # a joiner's join time, for wait_seconds

    def result(self, timeout: float | None = None) -> V:
        error = self.exception(timeout)
        if error is not None:
            raise error.with_traceback(self._tb)
        return super().result(0)

    def _fail(self, error: Exception) -> None:
        if self.done():
            raise InvalidStateError(f"{self!r} is done")
        self._tb = error.__traceback__
        self.set_exception(error)


class _Queued:
    """A do_future() call waiting for a slot under ``max_flights`` (``on_limit="wait"``)."""

    __slots__ = ("context", "deadline", "future", "key", "load")

    def __init__(
        self, future: _CallFuture[Any], key: object, load: partial[Any], deadline: float | None
    ) -> None:
        self.future = future
        self.key = key
        self.load = load
        self.deadline = deadline
        # It acts for the caller: what a wrapping group or a tracer set in the
        # caller's context is seen by its events and its loader.
        self.context = contextvars.copy_context()


# What a queued call does once it leaves the queue: (entry, flight, event, leads it).
_Admitted = tuple[_Queued, _Call, Event | None, bool]


def _outcome(call: _Call) -> Any:
    """A waiter's outcome: the value, or an equal copy of the flight's exception."""
    failure = call.failure
    if failure is None:
        return call.value
    raise failure.copy()


def _publish(call: _Call) -> None:
    """Hand a finished call's outcome to its do_future() futures (each its own copy)."""
    failure = call.failure
    for future in call.futures or ():
        try:
            if failure is None:
                future.set_result(call.value)
            elif future._joined is None:
                future._fail(failure.own())  # the future of the caller that started it
            else:
                future._fail(failure.copy())
        except InvalidStateError:
            pass  # the caller cancelled its own future; the others still get theirs


def _not_a_coroutine(fn: Any, value: object) -> None:
    """Group runs plain functions: a loader that returned a coroutine is a usage error."""
    if type(value) is CoroutineType:
        value.close()
        raise TypeError(
            f"Group runs plain functions in threads, but {safe_repr(fn)} returned a coroutine; "
            "use AsyncGroup (or AnyIOGroup) for async functions"
        )


class Group(Generic[K, V]):
    """Coalesces concurrent calls that share a key into one execution, for threads.

    The contract of every group (the docs' *contract* page): one loader per key
    in flight, its value or exception for every caller, no result kept after it.
    Options, all optional:

    * ``executor``: runs the loaders of :meth:`do_future` (and of every flight
      when ``timeout`` is set); by default a daemon thread each.
    * ``name``, ``on_event``: label of the group's events and metrics; a callable
      given each :mod:`singleflight.events` event.
    * ``max_flights``, ``on_limit``: at most this many keys in flight; a new key
      beyond it raises :class:`TooManyFlightsError` (``"raise"``) or waits for a
      slot (``"wait"``).  Joins are never refused.
    * ``timeout``: seconds a caller waits at most, then it alone raises
      :class:`WaitTimeoutError`.

    A forked child starts with the group empty.
    """

    __slots__ = (
        "__weakref__",
        "_calls",
        "_executor",
        "_expiry",
        "_expiry_clock",
        "_lock",
        "_parked",
        "_queue",
        "_slot",
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
        self._table: Table[_Call] = Table(name, on_event, max_flights, on_limit)
        self._calls = self._table.calls
        self._executor = executor
        self.name = name
        self._timeout = timeout
        # Limits, timeouts and events take the general path; without them, do()
        # keeps its short one.
        self._slow = on_event is not None or max_flights is not None or timeout is not None
        self._fresh_locks()
        _groups.add(self)

    def _fresh_locks(self) -> None:
        # Reentrant: the GC may run a finalizer that calls the group while the
        # lock is held (every critical section tolerates that).
        self._lock = threading.RLock()
        self._slot = threading.Condition(self._lock)
        self._parked = 0  # threads waiting for a slot (on_limit="wait")
        # do_future() calls waiting for a slot, oldest first: no thread each.
        self._queue: deque[_Queued] = deque()
        # The thread failing queued calls at their deadline (timeout set), if running,
        # and what it sleeps on: a condition of its own, so that it never takes a
        # notify() meant for a thread waiting for a slot.
        self._expiry: threading.Thread | None = None
        self._expiry_clock = threading.Condition(self._lock)

    def do(self, key: K, fn: Callable[P, V], /, *args: P.args, **kwargs: P.kwargs) -> V:
        """Run ``fn(*args, **kwargs)`` as the flight of ``key``, or join the one in flight.

        Returns:
          * the loader's value, the same object for every caller.

        Raises (see the contract):
          * the loader's :class:`Exception`: itself in the thread that ran it,
            an equal copy in every other caller;
          * :class:`AbortedError` in the waiters when a ``KeyboardInterrupt`` or
            ``SystemExit`` stopped the loader (re-raised in its thread alone);
          * ``TypeError``: unhashable key or non-callable ``fn`` (before anything
            runs), or ``fn`` returned a coroutine (use ``AsyncGroup``);
          * :class:`ReentryError`: the loader called ``do`` on its own key;
          * :class:`TooManyFlightsError`, :class:`WaitTimeoutError`: see the options.

        Cancellation: a waiting ``do`` cannot be cancelled; :meth:`do_future` can.
        """
        if self._slow:
            check_fn(fn)
            ended, led = self._call(key, partial(fn, *args, **kwargs))
            failure = ended.failure
            if failure is None:
                return ended.value  # type: ignore[no-any-return]
            raise failure.own() if led else failure.copy()
        if not callable(fn):
            check_fn(fn)
        calls = self._calls
        mine: _Call | None = None
        # From the moment this caller registers a flight (``mine``) to its end,
        # any exception, an interrupt included, ends the flight (below).
        try:
            # Table.enter() and lead() written out: every call of do() takes this
            # path, and a method call is a third of its cost (see _flight.py).
            with self._lock:
                try:
                    call = calls.get(key)
                except TypeError:
                    raise bad_key(key) from None
                if call is None:
                    self._table.flights += 1
                    calls[key] = call = mine = _Call(key, get_ident())
                else:
                    event = self._join(call, perf_counter())
            if mine is None:
                event.wait()
                return _outcome(call)  # type: ignore[no-any-return]
            value = fn(*args, **kwargs)
            if type(value) is CoroutineType:
                _not_a_coroutine(fn, value)
            # Table.settle() for a value with no hook, written out (see _flight.py).
            with self._lock:
                # Go's cleanup order: out of the table before anyone sees the
                # value, and only if still ours (Table.remove() written out).
                current = calls.pop(key, None)
                if current is not call and current is not None:
                    calls[key] = current
                if dups := call.dups:
                    if dups > call.quit:  # never below 0.0: see Table.settle()
                        waited = (dups - call.quit) * perf_counter() - call.joined
                        self._table.wait_seconds += max(0.0, waited)
                    call.value, call.failure = value, None
                    call.event.set()  # type: ignore[union-attr]  # a joiner made it
            if dups and call.futures:
                _publish(call)
            return value
        except BaseException as exc:
            if mine is not None:
                self._settle(mine, None, exc)
            raise

    def do_result(
        self, key: K, fn: Callable[P, V], /, *args: P.args, **kwargs: P.kwargs
    ) -> Result[V]:
        """Like :meth:`do`, but the loader's error is returned in the :class:`Result`.

        Returns:
          * ``Result(value, None, shared)``, or ``Result(None, error, shared)``
            with the error :meth:`do` would raise for the loader.

        Raises: as :meth:`do`, for everything but the loader's error.
        """
        check_fn(fn)
        call, led = self._call(key, partial(fn, *args, **kwargs))
        failure = call.failure
        if failure is None:
            return Result(call.value, None, call.dups > 0)
        return Result(None, failure.own() if led else failure.copy(), call.dups > 0)

    def do_future(
        self, key: K, fn: Callable[P, V], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[V]:
        """Start or join the flight of ``key``; return at once with a future of its outcome.

        Go's ``DoChan``; a new flight's loader runs on the executor.  Each caller
        gets its own future, holding what :meth:`do` returns or raises.

        Raises:
          * the usage errors of :meth:`do`, and the executor's error if it
            refuses the work (the flight's other callers get it too).

        Cancellation: cancelling a future, or waiting on it with a timeout,
        affects nobody else.  With ``on_limit="wait"`` a call past ``max_flights``
        is queued (no thread); a cancelled one leaves the queue, and one still
        queued at its ``timeout`` gets :class:`WaitTimeoutError`.
        """
        check_fn(fn)
        future: _CallFuture[V] = _CallFuture()
        table = self._table
        told: Event | None = None
        admitted: list[_Admitted] | None = None
        with self._lock:
            try:
                call = table.enter(key)
            except Full as full:
                refused: Full | None = full
                if full.wait:
                    self._enqueue(future, key, partial(fn, *args, **kwargs))
                    return future
            else:
                refused = None
                now = perf_counter()
                if call is None:
                    call = _Call(key, _Telling(get_ident()))  # until _start(): see there
                    told, admitted = self._lead(call)
                else:
                    if call.owner == get_ident() and type(call.owner) is int:
                        # The loader's own thread: a future it could only wait on forever.
                        raise ReentryError(call.key)
                    told = table.join(call, now)
                    self._wait_for(call)
                    future._joined = now
                if call.futures is None:
                    call.futures = [future]
                else:
                    call.futures.append(future)
        if refused is not None:
            raise self._refuse(refused)
        assert call is not None
        if future._joined is None:
            try:
                if told is not None:
                    emit(table.hook, told)  # type: ignore[arg-type]
            except BaseException as exc:
                self._settle(call, None, exc)
                raise
            if admitted:
                self._admit(admitted)
            self._start(call, partial(fn, *args, **kwargs), None)
        else:
            future.add_done_callback(partial(self._future_left, call))
            if told is not None:
                emit(table.hook, told)  # type: ignore[arg-type]
        return future

    def forget(self, key: K) -> None:
        """Let the next call of ``key`` start a new flight (see the contract).

        The flight in progress goes on for its callers and, when it ends, leaves
        the newer one alone.
        """
        with self._lock:
            admitted = self._slot_freed() if self._table.forget(key) else None
        if admitted:
            self._admit(admitted)

    def forget_unshared(self, key: K) -> bool:
        """Forget ``key`` only if nobody joined its flight.

        Returns:
          * True if forgotten or not in flight; False if the flight is shared.
        """
        with self._lock:
            forgotten, dropped = self._table.forget_unshared(key)
            admitted = self._slot_freed() if dropped else None
        if admitted:
            self._admit(admitted)
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

    @property
    def _slot_waiters(self) -> int:
        """Callers waiting for a slot: threads and queued do_future() calls (for tests)."""
        return self._parked + len(self._queue)

    # -- the slow paths --------------------------------------------------------------

    def _refuse(self, full: Full) -> TooManyFlightsError:
        """max_flights refused a call (counted by the table): tell it, return the error."""
        if full.event is not None:
            emit(self._table.hook, full.event)  # type: ignore[arg-type]
        assert full.error is not None
        return full.error

    def _lead(self, call: _Call) -> tuple[Event | None, list[_Admitted] | None]:
        """Register a new flight (the lock is held); its start event, and the queued
        calls that join it (to finish with :meth:`_admit` once the lock is let go)."""
        told = self._table.lead(call)
        if self._parked:
            # Threads of this key waiting for a slot can join it now.
            self._slot.notify_all()
        return told, self._drain() if self._queue else None

    def _slot_freed(self) -> list[_Admitted] | None:
        """A flight left the table (the lock is held): a waiter may take its slot."""
        if self._parked:
            self._slot.notify()
        return self._drain() if self._queue else None

    def _join(self, call: _Call, now: float) -> threading.Event:
        """Join ``call`` (the lock is held) and return the event to wait on."""
        if call.owner == get_ident():
            raise ReentryError(call.key)
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

    def _call(self, key: K, load: partial[Any]) -> tuple[_Call, bool]:
        """The general path of do() and do_result() (limits, timeouts, events): the
        finished call and whether this caller started it."""
        table = self._table
        begun = monotonic()
        deadline = None if self._timeout is None else begun + self._timeout
        told: Event | None = None
        joined: float | None = None
        call: _Call | None = None
        mine: _Call | None = None
        event: threading.Event | None = None
        refused: Full | None = None
        admitted: list[_Admitted] | None = None
        try:
            with self._lock:
                while True:
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
                        self._parked += 1
                        try:
                            self._slot.wait(remaining)
                        finally:
                            self._parked -= 1
                        continue
                    if call is None:
                        # With a timeout the loader runs elsewhere and this caller
                        # waits like a joiner (not counted as one), so it can leave.
                        call = mine = _Call(key, _Telling(get_ident()))
                        told, admitted = self._lead(call)
                        # The event exists before the lock is let go (see below).
                        event = None if deadline is None else self._wait_for(call)
                    else:
                        if call.owner == get_ident():
                            raise ReentryError(key)
                        joined = perf_counter()
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
            if admitted:
                self._admit(admitted)
            if mine is not None and deadline is None:
                interrupt = self._load(call, load)
                if interrupt is not None:
                    raise interrupt
                return call, True
            if mine is not None:
                self._start(call, load, None)
        except BaseException as exc:
            if mine is not None:
                self._settle(mine, None, exc)
            elif joined is not None and call is not None:
                with self._lock:
                    table.leave(call, joined, False)
            raise
        assert event is not None
        if not event.wait(None if deadline is None else max(0.0, deadline - monotonic())):
            with self._lock:
                told = table.timed_out(key, monotonic() - begun)
                if joined is not None:
                    table.leave(call, joined, False)
            if told is not None:
                emit(table.hook, told)  # type: ignore[arg-type]
            raise WaitTimeoutError(key, self._timeout)
        return call, mine is not None

    def _future_left(self, call: _Call, future: Future[Any]) -> None:
        """A do_future() joiner's future is done: if cancelled, its caller left the flight."""
        if future.cancelled():
            joined = future._joined  # type: ignore[attr-defined]
            with self._lock:
                if call.futures is not None and future in call.futures:
                    call.futures.remove(future)
                    self._table.leave(call, joined, False)

    # -- do_future() calls queued for a slot --------------------------------------------

    def _enqueue(self, future: _CallFuture[Any], key: object, load: partial[Any]) -> None:
        """Queue a do_future() call for a slot (the lock is held)."""
        deadline = None if self._timeout is None else monotonic() + self._timeout
        entry = _Queued(future, key, load, deadline)
        self._queue.append(entry)
        future.add_done_callback(partial(self._dequeue, entry))
        if deadline is not None and self._expiry is None:
            self._expiry = threading.Thread(
                target=self._expire, name=f"singleflight {self.name} deadlines", daemon=True
            )
            self._expiry.start()

    def _dequeue(self, entry: _Queued, future: Future[Any]) -> None:
        """A queued call's future is done: cancelled, it leaves the queue."""
        if future.cancelled():
            with self._lock:
                try:
                    self._queue.remove(entry)
                except ValueError:
                    pass  # it had left the queue already

    def _drain(self) -> list[_Admitted]:
        """Queued calls that can go now, in order (the lock is held): each joins its
        key's flight, or leads a new one while slots are free."""
        table = self._table
        admitted: list[_Admitted] = []
        kept: deque[_Queued] = deque()
        can_lead = True
        while self._queue:
            entry = self._queue.popleft()
            if entry.future.done():
                continue  # cancelled
            try:
                call = table.enter(entry.key)
            except Full:
                can_lead = False
                kept.append(entry)
                continue
            if call is None:
                if not can_lead:  # first come, first served for the slots
                    kept.append(entry)
                    continue
                call = _Call(entry.key, _Telling(get_ident()))  # until _start(): see there
                told: Event | None = table.lead(call)
                lead = True
            else:
                now = perf_counter()
                told = table.join(call, now)
                self._wait_for(call)
                entry.future._joined = now
                lead = False
            if call.futures is None:
                call.futures = [entry.future]
            else:
                call.futures.append(entry.future)
            admitted.append((entry, call, told, lead))
        self._queue = kept
        return admitted

    def _admit(self, admitted: list[_Admitted]) -> None:
        """Finish what :meth:`_drain` decided, with the lock let go: tell each event and
        start each new flight's loader, in the queued caller's context."""
        hook = self._table.hook
        for entry, call, told, lead in admitted:
            if lead:
                try:
                    if told is not None:
                        entry.context.run(emit, hook, told)  # type: ignore[arg-type]
                    self._start(call, entry.load, entry.context)
                except BaseException as exc:
                    self._settle(call, None, exc)  # a no-op if _start() ended it
                    if not isinstance(exc, Exception):
                        raise
            else:
                entry.future.add_done_callback(partial(self._future_left, call))
                if told is not None:
                    entry.context.run(emit, hook, told)  # type: ignore[arg-type]

    def _expire(self) -> None:
        """The thread that fails queued do_future() calls at their deadline."""
        table = self._table
        while True:
            expired: list[tuple[_Queued, Event | None]] = []
            with self._lock:
                now = monotonic()
                for entry in list(self._queue):
                    if entry.deadline is not None and entry.deadline <= now:
                        self._queue.remove(entry)
                        told = table.timed_out(
                            entry.key, now - entry.deadline + (self._timeout or 0)
                        )
                        expired.append((entry, told))
                if not expired:
                    deadlines = [e.deadline for e in self._queue if e.deadline is not None]
                    if not deadlines:
                        self._expiry = None
                        return
                    self._expiry_clock.wait(min(deadlines) - now)
                    continue
            for entry, timed_out in expired:
                if timed_out is not None:
                    entry.context.run(emit, table.hook, timed_out)  # type: ignore[arg-type]
                try:
                    entry.future._fail(WaitTimeoutError(entry.key, self._timeout))
                except InvalidStateError:
                    pass

    # -- running loaders and ending flights ------------------------------------------------

    def _start(self, call: _Call, load: partial[Any], context: contextvars.Context | None) -> None:
        """Run a flight's loader on the executor or a daemon thread; if refused, the
        flight ends with the error, which is raised here too."""
        # The thread that registered the flight owned it while it told its start:
        # a hook there calling do() on the key gets ReentryError instead of waiting
        # for a loader that starts only once it returns.  Now the loader's thread
        # will own it (_run), and this thread may join it like any other.
        if call.owner == get_ident():
            call.owner = None
        run: Callable[..., None] = self._run
        if context is not None:
            run = partial(context.run, self._run)  # type: ignore[call-arg]
        try:
            if self._executor is None:
                threading.Thread(
                    target=run,
                    args=(call, load),
                    name=f"singleflight {safe_repr(call.key)}",
                    daemon=True,
                ).start()
            else:
                work = self._executor.submit(run, call, load)
                work.add_done_callback(partial(self._dropped, call))
        except BaseException as exc:
            self._settle(call, None, exc)
            raise

    def _run(self, call: _Call, load: partial[Any]) -> None:
        """Run a flight's loader on a worker thread (every caller waits on the call)."""
        self._load(call, load)  # an interrupt ends the flight: its callers get it

    def _load(self, call: _Call, load: partial[Any]) -> BaseException | None:
        """Run a flight's loader in this thread and end the flight with its outcome.
        Returns the interrupt (a BaseException that is no Exception) that ended it."""
        call.owner = get_ident()  # an int, no _Telling: the loader runs here now
        try:
            value = load()
            if type(value) is CoroutineType:
                _not_a_coroutine(load.func, value)
        except BaseException as exc:
            self._settle(call, None, exc)
            return None if isinstance(exc, Exception) else exc
        self._settle(call, value, None)
        return None

    def _dropped(self, call: _Call, work: Future[None]) -> None:
        """The executor cancelled a flight's work before it ran: end the flight for its callers."""
        if work.cancelled():
            self._settle(call, None, AbortedError(call.key, "the executor dropped its work"))

    def _settle(self, call: _Call, value: Any, exc: BaseException | None) -> None:
        """End ``call`` in one critical section (out of the table, outcome stored,
        threads woken), then serve its futures.  A call ended already keeps its
        outcome (an interrupted caller may end it twice)."""
        with self._lock:
            event = call.event
            if call.owner is _ENDED or (event is not None and event.is_set()):
                admitted, told = None, None
            else:
                call.owner = _ENDED
                failure, told = self._table.settle(call, exc)
                call.value, call.failure = value, failure
                if event is not None:
                    event.set()
                admitted = self._slot_freed()
        if call.futures:
            _publish(call)
        if told is not None:
            emit(self._table.hook, told)  # type: ignore[arg-type]
        if admitted:
            self._admit(admitted)

    def _after_fork(self) -> None:
        """In a forked child: no flight of the parent's is the child's; nor are its locks."""
        self._fresh_locks()
        self._calls.clear()


# Every live group, reset in a forked child.
_groups: weakref.WeakSet[Group[Any, Any]] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for group in list(_groups):
        group._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
