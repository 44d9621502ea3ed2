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
    "Event",
    "EventHook",
    "FlightAborted",
    "FlightFailed",
    "FlightFinished",
    "FlightStarted",
    "GroupStats",
    "Joined",
    "RanLocally",
    "RedisGroupStats",
    "RedisUnavailable",
    "RefreshStarted",
    "Rejected",
    "StaleServed",
    "TimedOut",
]

log = logging.getLogger("singleflight")


@dataclass(frozen=True, slots=True)
class GroupStats:
    """A group's counters since it was made (``in_flight`` is the current number of keys).

    ``calls == flights + joins``.  ``shared`` counts flights that had at least
    one joiner; ``errors`` flights whose loader raised an Exception; ``aborted``
    flights that ended without a result (BaseException, cancelled task, work
    dropped by an executor).  ``timeouts`` counts callers that stopped waiting
    at their timeout, ``rejected`` calls refused by ``max_flights``, and
    ``wait_seconds`` the time joiners spent waiting for a flight, summed.
    """

    calls: int
    flights: int
    joins: int
    shared: int
    errors: int
    aborted: int
    timeouts: int
    rejected: int
    in_flight: int
    wait_seconds: float

    @property
    def coalesced_ratio(self) -> float:
        """The fraction of calls that joined a flight instead of running the loader."""
        return self.joins / self.calls if self.calls else 0.0


@dataclass(frozen=True, slots=True)
class RedisGroupStats(GroupStats):
    """A Redis group's counters in this process: those of every group, then Redis's own.

    The fields of :class:`GroupStats`, as seen from this process:
    ``flights`` are loader runs here as leader holding the Redis lease (so
    equal to ``leads``); ``joins`` are calls that got the outcome of another
    caller's flight, in this process (a local join) or in another one
    (``hits + remote_errors``: waited for, or found stored); ``shared`` led
    flights with a joiner here or a waiter elsewhere; ``errors`` and
    ``aborted`` led flights whose loader raised, or that ended without a
    result; ``timeouts`` calls that reached ``max_wait`` or the group's
    ``timeout``; ``wait_seconds`` the time joiners here waited, for a local
    flight or on Redis.  ``rejected`` counts calls refused by
    ``max_flights`` (with ``on_limit="raise"``).  Calls that
    neither led nor joined are ``local_runs`` and, under
    ``on_redis_error="closed"``, the failed ones (``unavailable``, timeouts).

    Redis's own: ``hits`` (a value from another process's flight),
    ``leads``, ``takeovers`` (leads after waiting on a leader that vanished),
    ``waits`` (blocking reads on another process's flight), ``fenced``
    (completions refused: another leader had taken over), ``lost_leases``,
    ``resurrections`` (lapsed leases renewed again), ``remote_errors`` (an
    error from another process's loader), ``local_runs`` (loader runs without
    Redis, policy "open"), ``unavailable`` (calls failed for Redis, policy
    "closed"), ``redis_errors`` (failed Redis operations, retries included),
    ``untrusted_payloads`` (payloads that did not decode, read as misses),
    ``breaker_opens`` and ``breaker``, the breaker's state now: ``"closed"``,
    ``"open"`` or ``"half-open"``.
    """

    hits: int
    leads: int
    takeovers: int
    waits: int
    fenced: int
    lost_leases: int
    resurrections: int
    remote_errors: int
    local_runs: int
    unavailable: int
    redis_errors: int
    untrusted_payloads: int
    breaker_opens: int
    breaker: str


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
)
EventHook: TypeAlias = Callable[[Event], object]


def emit(hook: EventHook, event: Event) -> None:
    """Deliver ``event``; a hook that raises is logged, never propagated."""
    try:
        hook(event)
    except Exception:
        log.exception("singleflight: the on_event hook raised on %r", event)
