"""What the thread and asyncio caches share: options, the store, and the methods
that never wait (invalidate, clear, put, stats).

The drivers (``_sync``, ``_async``) add only the waiting: how a load runs, how
a caller waits for one, how background refreshes are started and stopped.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import fields, replace
from time import monotonic as _monotonic
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from .._options import check_name
from .._protocols import REMOTE_FLIGHT, Settling, SharedEntry, crosses_processes
from ..events import (
    CacheHit,
    CacheMiss,
    CacheRemoved,
    EventHook,
    InvalidationReceived,
    L1Dropped,
    RefreshStarted,
    StaleServed,
    emit,
)
from ..stats import CacheStats, GroupStats
from ._policy import Entry, Policy, not_found
from ._store import REFRESH, SERVE, Plan, Store

if TYPE_CHECKING:
    from ..redis._protocol import FleetEntry

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

logger = logging.getLogger("singleflight.cache")

DEFAULT_MAXSIZE = 10_000


class _Miss:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISS"


MISS: Any = _Miss()
"""What :meth:`CacheBase._hit` returns when the key has no fresh entry."""


def bad_key(key: object) -> TypeError:
    return TypeError(f"cache keys must be hashable; got {type(key).__name__} {key!r}")


def check_key(key: object) -> None:
    try:
        hash(key)
    except TypeError:
        raise bad_key(key) from None


def wanted_keys(keys: Iterable[K]) -> list[K]:
    """The keys of a bulk read, in order, each once; ``TypeError`` naming an unhashable one."""
    keys = list(keys)
    try:
        return list(dict.fromkeys(keys))
    except TypeError:
        for key in keys:
            check_key(key)
        raise


def served(plan: Plan[K], outcomes: dict[K, Any], errors: dict[K, BaseException]) -> None:
    """Record the outcomes of a bulk read's keys answered from the cache."""
    for key, entry in plan.served.items():
        try:
            outcomes[key] = entry.outcome()
        except Exception as exc:
            errors[key] = exc


def assemble(
    wanted: list[K], outcomes: dict[K, Any], errors: dict[K, BaseException]
) -> dict[K, Any]:
    """A bulk read's result, in the order asked: keys not found (``KeyError``, or a
    :class:`~singleflight.RemoteError` for one) are left out; any other error is
    raised, the first in the order asked."""
    result: dict[K, Any] = {}
    for key in wanted:
        if key in outcomes:
            result[key] = outcomes[key]
            continue
        error = errors[key]
        if not not_found(error):
            raise error
    return result


class BatchBase:
    """A batch load's outcome, kept for the callers of its keys: its values, or its
    error and the traceback the loader left (so no caller's re-raise grows it)."""

    __slots__ = ("error", "tb", "values")

    def __init__(self) -> None:
        self.values: Mapping[Any, Any] | None = None
        self.error: Exception | None = None
        self.tb: TracebackType | None = None

    def outcome(self, key: object) -> Any:
        """The value the batch loaded for ``key``; raises its error or ``KeyError``."""
        if self.error is not None:
            raise self.error.with_traceback(self.tb)
        assert self.values is not None
        try:
            return self.values[key]
        except KeyError:
            raise KeyError(key) from None

    @staticmethod
    def reentry(key: object) -> RuntimeError:
        """What ``load_many`` asking for a key of its own batch raises (not a wait)."""
        return RuntimeError(
            f"load_many asked the cache for {key!r}, a key of its own batch: it would "
            "wait for itself"
        )


def _check_maxsize(maxsize: object) -> int | None:
    if maxsize is None:
        return None
    if isinstance(maxsize, bool) or not isinstance(maxsize, int):
        raise TypeError(
            f"maxsize must be an int (or None for no bound); got {type(maxsize).__name__} "
            f"{maxsize!r}"
        )
    if maxsize < 1:
        raise ValueError(f"maxsize must be at least 1; got {maxsize!r}")
    return maxsize


class CacheBase(Generic[K, V]):
    """Options, store and the non-waiting methods of a loading cache."""

    __slots__ = (
        "__weakref__",
        "_clock",
        "_closed",
        "_data",
        "_fast",
        "_fleet",
        "_fleet_refreshes",
        "_forget",
        "_group",
        "_hook",
        "_load",
        "_load_many",
        "_lock",
        "_policy",
        "_remote",
        "_store",
        "_tag_index",
        "_tags",
        "_texts",
        "name",
    )

    def __init__(
        self,
        load: Callable[..., Any],
        policy: Policy,
        *,
        maxsize: int | None,
        load_many: Callable[..., Any] | None,
        group: Any,
        clock: Callable[[], float],
        name: str = "default",
        on_event: EventHook | None = None,
        fleet: Any = None,
        tags: Callable[[Any, Any], Iterable[str]] | None = None,
    ) -> None:
        check_name(name)
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be a callable taking one event; got {on_event!r}")
        self.name = name
        self._hook = on_event
        if not callable(load):
            raise TypeError(f"load must be callable; got {type(load).__name__} {load!r}")
        if load_many is not None and not callable(load_many):
            raise TypeError(
                f"load_many must be callable or None; got {type(load_many).__name__} {load_many!r}"
            )
        if not callable(clock):
            raise TypeError(f"clock must be callable; got {type(clock).__name__} {clock!r}")
        now = clock()
        if not isinstance(now, int | float) or math.isnan(now):
            raise TypeError(f"clock() must return a number of seconds; it returned {now!r}")
        if fleet is not None:
            fleet, group = self._fleet_group(fleet, group, load, policy.ttl, load_many, name)
        elif tags is not None:
            raise TypeError("tags= tag entries shared by a fleet: give fleet= too")
        if tags is not None and not callable(tags):
            raise TypeError(f"tags must be a function of key and value; got {tags!r}")
        if not callable(getattr(group, "do", None)):
            raise TypeError(
                f"group must have a do(key, fn, *args) method like Group/AsyncGroup; got {group!r}"
            )
        self._policy = policy
        self._store: Store[K] = Store(self._policy, _check_maxsize(maxsize))
        self._store.tell = on_event is not None
        self._data = self._store.data
        # What the lock-free hit path reads: the entries, or none at all for a
        # cache that tells on_event of every read, or keeps time by another
        # clock than time.monotonic, which the hit path calls as a global (all
        # their reads go through _read()).  A global call is the cheapest on
        # every Python: through self it costs 3.11 about 110 CPU instructions more.
        fast = on_event is None and clock is time.monotonic
        self._fast: dict[Any, Entry] = self._data if fast else {}
        self._clock = clock
        # Reentrant: a finalizer the garbage collector runs while this thread
        # holds the lock may read the cache (each store method stays consistent
        # at the points where the collector can run).  User code (clock,
        # random, negative=) runs outside it where it can.
        self._lock: Any = self._new_lock()
        _caches.add(self)
        self._closed = False
        self._load = load
        self._load_many = load_many
        self._group = group
        forget = getattr(group, "forget", None)
        self._forget: Callable[[Any], None] | None = forget if callable(forget) else None
        # Outcomes the group brings from other processes are written back here.
        self._remote = crosses_processes(group)
        if self._remote and self._forget is None:
            raise TypeError(
                f"group={group!r} crosses processes but has no forget(key) method: without "
                "it invalidate() cannot keep a load that started before it from being "
                "written back"
            )
        # A fleet cache: key texts and tags of the entries (what messages name),
        # and the L1 unused until the invalidation channel is subscribed.
        self._texts: dict[str, set[Any]] = {}
        self._tags = tags
        self._tag_index: dict[str, set[Any]] = {}
        self._fleet_refreshes = 0
        self._fleet: Any = fleet
        if fleet is not None:
            self._store.frozen = True
            fleet._bind(self)

    def _fleet_group(
        self, fleet: Any, group: Any, load: Any, ttl: object, load_many: Any, name: str
    ) -> tuple[Any, Any]:
        """Check ``fleet=`` (a Fleet, or a Redis client to make one of): the Fleet, and
        the group it coalesces misses with."""
        if group is not None:
            raise TypeError("give group= or fleet=, not both: a fleet makes its own group")
        if ttl is None:
            raise ValueError("a fleet's entries expire: give ttl= as well")
        if load_many is not None:
            # A fleet flight takes one key's lease: a batch would need the leases
            # of its misses taken together, the keys others lead waited for, and
            # the keys it leads stored one by one (see docs/fleet.md).
            raise TypeError(
                "load_many= cannot be combined with fleet= (not supported yet): the fleet "
                "loads each key under a lease of its own in Redis, so the misses of one "
                "get_many may be led by several processes, and one load_many call for them "
                "would need the leases of many keys taken at once, which the fleet does not "
                "do. Drop load_many=: get_many then loads each miss through the fleet with "
                "load= (once for the whole fleet; concurrently with AsyncLoadingCache, one "
                "after another with LoadingCache)"
            )
        if not hasattr(fleet, "_prepare"):
            from ..redis import Fleet  # only a fleet cache needs redis-py

            fleet = Fleet(fleet)
        is_async = inspect.iscoroutinefunction(load)
        if fleet.is_async != is_async:
            kind = "redis.asyncio.Redis" if is_async else "redis.Redis"
            raise TypeError(f"this cache's fleet needs a {kind} client")
        return fleet, fleet._prepare(name)

    # -- methods that never wait -----------------------------------------------------

    def invalidate(self, key: K) -> None:
        """Drop ``key``'s entry.

        A load of ``key`` already in flight still answers the callers that
        asked before this call, but its value is not written into the cache,
        and callers after this call start a new load rather than join it.
        With ``fleet=``, in every process: the entry in Redis goes, a load in
        flight anywhere stores nothing, and every process drops its own copy
        as the message reaches it.
        ``TypeError`` for an unhashable key; with ``fleet=``,
        :class:`~singleflight.redis.RedisUnavailableError` when Redis could not
        be told (the entry is dropped here all the same).
        """
        check_key(key)
        if self._fleet is not None:
            self._fleet_invalidation(key)()
            return
        # Forget first: a caller arriving between the two steps must not join
        # the old flight with a lease taken after the revocation (it would
        # write the old value back).  The other order loses at most a write.
        if self._forget is not None:
            self._forget(key)
        with self._lock:
            self._store.invalidate(key)

    def clear(self) -> None:
        """Drop every entry; loads in flight are treated as by :meth:`invalidate`.

        The counters of :meth:`stats` are kept.  With a group that crosses
        processes, results it keeps for late callers (a Redis group's
        ``result_ttl``) are dropped only for the keys in flight here; another
        key's kept result may still answer its next miss (call
        :meth:`invalidate` on a key to drop that too).
        """
        forget = self._forget
        if self._fleet is not None:
            self._fleet_clearing()()
            return
        if forget is None:
            with self._lock:
                self._store.clear()
            return
        with self._lock:  # forget before the revocation, as invalidate() does
            before = set(self._store.in_flight())
        for key in before:
            forget(key)
        with self._lock:
            in_flight = self._store.clear()
        for key in in_flight:  # loads that started meanwhile
            if key not in before:
                forget(key)

    def put(self, key: K, value: V) -> None:
        """Store ``value`` for ``key`` as if it had just been loaded.

        Loads of ``key`` in flight still answer their callers but do not
        overwrite it.  ``TypeError`` for an unhashable key.
        """
        check_key(key)
        if self._fleet is not None:
            self._fleet_putting(key, value)()
            return
        now = self._clock()
        entry = self._policy.value_entry(value, now, 0.0)
        if self._forget is not None:  # first, as in invalidate()
            self._forget(key)
        with self._lock:
            self._store.put(key, value, now, entry)

    def stats(self) -> CacheStats:
        """A snapshot of the cache's counters (see :class:`CacheStats`).

        Hits are counted without a lock; with the GIL none is lost, on a
        free-threaded build concurrent hits of one key may be undercounted.
        """
        with self._lock:
            stats = self._store.stats()
        group = _group_stats(self._group)
        fleet = self._fleet
        if fleet is not None:
            stats = replace(
                stats,
                l2_hits=getattr(group, "hits", 0),
                l2_misses=getattr(group, "leads", 0),
                fleet_refreshes=self._fleet_refreshes,
                invalidations_sent=fleet.invalidations_sent,
                invalidations_received=fleet.invalidations_received,
                l1_drops=fleet.l1_drops,
            )
        counts = {field.name: getattr(group, field.name) for field in fields(GroupStats)}
        return replace(stats, **{**counts, "calls": stats.hits + stats.misses})

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` has an entry a read could use without loading.  Not counted as a read."""
        entry = self._data.get(cast(Any, key))
        return entry is not None and self._policy.usable(entry, self._clock())

    def __len__(self) -> int:
        """The number of entries held, expired ones not yet dropped included."""
        return len(self._data)

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<{type(self).__name__} size={len(self)} load={self._load!r}{state}>"

    # -- helpers for the drivers and the decorators: the steps of a read that do not wait --

    def _hit(self, key: K) -> Any:
        """The hit path, without a lock: ``key``'s value if it has a fresh entry, else ``MISS``.

        Counts the hit.  Always ``MISS`` for a cache made with ``on_event``
        (its reads go through :meth:`_read`, which tells them) or with another
        ``clock`` than ``time.monotonic``.  ``TypeError``
        for an unhashable key.  The ``@cached`` wrappers call it before anything
        else; the drivers' ``get`` has it inlined.
        """
        try:
            entry = self._fast[key]
        except KeyError:
            return MISS
        if _monotonic() < entry.fresh_until:
            entry.hits = entry.hits + 1.0
            return entry.value
        return MISS

    def _read(self, key: K, thunk: Any) -> tuple[int, Any, Any]:
        """A read that is not a plain hit, as far as it goes without waiting.

        ``(SERVE, value, None)`` when an entry answers it (starting its
        background refresh if one is due), ``(JOIN, None, batch)`` to wait for
        a batch load, ``(LOAD, seen, None)`` to load.  Raises a cached
        not-found error; ``TypeError`` for an unhashable key.
        """
        try:
            hash(key)
        except TypeError:
            raise bad_key(key) from None
        now = self._clock()
        with self._lock:
            action, entry, batch = self._store.lookup(key, now, not self._closed)
        if self._hook is not None:
            self._observe(key, action, entry, now)
        if action == SERVE:
            assert entry is not None
            return SERVE, entry.outcome(), None
        if action == REFRESH:
            assert entry is not None
            self._start_refresh(key, entry, thunk)
            return SERVE, entry.value, None
        return action, entry, batch

    def _start_refresh(self, key: K, entry: Entry, thunk: Any) -> None:
        """Refresh ``entry`` in the background (the driver's way); it answers meanwhile."""
        raise NotImplementedError

    def _force(self, key: K) -> Entry | None:
        """Start a forced reload of ``key`` (:meth:`refresh`): the entry it replaces."""
        check_key(key)
        if self._fleet is not None:
            self._fleet.invalidate(key)
        elif self._forget is not None:  # first, as in invalidate()
            self._forget(key)
        with self._lock:
            seen = self._store.force(key)
        return seen

    def _drop_where(self, dead: Callable[[Any], bool]) -> None:
        """Drop the entries whose keys ``dead(key)`` says no read can ask for again."""
        with self._lock:
            self._store.drop_where(dead)

    def _unforce(self, key: K) -> None:
        with self._lock:
            self._store.cancel_force(key)

    def _begin_load(self, key: K, seen: Entry | None) -> tuple[Entry | None, Any, int]:
        now = self._clock()
        with self._lock:
            return self._store.begin_load(key, seen, now)

    def _finish_load(self, key: K, token: int, value: Any, started: float) -> None:
        flight = self._shared_flight()
        if flight is not None and self._fleet is not None:
            now = self._clock()
            entry = self._policy.value_entry(value, now, now - started)
            if entry is not None and self._fleet_stores(flight, key, value, entry, now):
                flight.when_settled(
                    lambda kept: self._settle_load(key, token, value, None, started, kept, entry)
                )
            else:  # not to be stored, or tagged after a tag was invalidated: nobody keeps it
                with self._lock:
                    self._store.discard_load(key, token, None)
            return
        if flight is not None:  # written once the group says Redis took it
            flight.when_settled(
                lambda kept: self._settle_load(key, token, value, None, started, kept)
            )
            return
        now = self._clock()
        entry = self._policy.value_entry(value, now, now - started)
        with self._lock:
            self._store.finish_load(key, token, value, started, now, entry)

    def _shared_flight(self) -> Settling | None:
        """The flight shared with other processes that this load runs as the leader
        of, when the group crosses processes: its outcome may yet be refused."""
        if not self._remote:
            return None
        return REMOTE_FLIGHT.get()

    def _settle_load(
        self,
        key: K,
        token: int,
        value: Any,
        error: BaseException | None,
        started: float,
        kept: bool,
        entry: Entry | None = None,
    ) -> None:
        """A load led for other processes too is settled: write it if Redis kept it.

        A refused outcome (its leader fenced, its lease lost, the flight
        forgotten) answers that flight's own callers at most, and is never kept.
        """
        if kept:
            if error is None:
                now = self._clock()
                if entry is None:
                    entry = self._policy.value_entry(value, now, now - started)
                with self._lock:
                    if self._store.finish_load(key, token, value, started, now, entry):
                        self._index_tags(key, self._tags_of(key, value))
            else:
                self._failed(key, token, error, started)
            return
        with self._lock:
            self._store.discard_load(key, token, error)

    def _hold(self, key: K, seen: Entry | None) -> int:
        """Before a group call: the token to write its outcome back with, or 0 for
        none (a group that stays in this process, or an entry changed since ``seen``)."""
        if not self._remote:
            return 0
        with self._lock:
            return self._store.hold(key, seen)

    def _landed(
        self, key: K, token: int, value: Any, error: BaseException | None, started: float
    ) -> None:
        """After a group call: write back what it returned (or raised) if it came from
        another process and nothing revoked ``token`` meanwhile (see ``Store.landed``)."""
        if token:
            now = self._clock()
            with self._lock:
                self._store.landed(key, token, value, error, started, now)

    def _unhold(self, key: K, token: int) -> None:
        """A group call holding ``token`` ended without an outcome (cancelled, interrupted)."""
        if token:
            with self._lock:
                self._store.unhold(key, token)

    def _check_values(self, values: object) -> None:
        """``TypeError`` unless ``load_many`` returned a mapping."""
        if not isinstance(values, Mapping):
            raise TypeError(
                f"load_many must return a mapping of key to value; "
                f"{self._load_many!r} returned {type(values).__name__}"
            )

    def _stand_in(self, key: K) -> Entry | None:
        """The old entry a caller gets when its load failed, if stale-if-error allows."""
        now = self._clock()
        with self._lock:
            entry = self._store.stand_in(key, now)
        if entry is not None and self._hook is not None:
            emit(self._hook, StaleServed(self.name, key, now - entry.expires_at))
        return entry

    def _observe(self, key: K, action: int, entry: Entry | None, now: float) -> None:
        """Tell on_event what a read became (a cache made with on_event reads only this way)."""
        assert self._hook is not None
        if action in (SERVE, REFRESH):
            assert entry is not None
            if now < entry.expires_at:
                emit(self._hook, CacheHit(self.name, key))
            else:
                emit(self._hook, StaleServed(self.name, key, now - entry.expires_at))
            if action == REFRESH:
                emit(self._hook, RefreshStarted(self.name, key, now < entry.expires_at))
        else:
            emit(self._hook, CacheMiss(self.name, key))

    def _load_failed(self, key: K, token: int, error: BaseException, started: float) -> None:
        flight = self._shared_flight()
        if flight is not None and self._fleet is not None:
            now = self._clock()
            negative = self._policy.error_entry(error, now, now - started)
            store_as = getattr(flight, "store_as", None)
            if negative is not None and store_as is not None:
                store_as(*self._lifetimes(negative, now), True)
        if flight is not None:
            flight.when_settled(
                lambda kept: self._settle_load(key, token, None, error, started, kept)
            )
            return
        self._failed(key, token, error, started)

    def _failed(self, key: K, token: int, error: BaseException, started: float) -> None:
        now = self._clock()
        with self._lock:
            kept = self._store.fail_load(key, token, error, started, now)
        if kept is not None and isinstance(error, Exception):
            # Nobody else may ever see this error (a background refresh, or
            # callers answered from the old value): say so once, here.
            logger.warning(
                "loading %r failed; the cache keeps serving its previous value", key, exc_info=error
            )

    def _batch_failed(
        self, batch: object, tokens: dict[K, int], error: BaseException, started: float
    ) -> None:
        now = self._clock()
        with self._lock:
            kept = self._store.finish_batch(batch, tokens, None, error, started, now)
        if kept and isinstance(error, Exception):
            logger.warning(
                "loading %d keys in one batch failed; the cache keeps serving the previous "
                "values of %r",
                len(tokens),
                kept,
                exc_info=error,
            )

    # -- fleet caches (fleet=): the steps that do not wait ------------------------------------

    @staticmethod
    def _lifetimes(entry: Entry, now: float) -> tuple[int, int, int, int]:
        """An entry's lifetimes from ``now``, in ms: fresh, stale, stale-if-error, load time.

        Freshness is rounded up: stored for less than it has left here (0.8 s is
        799.99… ms in floats), the shared entry would expire first and another
        process would load the key again before its TTL had passed.  The windows
        after expiry are rounded down: nobody serves past them."""
        expires_at = entry.expires_at
        if expires_at == math.inf:
            raise ValueError(
                "ttl(value) returned None (never expire), but a fleet cache's entries "
                "expire in Redis: return a number of seconds for it"
            )
        return (
            math.ceil((expires_at - now) * 1000),
            int((entry.stale_until - expires_at) * 1000),
            int((entry.error_until - expires_at) * 1000),
            int(entry.delta * 1000),
        )

    def _shared(self, entry: Entry, now: float, error: bool) -> FleetEntry:
        from ..redis._protocol import ERROR_ENTRY, VALUE_ENTRY, FleetEntry

        fresh, stale, stale_if_error, delta = self._lifetimes(entry, now)
        return FleetEntry(
            fresh,
            stale,
            stale_if_error,
            delta,
            ERROR_ENTRY if error else VALUE_ENTRY,
            counted_at=time.monotonic(),
        )

    def _fleet_stores(self, flight: Any, key: K, value: Any, entry: Entry, now: float) -> bool:
        """A fleet leader loaded ``value``: tell the flight the entry to store (after
        tagging the key in Redis).  False when a tag of it was invalidated after
        the flight began: the value is then kept nowhere."""
        tags = self._tags_of(key, value)
        lifetimes = self._lifetimes(entry, now)
        if tags:
            try:
                if not self._fleet.tag(self._fleet.text(key), tags, flight.epoch, sum(lifetimes)):
                    return False
            except Exception:
                logger.warning("tagging %r failed: its value is not shared", key, exc_info=True)
                return False
        store_as = getattr(flight, "store_as", None)
        if store_as is not None:
            store_as(*lifetimes, False)
        return True

    def _tags_of(self, key: K, value: Any) -> list[str]:
        tags = self._tags
        if tags is None:
            return []
        found = list(tags(key, value))
        for tag in found:
            if not isinstance(tag, str) or not tag:
                raise TypeError(f"tags= must give non-empty strs; it gave {tag!r} for {key!r}")
        return found

    def _index_tags(self, key: K, tags: list[str]) -> None:
        """Under the lock: remember ``key`` under its tags (what a tag message names)."""
        for tag in tags:
            self._tag_index.setdefault(tag, set()).add(key)

    def _index(self, key: K) -> str:
        """Remember ``key`` under its Redis text (what messages name); returns the text.
        Before the key's flight asks Redis, so a message sent after reaches its lease."""
        text: str = self._fleet.text(key)
        with self._lock:
            texts = self._texts
            texts.setdefault(text, set()).add(key)
            if len(texts) > 2 * (self._store.maxsize or 10_000) + 64:
                keep = self._data.keys() | self._store.leases.keys() | {key}
                for name, keys in list(texts.items()):
                    keys &= keep
                    if not keys:
                        del texts[name]
        return text

    def _arrived(self, key: K, token: int, got: Any, started: float, thunk: Any) -> Any:
        """After a fleet flight: write back what it brought (an entry read from Redis
        lives only as long as it has left there), and return its value or raise."""
        if not isinstance(got, SharedEntry):
            self._landed(key, token, got, None, started)
            return got
        now = self._clock()
        age = max(0.0, time.monotonic() - got.read_at)
        entry = self._policy.shared_entry(
            got.value, got.error, now - age + got.fresh, got.stale, got.stale_if_error, got.delta
        )
        if token:
            with self._lock:
                if entry is None:
                    self._store.unhold(key, token)
                elif self._store.landed(key, token, got.value, got.error, started, now, entry):
                    if got.error is None:
                        self._index_tags(key, self._tags_of(key, got.value))
                    if (
                        entry.expires_at <= now < entry.stale_until
                        and not self._closed
                        and not entry.refreshing
                    ):
                        entry.refreshing = True  # served stale: refresh it for the fleet
                        self._store.refreshes += 1
                        self._store.stale_served += 1
                    else:
                        entry = None
                else:
                    entry = None
            if entry is not None and entry.refreshing:
                self._start_refresh(key, entry, thunk)
        if got.error is not None:
            raise _error_copy(got.error)
        return got.value

    def _fleet_call(self, seen: Entry | None, background: bool) -> Any:
        """What a fleet flight accepts from Redis: a stale entry for a caller with
        nothing better; for an early refresh, only an entry newer than ``seen``."""
        from ..redis._protocol import FleetCall

        if not background:
            return FleetCall(0, bool(self._policy.stale) and not self._closed)
        if seen is not None:
            left = seen.expires_at - self._clock()
            if left > 0:
                return FleetCall(int(left * 1000) + 1, False)
        return FleetCall(0, False)

    def _fleet_drop(self, kind: str, arg: str) -> None:
        """A message from the invalidation channel: drop what it names here."""
        with self._lock:
            store = self._store
            if kind == "*":
                store.clear()
                self._tag_index.clear()
            elif kind == "k":
                for key in list(self._texts.get(arg, ())):
                    store.invalidate(key)
            elif kind == "t":
                for key in list(self._tag_index.pop(arg, ())):
                    store.invalidate(key)
            else:
                return
        if self._hook is not None:
            what = {"*": "clear", "k": "key", "t": "tag"}[kind]
            emit(self._hook, InvalidationReceived(self.name, what, arg))

    def _fleet_trust(self, trusted: bool) -> None:
        """The invalidation channel was lost (or subscribed again): the L1 may have
        missed messages, so every entry goes and loads in flight write nothing;
        while it is lost nothing is written."""
        with self._lock:
            entries = len(self._data)
            self._store.clear()
            self._tag_index.clear()
            self._store.frozen = not trusted
        if not trusted and self._hook is not None:
            emit(self._hook, L1Dropped(self.name, entries))

    def invalidate_tags(self, *tags: str) -> None:
        """Drop every entry tagged (``tags=``) with one of ``tags``, in every process.

        As :meth:`invalidate` for each such key: the entries in Redis go, loads
        in flight of keys tagged so store nothing, every process drops its own
        copies as the message reaches it.  ``TypeError`` without ``fleet=``;
        :class:`~singleflight.redis.RedisUnavailableError` when Redis could
        not be told (the entries are dropped here all the same).
        """
        self._fleet_untagging(tags)()

    # The fleet's invalidations in two steps: what changes here at once (returns
    # the second step), and the round trip to Redis, which the async cache runs
    # off its event loop.  After it, the keys are dropped here again: a read
    # meanwhile may have brought back the old entry from Redis.

    def _fleet_invalidation(self, key: K) -> Callable[[], None]:
        fleet = self._fleet
        fleet._forget_local(key, fleet.text(key))
        with self._lock:
            self._store.invalidate(key)

        def send() -> None:
            try:
                fleet.invalidate(key, local=False)
            finally:
                with self._lock:
                    self._store.invalidate(key)

        return send

    def _fleet_putting(self, key: K, value: V) -> Callable[[], None]:
        fleet = self._fleet
        now = self._clock()
        entry = self._policy.value_entry(value, now, 0.0)
        if entry is None:  # a value the cache does not store (cache_if=, a ttl of 0)
            return self._fleet_invalidation(key)
        text = self._index(key)
        tags = self._tags_of(key, value)
        shared = self._shared(entry, now, False)
        fleet._forget_local(key, text)
        with self._lock:
            self._store.invalidate(key)

        def send() -> None:
            try:
                if tags:
                    fleet.tag(text, tags, 0, shared.px(time.monotonic()))  # the entry's PX
                fleet.put(key, value, shared, local=False)
            except BaseException:
                with self._lock:
                    self._store.invalidate(key)
                raise
            with self._lock:
                self._store.put(key, value, now, entry)
                self._index_tags(key, tags)

        return send

    def _fleet_clearing(self) -> Callable[[], None]:
        fleet = self._fleet
        with self._lock:
            flying = self._store.in_flight()
        for key in flying:
            fleet._forget_local(key, fleet.text(key))
        with self._lock:
            self._store.clear()

        def send() -> None:
            try:
                fleet.clear()
            finally:
                with self._lock:
                    self._store.clear()

        return send

    def _fleet_untagging(self, tags: tuple[str, ...]) -> Callable[[], None]:
        fleet = self._fleet
        if fleet is None or self._tags is None:
            raise TypeError("invalidate_tags() needs a cache made with fleet= and tags=")

        def drop_tagged() -> None:
            with self._lock:
                for tag in tags:
                    for key in list(self._tag_index.pop(tag, ())):
                        self._store.invalidate(key)

        drop_tagged()

        def send() -> None:
            try:
                texts = fleet.invalidate_tags(tags)
            finally:
                drop_tagged()
            with self._lock:
                for text in texts:
                    for key in list(self._texts.get(text, ())):
                        self._store.invalidate(key)

        return send

    def _new_lock(self) -> Any:
        """A reentrant lock; with on_event, one that tells of removed entries on release."""
        return threading.RLock() if self._hook is None else _TellingLock(self)

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock (another thread may have held it at the
        fork), no load or batch in flight, no refresh workers (their threads are
        gone: a driver drops its pool, and a new one starts on demand)."""
        self._lock = self._new_lock()
        self._store.after_fork()


# Every live cache, reset in a forked child (os.register_at_fork).
_caches: weakref.WeakSet[CacheBase[Any, Any]] = weakref.WeakSet()


def _error_copy(error: BaseException) -> BaseException:
    """A copy of a shared outcome's error, so no caller's raise changes another's."""
    try:
        copied = copy.copy(error)
    except Exception:
        return error
    return copied if type(copied) is type(error) else error


def _reset_after_fork() -> None:
    for cache in list(_caches):
        cache._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


class _TellingLock:
    """The lock of a cache made with ``on_event``: on release, it tells the hook of the
    entries removed meanwhile (:class:`~singleflight.events.CacheRemoved`)."""

    __slots__ = ("_cache", "_lock")

    def __init__(self, cache: CacheBase[Any, Any]) -> None:
        self._lock = threading.RLock()
        self._cache = weakref.proxy(cache)

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        cache = self._cache
        store = cache._store
        removed = store.removed
        if removed:
            store.removed = []
        self._lock.release()
        if removed:
            hook, name = cache._hook, cache.name
            assert hook is not None
            for key, reason in removed:
                emit(hook, CacheRemoved(name, key, reason))


_NO_GROUP_STATS = GroupStats()


def _group_stats(group: object) -> GroupStats:
    """The counters of a cache's group, or zeros for a group that keeps none."""
    stats = getattr(group, "stats", None)
    snapshot = stats() if callable(stats) else None
    return snapshot if isinstance(snapshot, GroupStats) else _NO_GROUP_STATS
