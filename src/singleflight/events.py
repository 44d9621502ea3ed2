"""What groups and caches report as typed events to their ``on_event`` hook.

Frozen records, delivered synchronously after the group's lock is released;
a hook that raises is logged (logger ``singleflight``) and ignored.  ``flight``
is the same in a flight's ``FlightStarted``, ``Joined`` and final event (it may
be reused once the flight is over).  When each is told: the docs, In production, Events.
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
    "InvalidationReceived",
    "Joined",
    "L1Dropped",
    "RanLocally",
    "RedisUnavailable",
    "RefreshStarted",
    "Rejected",
    "StaleServed",
    "TimedOut",
]

log = logging.getLogger("singleflight")


@dataclass(frozen=True, slots=True)
class _KeyEvent:
    group: str
    key: object


@dataclass(frozen=True, slots=True)
class _FlightEvent(_KeyEvent):
    flight: int


@dataclass(frozen=True, slots=True)
class _FlightEnd(_FlightEvent):
    duration: float
    callers: int


@dataclass(frozen=True, slots=True)
class FlightStarted(_FlightEvent):
    """A caller became a leader: the loader of ``key`` starts."""


@dataclass(frozen=True, slots=True)
class Joined(_FlightEvent):
    """A caller joined the flight of ``key`` in progress."""


@dataclass(frozen=True, slots=True)
class FlightFinished(_FlightEnd):
    """The loader returned; ``callers`` is how many callers the flight had."""


@dataclass(frozen=True, slots=True)
class FlightFailed(_FlightEnd):
    """The loader raised ``error`` (an Exception), which every caller gets."""

    error: BaseException


@dataclass(frozen=True, slots=True)
class FlightAborted(_FlightEnd):
    """The flight ended without a result; its waiters get AbortedError caused by ``cause``."""

    cause: BaseException | None


@dataclass(frozen=True, slots=True)
class TimedOut(_KeyEvent):
    """A caller stopped waiting for ``key`` after ``waited`` seconds; the flight goes on."""

    waited: float


@dataclass(frozen=True, slots=True)
class Rejected(_KeyEvent):
    """A call for a new key was refused: ``in_flight`` flights were open (``max_flights``)."""

    in_flight: int


@dataclass(frozen=True, slots=True)
class _RedisFallback(_KeyEvent):
    reason: str
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class RanLocally(_RedisFallback):
    """A Redis group ran the loader of ``key`` here without the lease (``on_redis_error="open"``).

    ``reason`` is ``"unavailable"`` (Redis failed past the retry budget:
    ``error``), ``"circuit open"`` (the breaker skips Redis) or ``"timeout"``
    (``max_wait`` passed; a :class:`TimedOut` came first).  Such a run is no
    flight of the group: other processes may load the key at the same time.
    """


@dataclass(frozen=True, slots=True)
class RedisUnavailable(_RedisFallback):
    """A Redis group under ``on_redis_error="closed"`` raised RedisUnavailableError for ``key``.

    ``reason`` is ``"unavailable"`` (Redis failed past the retry budget:
    ``error``) or ``"circuit open"``.
    """


@dataclass(frozen=True, slots=True)
class _CacheEvent:
    cache: str
    key: object


@dataclass(frozen=True, slots=True)
class CacheHit(_CacheEvent):
    """A cache answered ``key`` from a fresh entry."""


@dataclass(frozen=True, slots=True)
class CacheMiss(_CacheEvent):
    """A cache had no usable entry for ``key``; the caller waits for a load."""


@dataclass(frozen=True, slots=True)
class StaleServed(_CacheEvent):
    """A cache answered ``key`` with an expired value (stale-while-revalidate or stale-if-error)."""

    age: float


@dataclass(frozen=True, slots=True)
class RefreshStarted(_CacheEvent):
    """A cache started a background refresh of ``key``; ``early`` for a probabilistic one."""

    early: bool


@dataclass(frozen=True, slots=True)
class InvalidationReceived:
    """A fleet cache (``fleet=``) got another process's invalidation: ``kind`` is
    ``"key"`` (``name`` is the key's Redis text: an ``invalidate`` or ``put``),
    ``"tag"`` (``name`` is the tag) or ``"clear"`` (``name`` is empty).  Told
    on the thread of the invalidation channel, after the entries are dropped."""

    cache: str
    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class L1Dropped:
    """A fleet cache lost its invalidation channel: every in-process entry
    (``entries`` of them) was dropped, and none is kept until it is subscribed
    again.  Told on the thread of the invalidation channel."""

    cache: str
    entries: int


@dataclass(frozen=True, slots=True)
class CacheRemoved(_CacheEvent):
    """A cache removed the entry of ``key``.

    ``reason`` is ``"size"`` (evicted for room under ``maxsize``),
    ``"expired"`` (past its lifetime and windows; dropped when read),
    ``"invalidated"`` (``invalidate``, ``clear``, or an instance that no longer
    exists) or ``"replaced"`` (a newer outcome took its place, or a newer
    outcome the cache does not store dropped it).
    """

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
    | InvalidationReceived
    | L1Dropped
    | CacheRemoved
)
EventHook: TypeAlias = Callable[[Event], object]


def emit(hook: EventHook, event: Event) -> None:
    """Deliver ``event``; a hook that raises is logged, never propagated."""
    try:
        hook(event)
    except Exception:
        log.exception("singleflight: the on_event hook raised on %r", event)
