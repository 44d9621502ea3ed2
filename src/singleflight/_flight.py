"""The flight state machine every driver shares; sans-I/O.

Who leads, joins or is refused, who gets which outcome, when a key leaves its
table, what is counted and which event is told: all decided here.  Nothing here
blocks, waits or calls user code; a driver asks a :class:`Table`, then waits,
wakes and tells (``emit``) itself, outside any lock it holds.  A table is not
thread-safe: ``Group`` guards its one table with a lock; the event-loop groups
keep one per loop (:mod:`._loops`).  The drivers' hot paths write out the few
lines of a method here where the call shows in ``benchmarks/bench_core.py``,
and say so where they do.  For instance, :meth:`Table.join` written out in
``AsyncGroup`` for a second or later joiner: 64,301 -> 63,589 CPU instructions
a waiter of join-and-wake on Python 3.12 (1.208x -> 1.194x its floor; the
target is 1.2x), counted by ``python benchmarks/bench_core.py --callgrind``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from time import perf_counter
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar

from .errors import AbortedError, ReentryError, TooManyFlightsError, safe_repr
from .events import (
    Event,
    EventHook,
    FlightAborted,
    FlightFailed,
    FlightFinished,
    FlightStarted,
    Joined,
    Rejected,
    TimedOut,
)
from .stats import GroupStats

F = TypeVar("F", bound="Flight")

# Flight ids in events: one counter for every group and driver, so an id is
# never reused, and ids grow in the order flights start.
new_flight_id = itertools.count(1).__next__


class Flight:
    """One execution of a loader: the part of its record the state machine reads.

    Drivers subclass it with how their callers wait.  Fields, who writes them, when:

    * ``key``: the flight's key; set once, when the driver makes the record.
    * ``dups``: callers that joined after the leader (Go's ``dups``); written
      by :meth:`Table.join` while the flight is in its table, so it is final once
      :meth:`Table.settle` has removed it, before any caller sees the outcome.
    * ``quit``, ``joined``: the joiners that stopped waiting early and the sum of
      the join times of those still waiting, for ``wait_seconds``; set by the
      first :meth:`Table.join` (read only when ``dups > 0``), written by
      :meth:`Table.leave`.  A join writes two fields here (and the table's
      ``joins``): the join is the hot path of ``benchmarks/bench_core.py``'s
      join-and-wake.
    * ``left``: callers (the leader included) that stopped waiting, by
      :meth:`Table.leave`; all of them have left once ``left > dups``.
    * ``told``: the flight's id in events and its start time, one slot (a
      parked flight's size is benchmarked); set by :meth:`Table.lead` only when
      the group has an ``on_event`` hook (there are no events otherwise).
    * ``awaits``: the flight this flight's loader waits on, if it waits in a
      call of the same group (event-loop drivers, for :func:`cycle_error`); set
      by the driver while that wait lasts.
    """

    __slots__ = ("awaits", "dups", "joined", "key", "left", "quit", "told")

    key: Any
    dups: int
    awaits: Flight | None
    quit: int
    joined: float
    left: int
    told: tuple[int, float]

    @property
    def shared(self) -> bool:
        return self.dups > 0


# A table's counters, as GroupStats names them.
COUNTERS = (
    "flights",
    "joins",
    "shared",
    "errors",
    "aborted",
    "timeouts",
    "rejected",
    "wait_seconds",
)


class Full(Exception):
    """Internal: ``max_flights`` reached.  ``wait``: wait for a slot and retry; otherwise
    the refusal is counted and the driver tells ``event`` (if any) and raises ``error``."""

    def __init__(self, wait: bool, error: TooManyFlightsError | None, event: Event | None) -> None:
        self.wait = wait
        self.error = error
        self.event = event


class Table(Generic[F]):
    """The flights of one group (or of one event loop of it) and their counters."""

    __slots__ = (
        "aborted",
        "calls",
        "errors",
        "flights",
        "hook",
        "joins",
        "loaders",
        "max_flights",
        "name",
        "on_limit",
        "rejected",
        "shared",
        "timeouts",
        "wait_seconds",
    )

    def __init__(
        self,
        name: str,
        hook: EventHook | None,
        max_flights: int | None = None,
        on_limit: Literal["raise", "wait"] = "raise",
    ) -> None:
        self.calls: dict[Any, F] = {}  # key -> its flight in progress
        # What identifies a running loader (its task, or its coroutine's id) -> its
        # flight: tells a caller which flight, if any, its own task is the loader of.
        self.loaders: dict[Any, F] = {}
        self.name = name
        self.hook = hook  # read to decide whether events are made; never called here
        self.max_flights = max_flights
        self.on_limit = on_limit
        self.flights = self.shared = self.errors = self.aborted = 0
        self.timeouts = self.rejected = 0
        # A float holding a whole number (exact up to 2**53): an int above 256 is
        # a new object at every join; stats() reports an int.
        self.joins = 0.0
        self.wait_seconds = 0.0

    # -- entering --------------------------------------------------------------------

    def enter(self, key: object) -> F | None:
        """The flight of ``key`` to join, or None: the caller is to lead one.

        Raises TypeError for an unhashable key and :class:`Full` when a new
        flight would pass ``max_flights`` (a refusal is counted here).
        """
        try:
            flight = self.calls.get(key)
        except TypeError:
            raise bad_key(key) from None
        limit = self.max_flights
        if flight is None and limit is not None and len(self.calls) >= limit:
            if self.on_limit == "wait":
                raise Full(True, None, None)
            self.rejected += 1
            event = None if self.hook is None else Rejected(self.name, key, len(self.calls))
            raise Full(False, TooManyFlightsError(key, limit), event)
        return flight

    def lead(self, flight: F) -> FlightStarted | None:
        """Register a new flight (after :meth:`enter` returned None); its start event."""
        self.calls[flight.key] = flight
        self.flights += 1
        if self.hook is None:
            return None
        flight.told = told = (new_flight_id(), perf_counter())
        return FlightStarted(self.name, flight.key, told[0])

    def join(self, flight: F, now: float) -> Joined | None:
        """Count a caller joining ``flight`` at ``now``; its event."""
        if not flight.dups:
            self.shared += 1
            flight.quit = 0
            flight.joined = 0.0
        flight.dups += 1
        self.joins += 1.0
        flight.joined += now
        return None if self.hook is None else Joined(self.name, flight.key, flight.told[0])

    # -- leaving early -----------------------------------------------------------------

    def leave(self, flight: F, joined: float | None, cancel_orphaned: bool) -> bool:
        """A caller stopped waiting before the outcome (cancelled, timed out).

        ``joined`` is its join time (None for the leader: only joiners' waits
        count in ``wait_seconds``).  Returns True when the loader is to be
        cancelled: ``cancel_orphaned`` and every caller has left.  The flight is
        then removed from the table first, so that a caller arriving after this
        starts a new flight instead of joining one being cancelled.
        """
        if joined is not None:
            flight.quit += 1
            flight.joined -= joined
            self.wait_seconds += perf_counter() - joined
        flight.left = getattr(flight, "left", 0) + 1
        if not cancel_orphaned or flight.left <= flight.dups:
            return False
        self.remove(flight)
        return True

    def timed_out(self, key: object, waited: float) -> TimedOut | None:
        """Count a caller that left at its ``timeout``; its event."""
        self.timeouts += 1
        return None if self.hook is None else TimedOut(self.name, key, waited)

    # -- ending -----------------------------------------------------------------------

    def remove(self, flight: F) -> bool:
        """Remove ``flight``'s key only while it still maps to ``flight``; True if it did.

        After ``forget`` the key may map to a newer flight, which an older one
        must leave alone (Go issue 31420).  A key whose ``__eq__`` (or
        ``__hash__``) raises now is found by identity instead: the flight must
        end for its callers whatever its key does.
        """
        calls = self.calls
        try:
            current = calls.pop(flight.key, None)
        except Exception:
            kept = [(k, f) for k, f in calls.items() if f is not flight]
            if len(kept) == len(calls):
                return False
            calls.clear()
            for k, f in kept:
                try:
                    calls[k] = f
                except Exception:
                    pass  # its key fails too: that flight runs on unlisted
            return True
        if current is flight:
            return True
        if current is not None:
            self.calls[flight.key] = current
        return False

    def settle(
        self, flight: F, exc: BaseException | None, cancelled: bool = False
    ) -> tuple[Failure | None, Event | None]:
        """The loader of ``flight`` ended, returning (``exc`` None), raising ``exc``, or
        (``cancelled``) as a cancelled task.

        Returns what the callers get instead of the value (a :class:`Failure`
        of :func:`waiter_error`; None for the value) and the end event (None
        without a hook).  The caller then wakes the waiters; a slot under
        ``max_flights`` may have freed (wake a slot waiter either way: a spurious
        wake costs a retry, never a slot).
        """
        # Go's cleanup order: the key leaves the table here, before the driver
        # hands the outcome to any caller, so a call that sees the outcome and
        # calls again starts a new flight.  Only if it is still this flight's.
        self.remove(flight)
        key = flight.key
        error: Exception | None
        if cancelled:
            error = AbortedError(key, "its loader task was cancelled")
            error.__cause__ = exc
        else:
            error = None if exc is None else waiter_error(key, exc)
        aborted = isinstance(error, AbortedError)
        if aborted:
            self.aborted += 1
        elif error is not None:
            self.errors += 1
        dups = flight.dups
        now = perf_counter()
        if dups and dups > flight.quit:  # dups is final: only joined while the key was in the table
            # Never below 0.0: the join times less those of the joiners that left
            # are not exactly 0.0 in floats.
            self.wait_seconds += max(0.0, (dups - flight.quit) * now - flight.joined)
        failure = None if error is None else Failure(error)
        if self.hook is None:
            return failure, None
        fid, started = flight.told
        duration = now - started
        if error is None:
            return None, FlightFinished(self.name, key, fid, duration, dups + 1)
        if aborted:
            cause = None if exc is error else exc  # a cancelled asyncio task has none
            return failure, FlightAborted(self.name, key, fid, duration, dups + 1, cause)
        return failure, FlightFailed(self.name, key, fid, duration, dups + 1, error)

    # -- forgetting and counting ---------------------------------------------------------

    def forget(self, key: object) -> bool:
        """Drop ``key``'s flight so the next call starts a new one; True if one was dropped.

        Its callers still get its outcome; a slot under ``max_flights`` frees now.
        """
        return self.calls.pop(key, None) is not None

    def forget_unshared(self, key: object) -> tuple[bool, bool]:
        """Forget ``key`` only if nobody joined its flight: (forgotten or absent, dropped)."""
        flight = self.calls.get(key)
        if flight is None:
            return True, False
        if flight.dups:
            return False, False
        del self.calls[key]
        return True, True

    def add_to(self, totals: Table[Any]) -> None:
        """Fold these counters into ``totals`` (a loop is gone; its counts are not)."""
        for name in COUNTERS:
            setattr(totals, name, getattr(totals, name) + getattr(self, name))


def stats(tables: Iterable[Table[Any]]) -> GroupStats:
    """The counters of ``tables`` summed (one group's tables: its loops', retired ones')."""
    tables = list(tables)
    sums = {name: sum(getattr(t, name) for t in tables) for name in COUNTERS}
    sums["joins"] = int(sums["joins"])
    return GroupStats(
        calls=sums["flights"] + sums["joins"],
        in_flight=sum(len(t.calls) for t in tables),
        **sums,
    )


class Failure:
    """How a flight failed, as it was when its loader ended: what each caller raises.

    The caller that started the flight gets the loader's exception itself
    (:meth:`own`); every other caller an equal copy of its own (:meth:`copy`):
    same type, ``args`` and attributes, the loader's traceback, ``__cause__``,
    ``__context__`` and ``__suppress_context__`` as the loader left them.
    Raising an exception inside an ``except`` block rewrites its ``__context__``
    and grows its traceback; with a copy each, no caller's handling changes what
    another caller sees.  An exception that cannot be copied (its class cannot be
    made again from its ``args``) is shared as it is.
    """

    __slots__ = ("cause", "context", "error", "notes", "suppress", "tb")

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.tb: TracebackType | None = error.__traceback__
        self.cause = error.__cause__
        self.context = error.__context__
        self.suppress = error.__suppress_context__
        # As the loader left them: the first caller may add its own before a
        # waiter makes its copy.
        notes = getattr(error, "__notes__", None)
        self.notes: list[Any] | None = list(notes) if isinstance(notes, list) else None

    def own(self) -> Exception:
        """The loader's exception itself, with the traceback the loader left."""
        return self.error.with_traceback(self.tb)

    def copy(self) -> Exception:
        """An equal copy for one caller (the original if it cannot be copied)."""
        error = self.error
        try:
            dup = copy.copy(error)
            if type(dup) is not type(error) or dup.args != error.args:
                return self.own()
        except Exception:
            return self.own()
        dup.__cause__ = self.cause
        dup.__context__ = self.context
        dup.__suppress_context__ = self.suppress
        if self.notes is not None:
            dup.__notes__ = list(self.notes)
        elif "__notes__" in getattr(dup, "__dict__", ()):
            del dup.__notes__  # added by a caller after the loader raised
        return dup.with_traceback(self.tb)


def waiter_error(key: object, exc: BaseException) -> Exception:
    """What a waiting caller raises when the loader raised ``exc``.

    An :class:`Exception` reaches every caller (each waiter as an equal copy:
    see :class:`Failure`).  Anything else
    (``KeyboardInterrupt``, ``SystemExit``, a cancelled task) belongs to the
    leader alone: waiters get an :class:`AbortedError` caused by it, so one
    interrupted thread or task never interrupts the others.
    """
    if isinstance(exc, Exception):
        return exc
    error = AbortedError(key, safe_repr(exc) or type(exc).__name__)
    error.__cause__ = exc
    return error


def cycle_error(flight: Flight, own: Flight) -> ReentryError | None:
    """The loader of ``own`` is about to wait on ``flight``: the error if that closes a
    cycle of loaders waiting on each other (``flight`` is ``own``, or its loader waits,
    directly or through others, on ``own``); None otherwise."""
    cycle = [own.key]
    current: Flight | None = flight
    while current is not None and len(cycle) <= 1000:
        cycle.append(current.key)
        if current is own:
            return ReentryError(flight.key, tuple(cycle))
        current = current.awaits
    return None


def check_fn(fn: object) -> None:
    """Every driver, every call, before anything is registered, counted or told."""
    if not callable(fn):
        raise TypeError(f"fn must be callable; got {type(fn).__name__} {safe_repr(fn)}")


def bad_key(key: object) -> TypeError:
    return TypeError(
        f"singleflight keys must be hashable; got {type(key).__name__} {safe_repr(key)}"
    )


def not_awaitable(driver: str, fn: object, returned: object) -> TypeError:
    """``fn`` of an async group returned something a task cannot await."""
    return TypeError(
        f"{driver} needs fn to be an async function or to return an awaitable; "
        f"{safe_repr(fn)} returned {type(returned).__name__}"
    )


def loader_timed_out(key: object, seconds: float) -> TimeoutError:
    """What every caller of a flight stopped by ``loader_timeout`` raises."""
    return TimeoutError(f"the loader of key {safe_repr(key)} ran past loader_timeout={seconds}s")
