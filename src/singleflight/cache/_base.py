"""What the thread and asyncio caches share: options, the store, and the methods
that never wait (invalidate, clear, put, stats).

The drivers (``_sync``, ``_async``) add only the waiting: how a load runs, how
a caller waits for one, how background refreshes are started and stopped.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

from .._options import check_name
from .._protocols import REMOTE_FLIGHT, Settling, crosses_processes
from ..events import (
    CacheHit,
    CacheMiss,
    CacheRemoved,
    EventHook,
    RefreshStarted,
    StaleServed,
    emit,
)
from ..stats import CacheStats, GroupStats
from ._policy import Entry, Policy, not_found
from ._store import REFRESH, SERVE, Plan, Store

__all__ = [
    "MISS",
    "BatchBase",
    "CacheBase",
    "assemble",
    "bad_key",
    "check_key",
    "logger",
    "served",
    "wanted_keys",
]

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
        "_forget",
        "_group",
        "_hook",
        "_load",
        "_load_many",
        "_lock",
        "_policy",
        "_remote",
        "_store",
        "name",
    )

    def __init__(
        self,
        load: Callable[..., Any],
        *,
        ttl: float | Callable[[Any], float | None] | None,
        jitter: float,
        stale: float,
        stale_if_error: float,
        early_refresh: float | None,
        negative: Any,
        negative_ttl: float | Callable[[Any], float] | None,
        maxsize: int | None,
        load_many: Callable[..., Any] | None,
        group: Any,
        clock: Callable[[], float],
        random: Callable[[], float],
        name: str = "default",
        on_event: EventHook | None = None,
        cache_if: Callable[[Any], bool] | None = None,
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
        if not callable(getattr(group, "do", None)):
            raise TypeError(
                f"group must have a do(key, fn, *args) method like Group/AsyncGroup; got {group!r}"
            )
        self._policy = Policy(
            ttl=ttl,
            jitter=jitter,
            stale=stale,
            stale_if_error=stale_if_error,
            early_refresh=early_refresh,
            negative=negative,
            negative_ttl=negative_ttl,
            cache_if=cache_if,
            random=random,
        )
        self._store: Store[K] = Store(self._policy, _check_maxsize(maxsize))
        self._store.tell = on_event is not None
        self._data = self._store.data
        # What the lock-free hit path reads: the entries, or none at all for a
        # cache that tells on_event of every read (all go through _read()).
        self._fast: dict[Any, Entry] = self._data if on_event is None else {}
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

    # -- methods that never wait -----------------------------------------------------

    def invalidate(self, key: K) -> None:
        """Drop ``key``'s entry.

        A load of ``key`` already in flight still answers the callers that
        asked before this call, but its value is not written into the cache,
        and callers after this call start a new load rather than join it.
        ``TypeError`` for an unhashable key.
        """
        check_key(key)
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
        if self._forget is not None:  # first, as in invalidate()
            self._forget(key)
        now = self._clock()
        entry = self._policy.value_entry(value, now, 0.0)
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
        return replace(
            stats,
            calls=stats.hits + stats.misses,
            flights=group.flights,
            joins=group.joins,
            shared=group.shared,
            errors=group.errors,
            aborted=group.aborted,
            timeouts=group.timeouts,
            rejected=group.rejected,
            in_flight=group.in_flight,
            wait_seconds=group.wait_seconds,
        )

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
        (its reads go through :meth:`_read`, which tells them).  ``TypeError``
        for an unhashable key.  The ``@cached`` wrappers call it before anything
        else; the drivers' ``get`` has it inlined.
        """
        try:
            entry = self._fast[key]
        except KeyError:
            return MISS
        if self._clock() < entry.fresh_until:
            entry.hits += 1
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
        if self._forget is not None:  # first, as in invalidate()
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
    ) -> None:
        """A load led for other processes too is settled: write it if Redis kept it.

        A refused outcome (its leader fenced, its lease lost, the flight
        forgotten) answers that flight's own callers at most, and is never kept.
        """
        if kept:
            if error is None:
                now = self._clock()
                entry = self._policy.value_entry(value, now, now - started)
                with self._lock:
                    self._store.finish_load(key, token, value, started, now, entry)
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
        self,
        batch: object,
        tokens: dict[K, int],
        error: BaseException,
        started: float,
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
