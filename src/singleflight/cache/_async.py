# unasync: async-only
"""The asyncio driver: :class:`AsyncLoadingCache`.

The same policy and store as :class:`~singleflight.LoadingCache`; only the
waiting differs.  Misses load through an :class:`~singleflight.AsyncGroup`,
whose loader runs in a task of its own, so cancelling one caller never cancels
the load for the others.  Background refreshes and batch loads are tasks the
cache keeps track of; :meth:`AsyncLoadingCache.aclose` cancels and awaits them.
"""
# unasync: sync-only
# """The thread driver: :class:`LoadingCache`.
#
# Reads of fresh entries take no lock: one dict lookup, one clock call, one
# comparison and the entry's hit count (a float: see ``Entry``).  In CPU
# instructions a hit costs 1.21x, 1.26x, 1.27x (CPython 3.11, 3.12, 3.13) a
# function doing only the lookup, the clock call and the comparison
# (``python benchmarks/bench_cache.py --callgrind``); the clock is
# ``time.monotonic``, called as a global (a cache with another ``clock=`` reads
# through the locked path).
# Everything else happens in short critical sections around the store; the lock
# is never held while a loader runs.  Misses load through a
# :class:`~singleflight.Group`, so concurrent misses of a key share one load;
# background refreshes run on a small thread pool that :meth:`LoadingCache.close`
# shuts down.
# """
# unasync: end

from __future__ import annotations

# unasync: async-only
import inspect
import random as _random
import time
from asyncio import Task
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial
from time import monotonic as _monotonic
from typing import Any, Generic, TypeAlias

from .._protocols import AsyncGroupLike, SharedEntry
from ..events import EventHook
from ._asyncio_only import (
    Background,
    Batch,
    Broadcast,
    TrioTask,
    check_loaders,
    default_group,
    not_awaitable,
    outcomes_of,
)
from ._base import (
    DEFAULT_MAXSIZE,
    CacheBase,
    K,
    V,
    assemble,
    check_key,
    logger,
    served,
    wanted_keys,
)
from ._policy import Entry, Policy
from ._store import JOIN, SERVE

# unasync: sync-only
# import random as _random
# import time
# from collections.abc import Callable, Iterable, Mapping
# from functools import partial
# from time import monotonic as _monotonic
# from typing import Any, Generic, TypeAlias
#
# from .._protocols import GroupLike, SharedEntry
# from ..events import EventHook
# from ._base import DEFAULT_MAXSIZE, CacheBase, K, V, assemble, logger, served, wanted_keys
# from ._policy import Entry, Policy
# from ._store import JOIN, SERVE
# from ._threads_only import Background, Batch, check_loaders, default_group, outcomes_of
# unasync: end

# What loads a key in place of ``load(key)`` (None: ``load(key)`` itself).
Thunk: TypeAlias = Callable[[], Awaitable[V]] | None


class AsyncLoadingCache(CacheBase[K, V], Generic[K, V]):
    # unasync: async-only
    """A read-through cache for asyncio and trio: ``await get(key)`` answers from the
    cache or awaits ``load(key)`` once, however many tasks ask at the same time.

    The options are those of :class:`~singleflight.LoadingCache` (``ttl``,
    ``jitter``, ``maxsize``, ``stale``, ``stale_if_error``, ``early_refresh``,
    ``negative``, ``negative_ttl``, ``load_many``, ``group``, ``clock``,
    ``random``, ``cache_if``), with ``load`` and ``load_many`` async and ``group`` an
    :class:`~singleflight.AsyncGroup` (by default one under asyncio and an
    :class:`~singleflight.anyio.AnyIOGroup` under trio, which needs AnyIO; or
    anything with the same ``do``, an :class:`~singleflight.AsyncGroupLike`, such as
    :class:`~singleflight.redis.AsyncRedisGroup`, whose outcomes from other
    processes are written back as for :class:`~singleflight.LoadingCache`).
    :meth:`get`, :meth:`get_many` and :meth:`refresh` are coroutines;
    :meth:`invalidate`, :meth:`clear`, :meth:`put` and :meth:`invalidate_tags`
    make their change here at once and return a :class:`Broadcast`: await it
    to wait until Redis has it too (``fleet=``; a no-op otherwise), or leave
    it; the round trip never blocks the event loop.  :meth:`stats` is a plain
    method.  Use one event loop at a time: background work belongs to the loop
    that started it.  ``async with`` calls :meth:`aclose` on the way out.
    """

    # unasync: sync-only
    # """A read-through cache for threads: ``get(key)`` answers from the cache or loads
    # ``load(key)`` once, however many threads ask at the same time.
    #
    # Options (all keyword-only; times in seconds of ``clock``):
    #
    # - ``ttl``: how long an entry lives (``None``, the default: until evicted), or a
    #   function of the loaded value returning that (per entry; 0: not stored).
    # - ``jitter``: each entry's lifetime is spread uniformly over ``ttl * (1 +- jitter)``
    #   (default 0.1), so keys loaded together do not all expire together.
    # - ``maxsize``: bound on the entries held (default 10,000; ``None`` for no bound);
    #   beyond it the least recently used go first (CLOCK approximation of LRU).
    # - ``stale``: for this long after expiry a read returns the old value at once
    #   and starts one background refresh (stale-while-revalidate, Varnish grace).
    # - ``stale_if_error``: for this long after expiry, a caller whose load failed
    #   gets the old value instead of the error; the error is counted and logged.
    # - ``early_refresh``: XFetch's beta (1.0 is the paper's choice; ``None``/0
    #   disables it): a read refreshes the entry in the background before it
    #   expires with probability growing as expiry nears, scaled by how long the
    #   last load took, so hot keys never expire under load.
    # - ``negative_ttl`` with ``negative``: cache not-found results for
    #   ``negative_ttl``.  ``negative`` is a predicate on loaded values or
    #   exception type(s) the loader raises for not-found; nothing else a loader
    #   raises is ever cached.  With ``negative_ttl``, keys that ``load_many``
    #   leaves out are cached as not-found too.  ``negative_ttl`` may be a
    #   function of the not-found value or error returning the seconds.
    # - ``cache_if``: a predicate on loaded values; only those it accepts are
    #   stored (the others still answer every caller of their load).
    # - ``load_many``: ``load_many(keys) -> dict``; :meth:`get_many` loads its
    #   misses in one call.
    # - ``group``: what coalesces loads (a :class:`~singleflight.Group` by default;
    #   anything with the same ``do``, a :class:`~singleflight.GroupLike`).  Its keys
    #   are the cache's keys, so give each cache a group of its own.  With a group
    #   that crosses processes (:class:`~singleflight.redis.RedisGroup`), a value
    #   another process loaded is written into this cache as a local load's
    #   would be (same TTL, jitter and windows, from when it arrived; not if an
    #   ``invalidate``/``put``/``refresh`` came meanwhile), a
    #   :class:`~singleflight.RemoteError` is cached when ``negative=`` names its
    #   type (by name, subclasses known here included) and ``stale_if_error``
    #   covers it; ``loads``/``load_failures`` count only loads run here.
    # - ``clock``, ``random``: the time source and the uniform [0, 1) source of
    #   jitter and XFetch, for tests.
    # - ``refresh_workers``: threads running background refreshes (default 4).
    #
    # The cache is a context manager; leaving it calls :meth:`close`.
    # """
    # unasync: end

    __slots__ = ("_background",)

    def __init__(
        self,
        load: Callable[[K], Awaitable[V]],
        *,
        ttl: float | Callable[[V], float | None] | None = None,
        jitter: float = 0.1,
        maxsize: int | None = DEFAULT_MAXSIZE,
        stale: float = 0.0,
        stale_if_error: float = 0.0,
        early_refresh: float | None = None,
        negative: Callable[[V], bool]
        | type[BaseException]
        | tuple[type[BaseException], ...]
        | None = None,
        negative_ttl: float | Callable[[Any], float] | None = None,
        cache_if: Callable[[V], bool] | None = None,
        load_many: Callable[[list[K]], Awaitable[Mapping[K, V]]] | None = None,
        group: AsyncGroupLike[K, V] | None = None,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
        # unasync: sync-only
        # refresh_workers: int = 4,
        # unasync: end
        name: str = "default",
        on_event: EventHook | None = None,
        fleet: Any = None,
        tags: Callable[[K, V], Iterable[str]] | None = None,
    ) -> None:
        check_loaders(load, load_many, group)
        # unasync: async-only
        # Refresh and batch tasks, and the loader tasks of loads a refresh
        # started: what aclose() cancels.
        self._background = Background()
        # unasync: sync-only
        # self._background = Background(refresh_workers)
        # unasync: end
        super().__init__(
            load,
            Policy(
                ttl=ttl,
                jitter=jitter,
                stale=stale,
                stale_if_error=stale_if_error,
                early_refresh=early_refresh,
                negative=negative,
                negative_ttl=negative_ttl,
                cache_if=cache_if,
                random=random,
            ),
            maxsize=maxsize,
            load_many=load_many,
            group=default_group() if group is None and fleet is None else group,
            clock=clock,
            name=name,
            on_event=on_event,
            fleet=fleet,
            tags=tags,
        )

    # -- reads -------------------------------------------------------------------------

    async def get(self, key: K) -> V:
        # unasync: async-only
        """The value for ``key``: from the cache, or loaded once for every concurrent caller.

        Errors are those of :meth:`LoadingCache.get
        <singleflight.LoadingCache.get>`: the loader's exception in every caller
        of the load (cached only when ``negative=`` says it means not-found),
        the old value instead with ``stale_if_error``, ``KeyError`` for a key a
        batch left out, ``AbortedError`` if the load's task was cancelled by
        something other than this caller, ``TypeError`` for an unhashable key.

        Cancellation: cancelling a caller raises ``CancelledError`` in that caller
        only; the load goes on for the others and, by default, to completion,
        so its value is cached for the next caller.
        """
        # unasync: sync-only
        # """The value for ``key``: from the cache, or loaded once for every concurrent caller.
        #
        # Errors: the loader's exception, raised in every caller of that load (and
        # never cached, unless ``negative=`` says it means not-found: then it is
        # raised again from the cache until ``negative_ttl`` passes).  With
        # ``stale_if_error``, a caller whose load failed gets the old value
        # instead.  With a group that crosses processes, a load that ran
        # elsewhere raises what the group raises for it (a
        # :class:`~singleflight.RemoteError`), under the same rules.
        # ``KeyError`` if a batch load that had the key left it out.
        # ``AbortedError`` if the thread running the load was interrupted
        # (``KeyboardInterrupt``); that thread itself gets the interrupt.
        # ``TypeError`` for an unhashable key.  A waiting ``get`` cannot be
        # cancelled.
        # """
        # unasync: end
        # CacheBase._hit, inlined (a call would make a hit a third slower): no lock,
        # one clock call; a cache made with on_event or another clock than
        # time.monotonic reads every key through _get (see _fast).
        # ``hits = hits + 1.0``, not ``+=``: two bytecodes fewer (see Entry for the float).
        try:
            entry = self._fast[key]
            if _monotonic() < entry.fresh_until:
                entry.hits = entry.hits + 1.0
                return entry.value  # type: ignore[no-any-return]
        except (KeyError, TypeError):
            pass
        return await self._get(key, None)

    async def get_many(self, keys: Iterable[K]) -> dict[K, V]:
        # unasync: async-only
        """The values of ``keys``, as a dict in the order asked (duplicates once).

        As :meth:`LoadingCache.get_many <singleflight.LoadingCache.get_many>`:
        misses nobody is loading go to one ``load_many`` call (run in a task of
        its own: an asyncio task, or under trio a system task, which needs
        AnyIO), misses already being loaded are joined, keys not found are
        left out, and any other error is raised once every load this call
        started or joined has ended.  Without ``load_many`` the misses load
        concurrently, each coalesced as by :meth:`get`.

        Cancellation: cancelling the caller leaves the batch it started running
        for whoever joined it (its values are cached); :meth:`aclose` cancels it.
        """
        # unasync: sync-only
        # """The values of ``keys``, as a dict in the order asked (duplicates once).
        #
        # Hits are answered from the cache.  With ``load_many``, the misses that
        # nobody is loading yet go to one ``load_many`` call, run in this thread;
        # misses already being loaded (by :meth:`get` or another batch) are
        # joined, not loaded twice.  Without ``load_many`` the misses are loaded
        # one after another, each coalesced as by :meth:`get`.
        #
        # Keys that were not found (left out by ``load_many``, or whose loader
        # raised ``KeyError``, here or in another process: a
        # :class:`~singleflight.RemoteError` named ``KeyError``) are left out of
        # the result.  Any other error of any
        # key is raised, after every load this call started or joined has ended;
        # ``stale_if_error`` applies key by key.  ``TypeError`` for an unhashable key.
        # """
        # unasync: end
        wanted = wanted_keys(keys)
        # unasync: async-only
        if self._load_many is not None:
            self._background.check_batches()
        # unasync: end
        batch = Batch() if self._load_many is not None else None
        with self._lock:
            plan = self._store.plan_many(wanted, self._clock(), not self._closed, batch)
        outcomes: dict[K, Any] = {}
        errors: dict[K, BaseException] = {}
        served(plan, outcomes, errors)
        # unasync: async-only
        if plan.load:
            # Made before anything else can run: a load that finds a key of
            # this batch in the registry waits on its task.
            assert batch is not None
            batch.task = self._background.spawn(
                partial(self._run_batch, batch, plan.load, plan.tokens)
            )
            batch.task.add_done_callback(partial(self._batch_done, batch, plan.tokens))
        for key, entry in plan.refresh:
            self._start_refresh(key, entry, None)
        # unasync: sync-only
        # try:
        #     for key, entry in plan.refresh:
        #         self._start_refresh(key, entry, None)
        #     if plan.load:
        #         assert batch is not None
        #         self._run_batch(batch, plan.load, plan.tokens)
        # finally:
        #     if batch is not None and plan.load and not batch.done.is_set():
        #         # Interrupted before the batch ran: release its keys and joiners.
        #         interrupted = RuntimeError("get_many was interrupted before its batch ran")
        #         self._batch_failed(batch, plan.tokens, interrupted, self._clock())
        #         batch.failed(list(plan.tokens), interrupted)
        # unasync: end
        singles = list(plan.single.items())
        loaded = await outcomes_of(
            [partial(self._load_key, key, seen, None) for key, seen in singles]
        )
        for (key, _), outcome in zip(singles, loaded, strict=True):
            if isinstance(outcome, BaseException):
                errors[key] = outcome
            else:
                outcomes[key] = outcome
        for key, handle in [(key, batch) for key in plan.load] + list(plan.join.items()):
            assert handle is not None
            try:
                outcomes[key] = await self._from_batch(key, handle)
            except Exception as exc:
                errors[key] = exc
        return assemble(wanted, outcomes, errors)

    async def refresh(self, key: K) -> V:
        # unasync: async-only
        """Load ``key`` again now and return the new value.

        Meanwhile other callers are answered from the current entry (if it is
        still usable).  A load of ``key`` that started before this call does
        not overwrite the new value.  If the load fails its error is raised
        here and the current entry is kept.  Cancelling the caller does not
        stop the load (others may have joined it).  ``TypeError`` for an
        unhashable key.
        """
        # unasync: sync-only
        # """Load ``key`` again now, in this thread, and return the new value.
        #
        # Meanwhile other callers are answered from the current entry (if it is
        # still usable).  A load of ``key`` that started before this call does
        # not overwrite the new value.  If the load fails its error is raised
        # here and the current entry is kept as it is.  ``TypeError`` for an
        # unhashable key.
        # """
        # unasync: end
        return await self._reload(key, None)

    async def _reload(self, key: K, thunk: Thunk[V]) -> V:
        """:meth:`refresh`, loading through ``thunk`` (default ``load(key)``)."""
        # unasync: async-only
        seen = self._force(key) if self._fleet is None else await self._fleet_force(key)
        # unasync: sync-only
        # seen = self._force(key)
        # unasync: end
        try:
            return await self._through(key, seen, thunk, False)
        finally:
            self._unforce(key)

    # unasync: async-only
    # -- changes: made here at once, sent to Redis off the event loop ----------------------

    def invalidate(self, key: K) -> Broadcast:  # type: ignore[override]
        """Drop ``key``'s entry, as :meth:`LoadingCache.invalidate
        <singleflight.LoadingCache.invalidate>` does (in every process, with
        ``fleet=``).

        Returns a :class:`Broadcast` at once: the entry is gone here and a load
        in flight here writes nothing; ``await`` it to wait until Redis has the
        invalidation (it raises
        :class:`~singleflight.redis.RedisUnavailableError` if Redis could not
        be told).  ``TypeError`` for an unhashable key.
        """
        check_key(key)
        if self._fleet is None:
            super().invalidate(key)
            return Broadcast(None)
        return Broadcast(self._fleet.submit(self._fleet_invalidation(key)))

    def put(self, key: K, value: V) -> Broadcast:  # type: ignore[override]
        """Store ``value`` for ``key`` as if it had just been loaded (see
        :meth:`LoadingCache.put <singleflight.LoadingCache.put>`).

        With ``fleet=`` the old entry is dropped here at once and the new one
        is kept here once Redis has it; ``await`` the returned
        :class:`Broadcast` for that.  ``TypeError`` for an unhashable key.
        """
        check_key(key)
        if self._fleet is None:
            super().put(key, value)
            return Broadcast(None)
        return Broadcast(self._fleet.submit(self._fleet_putting(key, value)))

    def clear(self) -> Broadcast:  # type: ignore[override]
        """Drop every entry (see :meth:`LoadingCache.clear <singleflight.LoadingCache.clear>`);
        with ``fleet=``, in every process: ``await`` the returned :class:`Broadcast`."""
        if self._fleet is None:
            super().clear()
            return Broadcast(None)
        return Broadcast(self._fleet.submit(self._fleet_clearing()))

    def invalidate_tags(self, *tags: str) -> Broadcast:  # type: ignore[override]
        """Drop every entry tagged with one of ``tags``, in every process (see
        :meth:`LoadingCache.invalidate_tags
        <singleflight.LoadingCache.invalidate_tags>`); ``await`` the returned
        :class:`Broadcast` to wait until Redis has it.  ``TypeError`` without
        ``fleet=`` and ``tags=``."""
        send = self._fleet_untagging(tags)
        return Broadcast(self._fleet.submit(send))

    async def _fleet_force(self, key: K) -> Entry | None:
        """:meth:`_force` for a fleet cache, with the invalidation sent off the loop."""
        check_key(key)
        fleet = self._fleet
        fleet._forget_local(key, fleet.text(key))
        await Broadcast(fleet.submit(partial(fleet.invalidate, key, False)))
        with self._lock:
            seen = self._store.force(key)
        return seen

    # unasync: end
    # -- the slow paths ------------------------------------------------------------------

    async def _get(self, key: K, thunk: Thunk[V]) -> V:
        """A read that is not a plain hit; ``thunk`` loads the key (default ``load(key)``)."""
        action, found, batch = self._read(key, thunk)
        if action == SERVE:
            return found  # type: ignore[no-any-return]
        if action == JOIN:
            return await self._from_batch(key, batch)
        return await self._load_key(key, found, thunk)

    async def _load_key(self, key: K, seen: Entry | None, thunk: Thunk[V]) -> V:
        """Load ``key`` through the group; on failure the old entry may stand in."""
        try:
            return await self._through(key, seen, thunk, False)
        except Exception:
            entry = self._stand_in(key)
            if entry is None:
                raise
            return entry.value  # type: ignore[no-any-return]

    async def _through(self, key: K, seen: Entry | None, thunk: Thunk[V], background: bool) -> V:
        # unasync: async-only
        """``group.do`` running :meth:`_lead`; an outcome the group brought from another
        process (``_lead`` did not run here) is written back as ``_lead`` would have
        (with ``fleet=``: an entry read from Redis, for as long as it lives there).

        Raises what the group raises; cancelling the caller cancels only its
        wait (the outcome is then written back by another caller of the flight,
        if any).  A group that stays in this process is called as it is.
        """
        # unasync: sync-only
        # """``group.do`` running :meth:`_lead`; an outcome the group brought from another
        # process (``_lead`` did not run here) is written back as ``_lead`` would have
        # (with ``fleet=``: an entry read from Redis, for as long as it lives there).
        #
        # Raises what the group raises (an error is written back only as a
        # not-found result); an interrupted wait (``KeyboardInterrupt``) writes
        # nothing.  A group that stays in this process is called as it is.
        # """
        # unasync: end
        fleet = self._fleet is not None
        if fleet:
            # One fleet flight: the entry in Redis, or the one load of the fleet;
            # its outcome is written back for as long as it lives there.
            call = self._fleet_call(seen, background)
            self._index(key)
        token = self._hold(key, seen)
        if not token and not fleet:
            return await self._group.do(key, self._lead, key, seen, thunk, background)  # type: ignore[no-any-return]
        started = self._clock()
        try:
            if fleet:
                got = await self._group._fetch(key, call, self._lead, key, seen, thunk, background)
            else:
                got = await self._group.do(key, self._lead, key, seen, thunk, background)
        except Exception as exc:
            self._landed(key, token, None, exc, started)
            raise
        except BaseException:
            self._unhold(key, token)
            raise
        if not fleet:
            self._landed(key, token, got, None, started)
            return got  # type: ignore[no-any-return]
        if background and not isinstance(got, SharedEntry):
            self._fleet_refreshes += 1
        return self._arrived(key, token, got, started, thunk)  # type: ignore[no-any-return]

    async def _lead(self, key: K, seen: Entry | None, thunk: Thunk[V], background: bool) -> V:
        """The load a group flight runs: check the cache again, then load and write back."""
        ready, batch, token = self._begin_load(key, seen)
        if ready is not None:
            return ready.outcome()  # type: ignore[no-any-return]
        if batch is not None:
            await batch.wait(key)
            return batch.outcome(key)  # type: ignore[no-any-return]
        with self._background.loading(background):
            started = self._clock()
            try:
                # unasync: async-only
                awaitable = self._load(key) if thunk is None else thunk()
                if not inspect.isawaitable(awaitable):
                    raise not_awaitable(self._load if thunk is None else thunk, awaitable)
                value: V = await awaitable
                # unasync: sync-only
                # value: V = self._load(key) if thunk is None else thunk()
                # unasync: end
            except BaseException as exc:
                self._load_failed(key, token, exc, started)
                raise
        self._finish_load(key, token, value, started)
        return value

    async def _from_batch(self, key: K, batch: Batch) -> V:
        """Wait for ``batch`` and take ``key``'s value; the old entry may stand in on failure."""
        await batch.wait(key)
        try:
            return batch.outcome(key)  # type: ignore[no-any-return]
        except KeyError:
            raise
        except Exception:
            entry = self._stand_in(key)
            if entry is None:
                raise
            return entry.value  # type: ignore[no-any-return]

    async def _run_batch(self, batch: Batch, keys: list[K], tokens: dict[K, int]) -> None:
        """Run ``load_many`` for ``keys``, write back what the leases allow, and give the
        batch its outcome for the callers waiting on it."""
        assert self._load_many is not None
        started = self._clock()
        try:
            # unasync: async-only
            awaitable = self._load_many(list(keys))
            if not inspect.isawaitable(awaitable):
                raise not_awaitable(self._load_many, awaitable)
            values = await awaitable
            # unasync: sync-only
            # values = self._load_many(list(keys))
            # unasync: end
            self._check_values(values)
        except BaseException as exc:
            self._batch_failed(batch, tokens, exc, started)
            batch.failed(list(tokens), exc)
            if not isinstance(exc, Exception):
                raise  # not the loader's error: an interrupt, or a cancelled task
            return
        now = self._clock()
        with self._lock:
            self._store.finish_batch(batch, tokens, values, None, started, now)
        batch.loaded(values)

    # unasync: async-only
    def _batch_done(self, batch: Batch, tokens: dict[K, int], task: Task[Any] | TrioTask) -> None:
        """A batch task ended: if it was cancelled (or interrupted), release its keys."""
        if task.cancelled() or task.exception() is not None:
            now = self._clock()
            with self._lock:
                self._store.finish_batch(batch, tokens, None, None, now, now)

    # unasync: end
    # -- background work ------------------------------------------------------------------

    def _start_refresh(self, key: K, entry: Entry, thunk: Thunk[V]) -> None:
        """Refresh ``entry`` in the background; the caller is answered from it meanwhile."""
        if not self._background.start(self._refresh, key, entry, thunk):
            entry.refreshing = False  # closed: the entry is served as it is

    async def _refresh(self, key: K, entry: Entry, thunk: Thunk[V]) -> None:
        try:
            await self._through(key, entry, thunk, True)
        except Exception:
            # The leader logged it if the cache kept a value; the entry stays
            # until its windows end, and the next read may try again.
            logger.debug("background refresh of %r failed", key, exc_info=True)
        finally:
            entry.refreshing = False

    # -- lifetime --------------------------------------------------------------------------

    async def aclose(self) -> None:
        # unasync: async-only
        """Stop background work: cancel refreshes, the loads they started and batch loads,
        and wait until they have ended.

        A caller that joined a load cancelled here gets :class:`AbortedError`
        (or the old value, with ``stale_if_error``).  The cache stays usable:
        afterwards a read of an entry past its lifetime loads in the caller (no
        stale serving, no early refresh).  Only the running loop's work is
        touched.  Idempotent.  With ``fleet=`` it also leaves the invalidation
        channel: from then on every read asks Redis (no L1).
        """
        # unasync: sync-only
        # """Stop background refreshes: those queued are dropped, running ones are waited for.
        #
        # The cache stays usable: afterwards a read of an entry past its lifetime
        # loads in the caller's thread (no stale serving, no early refresh); with
        # ``fleet=`` every read asks Redis (the invalidation channel is left).
        # Idempotent.  Call it at shutdown (or use the cache as a context
        # manager): like any thread pool's, running refreshes hold up the
        # interpreter's exit until they finish.
        # """
        # unasync: end
        with self._lock:
            self._closed = True
        if self._fleet is not None:
            self._fleet._unbind()
        await self._background.close()

    def _after_fork(self) -> None:
        super()._after_fork()
        self._background.after_fork()

    async def __aenter__(self) -> AsyncLoadingCache[K, V]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
