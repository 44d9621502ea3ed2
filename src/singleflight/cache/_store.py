"""The bookkeeping of one loading cache: entries, leases, batches, counters.

Plain code with no locks, threads or event loops: a driver holds its lock
around every method here.  Only the hit path reads ``data`` without the lock
(one dict lookup, atomic for a dict), which is why an entry is never changed
after it is published except for its counters and ``refreshing`` flag: a new
outcome is a new :class:`Entry`.

Leases (Facebook's memcache leases; Caffeine discards a refresh on a write):
a load takes a token for its key when it starts, and its outcome is written
only if the token is still the key's.  ``invalidate``, ``clear``, ``put`` and
``refresh`` revoke the key's token, and a newer load replaces it, so a load
that started before any of those still answers its own callers but never
writes an outdated value over the cache's state.

Write-back (groups that cross processes): such a group may answer a caller
with a value loaded in another process, without running the cache's load
here.  The caller :meth:`Store.hold`\\ s the key's lease before calling the
group (sharing the lease of a load already in flight, or taking a new one) and
:meth:`Store.landed` writes the outcome with it afterwards.  A load run here
replaces the lease when it starts, so its own write is the only one; an
outcome from elsewhere finds the held lease and the first caller to land
writes it; an ``invalidate`` or ``put`` meanwhile revokes it, so nobody does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from itertools import count
from typing import Any, Final, Generic

from .._protocols import K
from ..stats import CacheStats
from ._policy import EARLY, FRESH, MISS, STALE, Entry, Policy

# What a driver does after a lookup.
SERVE: Final = 0  # answer from the entry
REFRESH: Final = 1  # answer from the entry and start a background refresh of it
LOAD: Final = 2  # load through the group (the entry, if any, may stand in on failure)
JOIN: Final = 3  # wait for the batch load that has this key

# How many entries read since the evictor last saw them get a second chance
# per eviction: bounds an eviction's cost when every entry is hot.
_SECOND_CHANCES: Final = 8


@dataclass(slots=True)
class Plan(Generic[K]):
    """What a bulk read does with each key (see :meth:`Store.plan_many`)."""

    served: dict[K, Entry]
    refresh: list[tuple[K, Entry]]
    load: list[K]  # keys the new batch loads
    tokens: dict[K, int]  # their leases
    join: dict[K, Any]  # key -> the batch already loading it
    single: dict[K, Entry | None]  # key -> the entry seen; loaded through the group


class Store(Generic[K]):
    """Entries with a size bound, leases, the batch registry and the counters."""

    __slots__ = (
        "_tokens",
        "batches",
        "data",
        "early_refreshes",
        "evictions",
        "forced",
        "frozen",
        "holders",
        "leases",
        "load_failures",
        "loads",
        "maxsize",
        "misses",
        "policy",
        "refreshes",
        "removed",
        "retired_hits",
        "stale_served",
        "tell",
    )

    def __init__(self, policy: Policy, maxsize: int | None) -> None:
        self.policy = policy
        self.maxsize = maxsize
        self.data: OrderedDict[K, Entry] = OrderedDict()
        self.leases: dict[K, int] = {}
        self.forced: set[K] = set()
        # Set while the entries cannot be trusted (a fleet cache that lost its
        # invalidation channel): nothing is written.
        self.frozen = False
        # token -> callers holding it (tokens granted by hold() only).
        self.holders: dict[int, int] = {}
        # key -> the driver's handle of the batch load that has it in flight.
        self.batches: dict[K, Any] = {}
        self._tokens = count(1)
        self.retired_hits = 0.0  # a float, as Entry.hits
        self.misses = 0
        self.loads = 0
        self.load_failures = 0
        self.stale_served = 0
        self.refreshes = 0
        self.early_refreshes = 0
        self.evictions = 0
        # With ``tell`` (a cache with on_event), entries removed as (key, reason),
        # for the driver to tell once it has released its lock.
        self.tell = False
        self.removed: list[tuple[K, str]] = []

    # -- reads ---------------------------------------------------------------------

    def lookup(self, key: K, now: float, background: bool) -> tuple[int, Entry | None, Any]:
        """Decide a read of ``key``: ``(action, entry, batch)``, counting it.

        ``entry`` is what SERVE and REFRESH answer from, and what LOAD and JOIN
        may fall back on if the load fails; ``batch`` is the batch to JOIN.
        """
        entry = self.data.get(key)
        if entry is not None:
            action = self._read(key, entry, now, background)
            if action != LOAD:
                return action, entry, None
            if self.policy.dead(entry, now):
                self._drop(key, entry, "expired")
                self.evictions += 1
                entry = None
        self.misses += 1
        batch = self.batches.get(key)
        if batch is not None:
            return JOIN, entry, batch
        return LOAD, entry, None

    def _read(self, key: K, entry: Entry, now: float, background: bool) -> int:
        state = self.policy.state(entry, now, background)
        if state == MISS:
            return LOAD
        entry.hits += 1.0
        if state == FRESH:
            return SERVE
        if state == STALE:
            self.stale_served += 1
            if entry.refreshing:
                return SERVE
            self.refreshes += 1
        else:
            assert state == EARLY
            self.early_refreshes += 1
        entry.refreshing = True
        return REFRESH

    def stand_in(self, key: K, now: float) -> Entry | None:
        """The entry a failed load's caller gets instead of the error (stale-if-error)."""
        entry = self.data.get(key)
        if entry is not None and self.policy.can_stand_in(entry, now):
            self.stale_served += 1
            return entry
        return None

    def plan_many(self, keys: Iterable[K], now: float, background: bool, batch: Any) -> Plan[K]:
        """Decide a bulk read.  With ``batch`` (a handle), misses nobody is loading go to it.

        A miss whose key a batch is loading joins that batch; one whose key has a
        load in flight (a lease) is loaded through the group, which joins it;
        the others are registered under ``batch`` with a lease each.
        """
        plan: Plan[K] = Plan({}, [], [], {}, {}, {})
        for key in keys:
            action, entry, other = self.lookup(key, now, background)
            if action in (SERVE, REFRESH):
                assert entry is not None
                plan.served[key] = entry
                if action == REFRESH:
                    plan.refresh.append((key, entry))
            elif action == JOIN:
                plan.join[key] = other
            elif batch is None or key in self.leases:
                plan.single[key] = entry
            else:
                plan.load.append(key)
                plan.tokens[key] = self._grant(key)
                self.batches[key] = batch
        return plan

    # -- loads ---------------------------------------------------------------------

    def begin_load(self, key: K, seen: Entry | None, now: float) -> tuple[Entry | None, Any, int]:
        """A load of ``key`` is about to start: ``(entry, batch, token)``.

        Checks the cache again first (groupcache): if a usable entry other than
        ``seen`` (the one the caller found wanting) was written meanwhile, the
        load is not needed and that entry is returned.  If a batch is loading
        the key, the load waits for it instead.  Otherwise the load takes a
        lease and gets its token.  A :meth:`force`\\ d key skips the check.
        """
        if key in self.forced:
            self.forced.discard(key)
        else:
            entry = self.data.get(key)
            if entry is not None and entry is not seen and self.policy.usable(entry, now):
                return entry, None, 0
            batch = self.batches.get(key)
            if batch is not None:
                return None, batch, 0
        return None, None, self._grant(key)

    def finish_load(
        self, key: K, token: int, value: Any, started: float, now: float, entry: Entry | None = None
    ) -> bool:
        """A load returned ``value``: write it if its lease still holds.  True if written.

        ``entry`` is the value's entry made beforehand (``Policy.value_entry``),
        so that the user's code it runs (``negative=``, ``random``) runs outside
        the driver's lock; without it the entry is made here.
        """
        self.loads += 1
        if self.leases.get(key) != token:
            return False
        del self.leases[key]
        if entry is None:
            entry = self.policy.value_entry(value, now, now - started)
        self._write(key, entry)
        return True

    def discard_load(self, key: K, token: int, error: BaseException | None) -> None:
        """A load ended but its outcome was refused (a fenced leader's): keep nothing,
        and release its lease.  Counted as the load it was."""
        if error is None:
            self.loads += 1
        elif isinstance(error, Exception):
            self.load_failures += 1
        if self.leases.get(key) == token:
            del self.leases[key]

    def fail_load(
        self, key: K, token: int, error: BaseException, started: float, now: float
    ) -> Entry | None:
        """A load raised ``error``.  Returns the entry kept in its place, if any.

        A not-found error (``negative=``) is an outcome: it is cached like a
        value.  Any other error is never cached and never evicts the entry the
        cache has; only :class:`Exception`\\ s count as failures (a cancelled or
        interrupted load does not).
        """
        negative = self.policy.error_entry(error, now, now - started)
        if negative is not None:
            self.loads += 1
            if self.leases.get(key) == token:
                del self.leases[key]
                self._write(key, negative)
            return None
        if isinstance(error, Exception):
            self.load_failures += 1
        if self.leases.get(key) == token:
            del self.leases[key]
        kept = self.data.get(key)
        return kept if kept is not None and self._still_served(kept, now) else None

    def _still_served(self, entry: Entry, now: float) -> bool:
        """Whether reads will go on getting ``entry``'s value (fresh, stale or standing in)."""
        policy = self.policy
        return entry.error is None and (
            policy.usable(entry, now) or now < entry.stale_until or policy.can_stand_in(entry, now)
        )

    def finish_batch(
        self,
        batch: Any,
        tokens: Mapping[K, int],
        values: Mapping[K, Any] | None,
        error: BaseException | None,
        started: float,
        now: float,
    ) -> list[K]:
        """A batch load ended with ``values`` (or raised ``error``): write what its leases allow.

        A key the batch left out is cached as not-found when negative caching is
        on.  A batch's error is never cached (it says nothing about one key).
        Returns the keys that kept an entry through a failed batch.
        """
        for key in tokens:
            if self.batches.get(key) is batch:
                del self.batches[key]
        kept: list[K] = []
        if values is None:
            if isinstance(error, Exception):
                self.load_failures += 1
            for key, token in tokens.items():
                if self.leases.get(key) == token:
                    del self.leases[key]
                entry = self.data.get(key)
                if entry is not None and self._still_served(entry, now):
                    kept.append(key)
            return kept
        self.loads += 1
        delta = now - started
        policy = self.policy
        for key, token in tokens.items():
            if self.leases.get(key) != token:
                continue
            del self.leases[key]
            if key in values:
                self._write(key, policy.value_entry(values[key], now, delta))
            else:
                missing = policy.missing_entry(key, now)
                if missing is not None:
                    self._write(key, missing)
        return kept

    def hold(self, key: K, seen: Entry | None) -> int:
        """A caller is about to ask a group that crosses processes for ``key``:
        the token its outcome is written back with (:meth:`landed`), or 0 if
        ``seen`` (the entry its read found wanting) is no longer the key's
        entry: something wrote since, and the outcome must not overwrite it.

        Shares the lease of a load already in flight (its callers all get one
        outcome; the first to land writes it), or takes a new one.
        """
        if self.data.get(key) is not seen:
            return 0
        token = self.leases.get(key)
        if token is None:
            token = self._grant(key)
            self.holders[token] = 1
        elif token in self.holders:
            self.holders[token] += 1
        return token

    def landed(
        self,
        key: K,
        token: int,
        value: Any,
        error: BaseException | None,
        started: float,
        now: float,
        entry: Entry | None = None,
    ) -> bool:
        """The group answered a caller holding ``token`` with ``value`` (or raised ``error``).

        Writes it if the lease still holds: the outcome then came from another
        process (a load run here replaced the lease when it started).  The
        entry is made as for a load that started at ``started`` and ended now;
        an error is written only if it is a not-found result (``negative=``).
        Counts nothing: ``loads`` and ``load_failures`` are loads run here.
        ``entry``: the entry to write, made beforehand (an entry read from a
        shared store, which says how long it lives).  True if written.
        """
        try:
            if self.leases.get(key) != token:
                return False
            del self.leases[key]
            if entry is None and error is None:
                entry = self.policy.value_entry(value, now, now - started)
            elif entry is None:
                assert error is not None
                entry = self.policy.error_entry(error, now, now - started)
                if entry is None:
                    return False
            self._write(key, entry)
            return True
        finally:
            # Also when negative= (a predicate) raised: the lease is not left held.
            self.unhold(key, token)

    def unhold(self, key: K, token: int) -> None:
        """A caller holding ``token`` is done with it.  The last one to leave a lease
        that nothing wrote with (all of them cancelled) releases it."""
        holders = self.holders.get(token)
        if holders is None:
            return
        if holders > 1:
            self.holders[token] = holders - 1
            return
        del self.holders[token]
        if self.leases.get(key) == token:
            del self.leases[key]

    def force(self, key: K) -> Entry | None:
        """An explicit refresh of ``key`` starts: older loads lose their lease and the
        next load of the key skips the re-check.  Returns the current entry."""
        self.refreshes += 1
        self._revoke(key)
        self.forced.add(key)
        return self.data.get(key)

    def cancel_force(self, key: K) -> None:
        self.forced.discard(key)

    # -- writes ----------------------------------------------------------------------

    def put(self, key: K, value: Any, now: float, entry: Entry | None = None) -> None:
        """Write ``value`` as if loaded now; loads in flight for the key will not overwrite it.

        ``entry``: as for :meth:`finish_load`."""
        self._revoke(key)
        self.forced.discard(key)
        self._write(key, self.policy.value_entry(value, now, 0.0) if entry is None else entry)

    def invalidate(self, key: K) -> None:
        """Drop ``key``'s entry and revoke the lease of any load in flight for it."""
        self._revoke(key)
        self.forced.discard(key)
        entry = self.data.pop(key, None)
        if entry is not None:
            self.retired_hits += entry.hits
            if self.tell:
                self.removed.append((key, "invalidated"))

    def in_flight(self) -> list[K]:
        """The keys with a load in flight (holding a lease or in a batch)."""
        return list(self.leases.keys() | self.batches.keys())

    def clear(self) -> list[K]:
        """Drop every entry and revoke every lease; returns the keys that had loads in flight."""
        in_flight = self.in_flight()
        self.retired_hits += sum(entry.hits for entry in list(self.data.values()))
        if self.tell:
            self.removed.extend((key, "invalidated") for key in self.data)
        self.data.clear()
        self.leases.clear()
        self.batches.clear()
        self.forced.clear()
        return in_flight

    def _grant(self, key: K) -> int:
        # A newer load's token replaces an older one's: when two loads of a key
        # overlap (after a forget), the one that started last is the one written.
        token = self.leases[key] = next(self._tokens)
        return token

    def _revoke(self, key: K) -> None:
        self.leases.pop(key, None)
        self.batches.pop(key, None)

    def _write(self, key: K, entry: Entry | None) -> None:
        """Write ``entry`` for ``key``; None (an outcome the policy does not store)
        drops the key's old entry, which it replaces.  A frozen store (a fleet
        cache that lost its invalidation channel) writes nothing."""
        if self.frozen:
            entry = None
        data = self.data
        old = data.get(key)
        if old is not None:
            if entry is None:
                del data[key]
            else:
                data[key] = entry
                data.move_to_end(key)
            self.retired_hits += old.hits
            if self.tell:
                self.removed.append((key, "replaced"))
            return
        if entry is None:
            return
        maxsize = self.maxsize
        if maxsize is not None and len(data) >= maxsize:
            # Make room first: lock-free readers never see more than maxsize entries.
            self._evict(len(data) - maxsize + 1)
        data[key] = entry

    def _evict(self, excess: int) -> None:
        """Drop ``excess`` entries, oldest first, giving a second chance to those read
        since the evictor last looked (CLOCK, an approximation of LRU whose hit
        path costs nothing: a read only bumps the entry's hit count)."""
        data = self.data
        chances = _SECOND_CHANCES
        while excess > 0:
            key, entry = data.popitem(last=False)
            if chances and entry.hits != entry.mark:
                chances -= 1
                entry.mark = entry.hits
                data[key] = entry
                continue
            self.retired_hits += entry.hits
            self.evictions += 1
            excess -= 1
            if self.tell:
                self.removed.append((key, "size"))

    def _drop(self, key: K, entry: Entry, reason: str) -> None:
        if self.data.get(key) is entry:
            del self.data[key]
            self.retired_hits += entry.hits
            if self.tell:
                self.removed.append((key, reason))

    def drop_where(self, dead: Any) -> None:
        """Drop the entries whose keys ``dead(key)`` says no call can ask for again."""
        for key in [key for key in self.data if dead(key)]:
            self.invalidate(key)

    def after_fork(self) -> None:
        """In a forked child: the loads, batches and refreshes in flight belong to
        threads that do not exist here.  Their leases go (a late write is
        impossible), so the child's reads load for themselves."""
        self.leases.clear()
        self.holders.clear()
        self.batches.clear()
        self.forced.clear()
        for entry in self.data.values():
            entry.refreshing = False

    # -- reporting -------------------------------------------------------------------

    def stats(self) -> CacheStats:
        # A copy first: a finalizer run by the GC may write to data meanwhile.
        hits = self.retired_hits + sum(entry.hits for entry in list(self.data.values()))
        # The counters kept here under their CacheStats names (misses, loads...).
        counts = {
            f.name: getattr(self, f.name) for f in fields(CacheStats) if f.name in self.__slots__
        }
        return CacheStats(hits=int(hits), size=len(self.data), **counts)
