"""What groups and caches report: counters (``stats()``) and typed events (``on_event=``).

Events are plain frozen records, delivered synchronously to the ``on_event``
callable in the thread or task where they happen, after the group's lock is
released.  A hook that raises is logged (logger ``singleflight``) and
otherwise ignored: a broken metrics exporter must not break loads.

``flight`` in an event is an identifier of one flight, equal in its
``FlightStarted``, ``Joined`` and final event (to link a joiner's span to its
leader's, say); it may be reused once the flight is over.

Redis groups (:mod:`singleflight.redis`) tell the same events from their
process, and two of their own: :class:`RanLocally` and :class:`RedisUnavailable`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "CacheHit",
    "CacheMiss",
    "CacheRemoved",
    "Event",
    "EventHook",
    "FlightAborted",
    "FlightFailed",
    "FlightFinished",
    "FlightStarted",
    "Joined",
    "RanLocally",
    "RedisUnavailable",
    "RefreshStarted",
    "Rejected",
    "StaleServed",
    "TimedOut",
]

log = logging.getLogger("singleflight")


@dataclass(frozen=True, slots=True)
class FlightStarted:
    """A caller became a leader: the loader of ``key`` starts."""

    group: str
    key: object
    flight: int


@dataclass(frozen=True, slots=True)
class Joined:
    """A caller joined the flight of ``key`` in progress."""

    group: str
    key: object
    flight: int


@dataclass(frozen=True, slots=True)
class FlightFinished:
    """The loader returned; ``callers`` is how many callers the flight had."""

    group: str
    key: object
    flight: int
    duration: float
    callers: int


@dataclass(frozen=True, slots=True)
class FlightFailed:
    """The loader raised ``error`` (an Exception), which every caller gets."""

    group: str
    key: object
    flight: int
    duration: float
    callers: int
    error: BaseException


@dataclass(frozen=True, slots=True)
class FlightAborted:
    """The flight ended without a result; its waiters get AbortedError caused by ``cause``."""

    group: str
    key: object
    flight: int
    duration: float
    callers: int
    cause: BaseException | None


@dataclass(frozen=True, slots=True)
class TimedOut:
    """A caller stopped waiting for ``key`` after ``waited`` seconds; the flight goes on."""

    group: str
    key: object
    waited: float


@dataclass(frozen=True, slots=True)
class Rejected:
    """A call for a new key was refused: ``in_flight`` flights were open (``max_flights``)."""

    group: str
    key: object
    in_flight: int


@dataclass(frozen=True, slots=True)
class RanLocally:
    """A Redis group ran the loader of ``key`` here without the lease (``on_redis_error="open"``).

    ``reason`` is ``"unavailable"`` (Redis failed past the retry budget:
    ``error``), ``"circuit open"`` (the breaker skips Redis) or ``"timeout"``
    (``max_wait`` passed; a :class:`TimedOut` came first).  Such a run is no
    flight of the group: other processes may load the key at the same time.
    """

    group: str
    key: object
    reason: str
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class RedisUnavailable:
    """A Redis group under ``on_redis_error="closed"`` raised RedisUnavailableError for ``key``.

    ``reason`` is ``"unavailable"`` (Redis failed past the retry budget:
    ``error``) or ``"circuit open"``.
    """

    group: str
    key: object
    reason: str
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class CacheHit:
    """A cache answered ``key`` from a fresh entry."""

    cache: str
    key: object


@dataclass(frozen=True, slots=True)
class CacheMiss:
    """A cache had no usable entry for ``key``; the caller waits for a load."""

    cache: str
    key: object


@dataclass(frozen=True, slots=True)
class StaleServed:
    """A cache answered ``key`` with an expired value (stale-while-revalidate or stale-if-error)."""

    cache: str
    key: object
    age: float


@dataclass(frozen=True, slots=True)
class RefreshStarted:
    """A cache started a background refresh of ``key``; ``early`` for a probabilistic one."""

    cache: str
    key: object
    early: bool


@dataclass(frozen=True, slots=True)
class CacheRemoved:
    """A cache removed the entry of ``key``.

    ``reason`` is ``"size"`` (evicted for room under ``maxsize``),
    ``"expired"`` (past its lifetime and windows; dropped when read),
    ``"invalidated"`` (``invalidate``, ``clear``, or an instance that no longer
    exists) or ``"replaced"`` (a newer outcome took its place, or a newer
    outcome the cache does not store dropped it).
    """

    cache: str
    key: object
    reason: str


Event: TypeAlias = (
    FlightStarted
    | Joined
    | FlightFinished
    | FlightFailed
    | FlightAborted
    | TimedOut
    | Rejected
    | RanLocally
    | RedisUnavailable
    | CacheHit
    | CacheMiss
    | StaleServed
    | RefreshStarted
    | CacheRemoved
)
EventHook: TypeAlias = Callable[[Event], object]


def emit(hook: EventHook, event: Event) -> None:
    """Deliver ``event``; a hook that raises is logged, never propagated."""
    try:
        hook(event)
    except Exception:
        log.exception("singleflight: the on_event hook raised on %r", event)
