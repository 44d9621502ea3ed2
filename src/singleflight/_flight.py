"""The bookkeeping every driver shares: who leads, who joins, when a flight ends.

Nothing here knows about threads or event loops.  A *table* is a plain ``dict``
from key to :class:`Flight`; the thread driver guards it with a lock, the asyncio
driver keeps one per event loop.  The drivers inline the few lines of the hot
path (enter a flight, remove it when done) and call these helpers for the rest.
"""

from __future__ import annotations

from typing import Any, TypeVar

from .errors import AbortedError, ReentryError, safe_repr

__all__ = [
    "Flight",
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
    error = AbortedError(key, safe_repr(exc) or type(exc).__name__)
    error.__cause__ = exc
    return error


def reentry_error(key: object) -> ReentryError:
    return ReentryError(key)
