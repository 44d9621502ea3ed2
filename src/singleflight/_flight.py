"""The bookkeeping every driver shares: who leads, who joins, when a flight ends.

Nothing here knows about threads or event loops.  A *table* is a plain ``dict``
from key to :class:`Flight`; the thread driver guards it with a lock, the asyncio
driver keeps one per event loop.  The drivers inline the few lines of the hot
path (enter a flight, remove it when done) and call these helpers for the rest.
"""

from __future__ import annotations

from typing import Any, TypeVar

from ._result import AbortedError

__all__ = [
    "Flight",
    "check_name",
    "check_options",
    "forget",
    "forget_unshared",
    "remove",
    "reentry_error",
    "waiter_error",
]

K = TypeVar("K")
F = TypeVar("F", bound="Flight")


class Flight:
    """One execution of a loader and everything its callers need to know of it.

    ``dups`` counts the callers that joined after the leader (Go's ``dups``); it
    only grows while the flight is in its table, so it is final once the flight
    has been removed, which always happens before any caller sees the outcome.
    """

    __slots__ = ("dups",)

    dups: int

    @property
    def shared(self) -> bool:
        return self.dups > 0


def remove(table: dict[Any, F], key: object, flight: F) -> None:
    """Remove ``key`` only while it still maps to ``flight``.

    After ``forget`` the key may map to a newer flight; an older flight finishing
    must leave that one alone (Go issue 31420).  Popping first costs one hash
    lookup on the common path; the newer flight is put back in the rare one.
    """
    current = table.pop(key, None)
    if current is not flight and current is not None:
        table[key] = current


def forget(table: dict[Any, Any], key: object) -> None:
    """Drop ``key``'s flight so the next call starts a new one; its callers still get it."""
    table.pop(key, None)


def forget_unshared(table: dict[Any, F], key: object) -> bool:
    """Forget ``key`` only if nobody joined its flight; true if forgotten or absent."""
    flight = table.get(key)
    if flight is None:
        return True
    if flight.dups:
        return False
    del table[key]
    return True


def waiter_error(key: object, exc: BaseException) -> Exception:
    """What a waiting caller raises when the loader raised ``exc``.

    An :class:`Exception` reaches every caller as the same object.  Anything else
    (``KeyboardInterrupt``, ``SystemExit``, a cancelled task) belongs to the
    leader alone: waiters get an :class:`AbortedError` caused by it, so one
    interrupted thread or task never interrupts the others.
    """
    if isinstance(exc, Exception):
        return exc
    error = AbortedError(key, repr(exc) or type(exc).__name__)
    error.__cause__ = exc
    return error


def reentry_error(key: object) -> RuntimeError:
    return RuntimeError(
        f"the loader of key {key!r} called do() on its own key from the thread or task "
        "that runs it; it would wait for itself forever (Go deadlocks here)"
    )


def check_options(
    name: object,
    on_event: object,
    max_flights: object,
    on_limit: object,
    timeout: object,
) -> None:
    """Validate the options every group takes, with errors that say what to pass instead."""
    check_name(name)
    if on_event is not None and not callable(on_event):
        raise TypeError(f"on_event must be a callable taking one event; got {on_event!r}")
    if max_flights is not None and (
        isinstance(max_flights, bool) or not isinstance(max_flights, int) or max_flights < 1
    ):
        raise ValueError(f"max_flights must be a positive int or None; got {max_flights!r}")
    if on_limit not in ("raise", "wait"):
        raise ValueError(f'on_limit must be "raise" or "wait"; got {on_limit!r}')
    check_seconds("timeout", timeout)


def check_name(name: object) -> None:
    """A group's or cache's name labels its events and metrics: a non-empty str."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str; got {name!r}")
    if not name:
        raise ValueError(
            f"name must be a non-empty str (it labels events and metrics); got {name!r}: "
            'pass a name such as name="users"'
        )


def check_seconds(option: str, seconds: object) -> None:
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0
    ):
        raise ValueError(f"{option} must be a positive number of seconds or None; got {seconds!r}")
