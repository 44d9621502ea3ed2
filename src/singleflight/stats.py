"""What groups and caches count: the snapshots ``stats()`` returns.

One shape: every group's :class:`GroupStats`; a Redis group's
:class:`RedisGroupStats` adds Redis's own counters; a loading cache's
:class:`CacheStats` adds the cache's counters to those of its group.  Every
field defaults to zero, so ``GroupStats()`` is a group that did nothing.
Ratios are properties, computed from the counts.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CacheStats", "GroupStats", "RedisGroupStats"]


@dataclass(frozen=True, slots=True)
class GroupStats:
    """A group's counters since it was made (``in_flight`` is the current number of keys).

    ``calls == flights + joins``.  ``shared`` counts flights that had at least
    one joiner; ``errors`` flights whose loader raised an Exception; ``aborted``
    flights that ended without a result (BaseException, cancelled task, work
    dropped by an executor).  ``timeouts`` counts callers that stopped waiting
    at their deadline, ``rejected`` calls refused by ``max_flights``, and
    ``wait_seconds`` the time joiners spent waiting for a flight, summed: for
    each joiner, from its join until it got the outcome or left.
    """

    calls: int = 0
    flights: int = 0
    joins: int = 0
    shared: int = 0
    errors: int = 0
    aborted: int = 0
    timeouts: int = 0
    rejected: int = 0
    in_flight: int = 0
    wait_seconds: float = 0.0

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

    hits: int = 0
    leads: int = 0
    takeovers: int = 0
    waits: int = 0
    fenced: int = 0
    lost_leases: int = 0
    resurrections: int = 0
    remote_errors: int = 0
    local_runs: int = 0
    unavailable: int = 0
    redis_errors: int = 0
    untrusted_payloads: int = 0
    breaker_opens: int = 0
    breaker: str = "closed"


@dataclass(frozen=True, slots=True)
class CacheStats(GroupStats):
    """Counters of a loading cache since it was made: its group's, then its own.

    The fields of :class:`GroupStats` are those of the cache's group (the
    loads and refreshes made through it and the callers that joined them; a
    group shared with other users counts their calls too), except ``calls``,
    which is the number of reads (``hits + misses``).  Batch loads
    (``load_many``) do not go through the group and are counted in ``loads``
    only.

    The cache's own: ``hits`` are reads answered from the cache, stale ones
    included; ``misses`` are reads that had to wait for a load (or for a
    batch); ``loads`` are loads run in this process that produced an outcome
    the callers got (not-found results included; a batch counts once),
    ``load_failures`` loads run in this process that raised an
    :class:`Exception` (an outcome a group that crosses processes brought from
    another one is written back, but counted in neither); ``stale_served``
    counts reads answered with an expired value (stale-while-revalidate and
    stale-if-error); ``refreshes`` counts the refreshes of stale entries and
    the calls of ``refresh()``, ``early_refreshes`` (apart from those) the
    refreshes XFetch started before expiry; ``evictions`` counts entries
    dropped by the size bound or because they expired; ``size`` is the number
    of entries held now.

    A fleet cache's (``fleet=``; zeros otherwise): ``l2_hits`` are misses
    answered by the entry in Redis, ``l2_misses`` loads this process led for
    the fleet, ``fleet_refreshes`` background refreshes it led for the fleet,
    ``invalidations_sent`` / ``invalidations_received`` the messages on the
    invalidation channel (a tag counts once), ``l1_drops`` the times the
    channel was lost and the in-process entries dropped.
    """

    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_failures: int = 0
    stale_served: int = 0
    refreshes: int = 0
    early_refreshes: int = 0
    evictions: int = 0
    size: int = 0
    l2_hits: int = 0
    l2_misses: int = 0
    fleet_refreshes: int = 0
    invalidations_sent: int = 0
    invalidations_received: int = 0
    l1_drops: int = 0

    @property
    def hit_ratio(self) -> float:
        """``hits / (hits + misses)``; 0.0 before the first read."""
        reads = self.hits + self.misses
        return self.hits / reads if reads else 0.0
