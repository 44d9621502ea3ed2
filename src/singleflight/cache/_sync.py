"""The thread driver: :class:`LoadingCache`.

Reads of fresh entries take no lock: one dict lookup, one clock call, one
comparison.  Everything else happens in short critical sections around the
store; the lock is never held while a loader runs.  Misses load through a
:class:`~singleflight.Group`, so concurrent misses of a key share one load;
background refreshes run on a small thread pool that :meth:`LoadingCache.close`
shuts down.
"""

from __future__ import annotations

import inspect
import random as _random
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from threading import get_ident
from types import TracebackType
from typing import Any, Generic, TypeVar

from .._flight import waiter_error
from .._protocols import GroupLike
from .._threads import Group
from ..events import EventHook
from ._base import (
    DEFAULT_MAXSIZE,
    CacheBase,
    assemble,
    logger,
    served,
    wanted_keys,
)
from ._policy import Entry
from ._store import JOIN, SERVE

__all__ = ["LoadingCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Batch:
    """A batch load in flight; callers that need one of its keys wait on ``done``.

    ``owner`` is the thread running ``load_many``: if it asks for a key of its
    own batch it is told so, rather than waiting for itself.
    """

    __slots__ = ("done", "error", "owner", "tb", "values")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.values: Mapping[Any, Any] | None = None
        self.error: Exception | None = None
        self.tb: TracebackType | None = None
        self.owner = get_ident()

    def wait(self, key: object) -> None:
        if not self.done.is_set() and self.owner == get_ident():
            raise RuntimeError(
                f"load_many asked the cache for {key!r}, a key of its own batch: it would "
                "wait for itself"
            )
        self.done.wait()

    def outcome(self, key: object) -> Any:
        """The value the batch loaded for ``key``; raises its error or ``KeyError``."""
        if self.error is not None:
            raise self.error.with_traceback(self.tb)
        assert self.values is not None
        try:
            return self.values[key]
        except KeyError:
            raise KeyError(key) from None


class LoadingCache(CacheBase[K, V], Generic[K, V]):
    """A read-through cache for threads: ``get(key)`` answers from the cache or loads
    ``load(key)`` once, however many threads ask at the same time.

    Options (all keyword-only; times in seconds of ``clock``):

    - ``ttl``: how long an entry lives (``None``, the default: until evicted).
    - ``jitter``: each entry's lifetime is spread uniformly over ``ttl * (1 +- jitter)``
      (default 0.1), so keys loaded together do not all expire together.
    - ``maxsize``: bound on the entries held (default 10,000; ``None`` for no bound);
      beyond it the least recently used go first (CLOCK approximation of LRU).
    - ``stale``: for this long after expiry a read returns the old value at once
      and starts one background refresh (stale-while-revalidate, Varnish grace).
    - ``stale_if_error``: for this long after expiry, a caller whose load failed
      gets the old value instead of the error; the error is counted and logged.
    - ``early_refresh``: XFetch's beta (1.0 is the paper's choice; ``None``/0
      disables it): a read refreshes the entry in the background before it
      expires with probability growing as expiry nears, scaled by how long the
      last load took, so hot keys never expire under load.
    - ``negative_ttl`` with ``negative``: cache not-found results for
      ``negative_ttl``.  ``negative`` is a predicate on loaded values or
      exception type(s) the loader raises for not-found; nothing else a loader
      raises is ever cached.  With ``negative_ttl``, keys that ``load_many``
      leaves out are cached as not-found too.
    - ``load_many``: ``load_many(keys) -> dict``; :meth:`get_many` loads its
      misses in one call.
    - ``group``: what coalesces loads (a :class:`~singleflight.Group` by default;
      anything with the same ``do``, a :class:`~singleflight.GroupLike`).  Its keys
      are the cache's keys, so give each cache a group of its own.  With a group
      that crosses processes (:class:`~singleflight.redis.RedisGroup`), a value
      another process loaded is written into this cache as a local load's
      would be (same TTL, jitter and windows, from when it arrived; not if an
      ``invalidate``/``put``/``refresh`` came meanwhile), a
      :class:`~singleflight.RemoteError` is cached when ``negative=`` names its
      type (by name, subclasses known here included) and ``stale_if_error``
      covers it; ``loads``/``load_failures`` count only loads run here.
    - ``clock``, ``random``: the time source and the uniform [0, 1) source of
      jitter and XFetch, for tests.
    - ``refresh_workers``: threads running background refreshes (default 4).

    The cache is a context manager; leaving it calls :meth:`close`.
    """

    __slots__ = ("_executor", "_refresh_workers")

    def __new__(cls, *args: Any, on_event: EventHook | None = None, **kwargs: Any) -> Any:
        # A cache with on_event reads through _read() only, where events are
        # told; the plain hit path in get() stays free of the check.
        if on_event is not None and cls is LoadingCache:
            cls = _ObservedLoadingCache
        return super().__new__(cls)

    def __init__(
        self,
        load: Callable[[K], V],
        *,
        ttl: float | None = None,
        jitter: float = 0.1,
        maxsize: int | None = DEFAULT_MAXSIZE,
        stale: float = 0.0,
        stale_if_error: float = 0.0,
        early_refresh: float | None = None,
        negative: Callable[[V], bool]
        | type[BaseException]
        | tuple[type[BaseException], ...]
        | None = None,
        negative_ttl: float | None = None,
        load_many: Callable[[list[K]], Mapping[K, V]] | None = None,
        group: GroupLike[K, V] | None = None,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
        refresh_workers: int = 4,
        name: str = "default",
        on_event: EventHook | None = None,
    ) -> None:
        for option, fn in (("load", load), ("load_many", load_many)):
            if inspect.iscoroutinefunction(fn):
                raise TypeError(
                    f"{option}={fn!r} is an async function; LoadingCache calls it from threads. "
                    "Use AsyncLoadingCache for async loaders."
                )
        if group is not None and inspect.iscoroutinefunction(getattr(group, "do", None)):
            raise TypeError(f"group={group!r} is an async group; LoadingCache needs a thread Group")
        if isinstance(refresh_workers, bool) or not isinstance(refresh_workers, int):
            raise TypeError(f"refresh_workers must be an int; got {refresh_workers!r}")
        if refresh_workers < 1:
            raise ValueError(f"refresh_workers must be at least 1; got {refresh_workers!r}")
        super().__init__(
            load,
            ttl=ttl,
            jitter=jitter,
            stale=stale,
            stale_if_error=stale_if_error,
            early_refresh=early_refresh,
            negative=negative,
            negative_ttl=negative_ttl,
            maxsize=maxsize,
            load_many=load_many,
            group=Group() if group is None else group,
            clock=clock,
            random=random,
            name=name,
            on_event=on_event,
        )
        self._refresh_workers = refresh_workers
        self._executor: ThreadPoolExecutor | None = None

    # -- reads -------------------------------------------------------------------------

    def get(self, key: K) -> V:
        """The value for ``key``: from the cache, or loaded once for every concurrent caller.

        Errors: the loader's exception, raised in every caller of that load (and
        never cached, unless ``negative=`` says it means not-found: then it is
        raised again from the cache until ``negative_ttl`` passes).  With
        ``stale_if_error``, a caller whose load failed gets the old value
        instead.  With a group that crosses processes, a load that ran
        elsewhere raises what the group raises for it (a
        :class:`~singleflight.RemoteError`), under the same rules.
        ``KeyError`` if a batch load that had the key left it out.
        ``AbortedError`` if the thread running the load was interrupted
        (``KeyboardInterrupt``); that thread itself gets the interrupt.
        ``TypeError`` for an unhashable key.  A waiting ``get`` cannot be
        cancelled.
        """
        # The hit path: no lock (a dict read is atomic), one clock call.
        try:
            entry = self._data[key]
            if self._clock() < entry.fresh_until:
                entry.hits += 1
                return entry.value  # type: ignore[no-any-return]
        except (KeyError, TypeError):
            pass
        return self._get(key, None)

    def get_many(self, keys: Iterable[K]) -> dict[K, V]:
        """The values of ``keys``, as a dict in the order asked (duplicates once).

        Hits are answered from the cache.  With ``load_many``, the misses that
        nobody is loading yet go to one ``load_many`` call, run in this thread;
        misses already being loaded (by :meth:`get` or another batch) are
        joined, not loaded twice.  Without ``load_many`` the misses are loaded
        one after another, each coalesced as by :meth:`get`.

        Keys that were not found (left out by ``load_many``, or whose loader
        raised ``KeyError``, here or in another process: a
        :class:`~singleflight.RemoteError` named ``KeyError``) are left out of
        the result.  Any other error of any
        key is raised, after every load this call started or joined has ended;
        ``stale_if_error`` applies key by key.  ``TypeError`` for an unhashable key.
        """
        wanted = wanted_keys(keys)
        batch = _Batch() if self._load_many is not None else None
        with self._lock:
            plan = self._store.plan_many(wanted, self._clock(), not self._closed, batch)
        outcomes: dict[K, Any] = {}
        errors: dict[K, BaseException] = {}
        try:
            for key, entry in plan.refresh:
                self._start_refresh(key, entry, None)
            if plan.load:
                assert batch is not None
                self._run_batch(batch, plan.load, plan.tokens)
        finally:
            if batch is not None and plan.load and not batch.done.is_set():
                # Interrupted before the batch ran: release its keys and joiners.
                interrupted = RuntimeError("get_many was interrupted before its batch ran")
                self._end_batch(batch, plan.tokens, None, interrupted, self._clock())
        served(plan, outcomes, errors)
        waits: list[tuple[K, _Batch | None, Entry | None]] = [
            (key, batch, None) for key in plan.load
        ]
        waits += [(key, None, seen) for key, seen in plan.single.items()]
        waits += [(key, other, None) for key, other in plan.join.items()]
        for key, from_batch, seen in waits:
            try:
                if from_batch is not None:
                    outcomes[key] = self._from_batch(key, from_batch)
                else:
                    outcomes[key] = self._load_key(key, seen, None)
            except Exception as exc:
                errors[key] = exc
        return assemble(wanted, outcomes, errors)

    def refresh(self, key: K) -> V:
        """Load ``key`` again now, in this thread, and return the new value.

        Meanwhile other callers are answered from the current entry (if it is
        still usable).  A load of ``key`` that started before this call does
        not overwrite the new value.  If the load fails its error is raised
        here and the current entry is kept as it is.  ``TypeError`` for an
        unhashable key.
        """
        seen = self._force(key)
        try:
            return self._through(key, seen, None)
        finally:
            self._unforce(key)

    # -- the slow paths ------------------------------------------------------------------

    def _get(self, key: K, thunk: Callable[[], V] | None) -> V:
        """A read that is not a plain hit; ``thunk`` loads the key (default ``load(key)``)."""
        action, found, batch = self._read(key, thunk)
        if action == SERVE:
            return found  # type: ignore[no-any-return]
        if action == JOIN:
            return self._from_batch(key, batch)
        return self._load_key(key, found, thunk)

    def _load_key(self, key: K, seen: Entry | None, thunk: Callable[[], V] | None) -> V:
        """Load ``key`` through the group; on failure the old entry may stand in."""
        try:
            return self._through(key, seen, thunk)
        except Exception:
            entry = self._stand_in(key)
            if entry is None:
                raise
            return entry.value  # type: ignore[no-any-return]

    def _through(self, key: K, seen: Entry | None, thunk: Callable[[], V] | None) -> V:
        """``group.do`` running :meth:`_lead`; an outcome the group brought from another
        process (``_lead`` did not run here) is written back as ``_lead`` would have.

        Raises what the group raises (an error is written back only as a
        not-found result); an interrupted wait (``KeyboardInterrupt``) writes
        nothing.  A group that stays in this process is called as it is.
        """
        token = self._hold(key, seen)
        if not token:
            return self._group.do(key, self._lead, key, seen, thunk)  # type: ignore[no-any-return]
        started = self._clock()
        try:
            value = self._group.do(key, self._lead, key, seen, thunk)
        except Exception as exc:
            self._landed(key, token, None, exc, started)
            raise
        except BaseException:
            self._unhold(key, token)
            raise
        self._landed(key, token, value, None, started)
        return value  # type: ignore[no-any-return]

    def _lead(self, key: K, seen: Entry | None, thunk: Callable[[], V] | None) -> V:
        """The load a group flight runs: check the cache again, then load and write back."""
        ready, batch, token = self._begin_load(key, seen)
        if ready is not None:
            return ready.outcome()  # type: ignore[no-any-return]
        if batch is not None:
            batch.wait(key)
            return batch.outcome(key)  # type: ignore[no-any-return]
        clock = self._clock
        started = clock()
        try:
            value = self._load(key) if thunk is None else thunk()
        except BaseException as exc:
            self._load_failed(key, token, exc, started)
            raise
        self._finish_load(key, token, value, started)
        return value

    def _from_batch(self, key: K, batch: _Batch) -> V:
        """Wait for ``batch`` and take ``key``'s value; the old entry may stand in on failure."""
        batch.wait(key)
        try:
            return batch.outcome(key)  # type: ignore[no-any-return]
        except KeyError:
            raise
        except Exception:
            entry = self._stand_in(key)
            if entry is None:
                raise
            return entry.value  # type: ignore[no-any-return]

    def _run_batch(self, batch: _Batch, keys: list[K], tokens: dict[K, int]) -> None:
        """Run ``load_many`` for ``keys`` in this thread and release the batch's waiters."""
        assert self._load_many is not None
        clock = self._clock
        started = clock()
        try:
            values = self._load_many(list(keys))
            self._check_values(values)
        except BaseException as exc:
            self._end_batch(batch, tokens, None, exc, started)
            if not isinstance(exc, Exception):
                raise
            return
        self._end_batch(batch, tokens, values, None, started)

    def _end_batch(
        self,
        batch: _Batch,
        tokens: dict[K, int],
        values: Mapping[K, Any] | None,
        exc: BaseException | None,
        started: float,
    ) -> None:
        if values is None:
            assert exc is not None
            self._batch_failed(batch, tokens, exc, started)
            error = waiter_error(list(tokens), exc)
            batch.error = error
            batch.tb = error.__traceback__
        else:
            with self._lock:
                self._store.finish_batch(batch, tokens, values, None, started, self._clock())
            batch.values = values
        batch.done.set()

    # -- background refreshes -------------------------------------------------------------

    def _start_refresh(self, key: K, entry: Entry, thunk: Callable[[], V] | None) -> None:
        """Refresh ``entry`` on the refresh pool; the caller is answered from it meanwhile."""
        with self._lock:
            executor = self._executor
            if executor is None and not self._closed:
                executor = self._executor = ThreadPoolExecutor(
                    self._refresh_workers, thread_name_prefix="singleflight-refresh"
                )
        try:
            if executor is None:
                raise RuntimeError("closed")
            executor.submit(self._refresh, key, entry, thunk)
        except RuntimeError:  # closed meanwhile: the entry is served as it is
            entry.refreshing = False

    def _refresh(self, key: K, entry: Entry, thunk: Callable[[], V] | None) -> None:
        try:
            self._through(key, entry, thunk)
        except Exception:
            # The leader logged it if the cache kept a value; the entry stays
            # until its windows end, and the next read may try again.
            logger.debug("background refresh of %r failed", key, exc_info=True)
        finally:
            entry.refreshing = False

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop background refreshes: those queued are dropped, running ones are waited for.

        The cache stays usable: afterwards a read of an entry past its lifetime
        loads in the caller's thread (no stale serving, no early refresh).
        Idempotent.  Call it at shutdown (or use the cache as a context
        manager): like any thread pool's, running refreshes hold up the
        interpreter's exit until they finish.
        """
        with self._lock:
            self._closed = True
            executor = self._executor
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> LoadingCache[K, V]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _ObservedLoadingCache(LoadingCache[K, V]):
    """A LoadingCache made with ``on_event``: every read is told, hits included."""

    __slots__ = ()

    def get(self, key: K) -> V:
        return self._get(key, None)
