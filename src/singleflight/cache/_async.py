"""The asyncio driver: :class:`AsyncLoadingCache`.

The same policy and store as :class:`~singleflight.LoadingCache`; only the
waiting differs.  Misses load through an :class:`~singleflight.AsyncGroup`,
whose loader runs in a task of its own, so cancelling one caller never cancels
the load for the others.  Background refreshes and batch loads are tasks the
cache keeps track of; :meth:`AsyncLoadingCache.aclose` cancels and awaits them.
"""

from __future__ import annotations

import asyncio
import inspect
import random as _random
import time
from asyncio import Task, current_task, get_running_loop
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterable, Mapping
from functools import partial
from types import TracebackType
from typing import Any, Generic, TypeVar

from .._asyncio import AsyncGroup
from .._protocols import AsyncGroupLike
from ..errors import AbortedError
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

__all__ = ["AsyncLoadingCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _BatchOutcome:
    """What a batch task returns: its values, or the loader's error and traceback.

    The task returns rather than raises the error, so that every caller
    re-raises it with the traceback the loader left (no growth per caller).
    """

    __slots__ = ("error", "tb", "values")

    def __init__(self, values: Mapping[Any, Any] | None, error: Exception | None = None) -> None:
        self.values = values
        self.error = error
        self.tb = None if error is None else error.__traceback__


class _Batch:
    """The registry's handle of a batch load: its task, set right after it is made."""

    __slots__ = ("task",)

    task: Task[_BatchOutcome]

    async def wait(self, key: object) -> None:
        """Wait for the batch to end; never cancels it, even if the waiter is cancelled.

        ``RuntimeError`` if the waiter is the batch's own task (``load_many``
        asking for ``key``, one of its own keys), which would wait for itself.
        """
        task = self.task
        if task is current_task():
            raise _batch_reentry(key)
        await _wait(task)

    def outcome(self, key: object) -> Any:
        """``key``'s value from the finished batch; raises its error, AbortedError or KeyError."""
        task = self.task
        if task.cancelled():
            raise AbortedError(key, "its batch load was cancelled")
        outcome = task.result()
        if outcome.error is not None:
            raise outcome.error.with_traceback(outcome.tb)
        assert outcome.values is not None
        try:
            return outcome.values[key]
        except KeyError:
            raise KeyError(key) from None


def _batch_reentry(key: object) -> RuntimeError:
    return RuntimeError(
        f"load_many asked the cache for {key!r}, a key of its own batch: it would wait for itself"
    )


def _not_awaitable(fn: object, returned: object) -> TypeError:
    return TypeError(
        f"AsyncLoadingCache needs an async loader; {fn!r} returned "
        f"{type(returned).__name__}, which cannot be awaited (use LoadingCache for sync loaders)"
    )


class AsyncLoadingCache(CacheBase[K, V], Generic[K, V]):
    """A read-through cache for asyncio: ``await get(key)`` answers from the cache or
    awaits ``load(key)`` once, however many tasks ask at the same time.

    The options are those of :class:`~singleflight.LoadingCache` (``ttl``,
    ``jitter``, ``maxsize``, ``stale``, ``stale_if_error``, ``early_refresh``,
    ``negative``, ``negative_ttl``, ``load_many``, ``group``, ``clock``,
    ``random``), with ``load`` and ``load_many`` async and ``group`` an
    :class:`~singleflight.AsyncGroup` (or anything with the same ``do``, an
    :class:`~singleflight.AsyncGroupLike`, such as
    :class:`~singleflight.redis.AsyncRedisGroup`, whose outcomes from other
    processes are written back as for :class:`~singleflight.LoadingCache`).
    :meth:`get`, :meth:`get_many` and :meth:`refresh` are coroutines;
    :meth:`invalidate`, :meth:`clear`, :meth:`put` and :meth:`stats` are plain
    methods.  Use one event loop at a time: background work belongs to the loop
    that started it.  ``async with`` calls :meth:`aclose` on the way out.
    """

    __slots__ = ("_background_loads", "_tasks")

    def __new__(cls, *args: Any, on_event: EventHook | None = None, **kwargs: Any) -> Any:
        # A cache with on_event reads through _read() only, where events are
        # told; the plain hit path in get() stays free of the check.
        if on_event is not None and cls is AsyncLoadingCache:
            cls = _ObservedAsyncLoadingCache
        return super().__new__(cls)

    def __init__(
        self,
        load: Callable[[K], Awaitable[V]],
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
        load_many: Callable[[list[K]], Awaitable[Mapping[K, V]]] | None = None,
        group: AsyncGroupLike[K, V] | None = None,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
        name: str = "default",
        on_event: EventHook | None = None,
    ) -> None:
        if group is not None and not inspect.iscoroutinefunction(getattr(group, "do", None)):
            raise TypeError(
                f"group={group!r} is not an async group; AsyncLoadingCache needs an AsyncGroup"
            )
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
            group=AsyncGroup() if group is None else group,
            clock=clock,
            random=random,
            name=name,
            on_event=on_event,
        )
        # Refresh and batch tasks, and the loader tasks of loads a refresh
        # started: what aclose() cancels.
        self._tasks: set[Task[Any]] = set()
        self._background_loads: set[Task[Any]] = set()

    # -- reads -------------------------------------------------------------------------

    async def get(self, key: K) -> V:
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
        try:
            entry = self._data[key]
            if self._clock() < entry.fresh_until:
                entry.hits += 1
                return entry.value  # type: ignore[no-any-return]
        except (KeyError, TypeError):
            pass
        return await self._get(key, None)

    async def get_many(self, keys: Iterable[K]) -> dict[K, V]:
        """The values of ``keys``, as a dict in the order asked (duplicates once).

        As :meth:`LoadingCache.get_many <singleflight.LoadingCache.get_many>`:
        misses nobody is loading go to one ``load_many`` call (run in a task of
        its own), misses already being loaded are joined, keys not found are
        left out, and any other error is raised once every load this call
        started or joined has ended.  Without ``load_many`` the misses load
        concurrently, each coalesced as by :meth:`get`.

        Cancellation: cancelling the caller leaves the batch it started running
        for whoever joined it (its values are cached); :meth:`aclose` cancels it.
        """
        wanted = wanted_keys(keys)
        batch = _Batch() if self._load_many is not None else None
        with self._lock:
            plan = self._store.plan_many(wanted, self._clock(), not self._closed, batch)
        batches: dict[_Batch, None] = dict.fromkeys(plan.join.values())
        if plan.load:
            # Made before anything else can run: a load that finds a key of
            # this batch in the registry waits on its task.
            assert batch is not None
            batch.task = self._spawn(self._run_batch(batch, plan.load, plan.tokens))
            batch.task.add_done_callback(partial(self._batch_done, batch, plan.tokens))
            batches[batch] = None
        for key, entry in plan.refresh:
            self._start_refresh(key, entry, None)
        outcomes: dict[K, Any] = {}
        errors: dict[K, BaseException] = {}
        served(plan, outcomes, errors)
        # A load_many asking for keys of its own batch is told so, not left waiting.
        me = current_task()
        reentered = {handle for handle in batches if handle.task is me}
        singles = list(plan.single.items())
        waited = await asyncio.gather(
            *(self._load_key(key, seen, None) for key, seen in singles),
            *(_wait(handle.task) for handle in batches if handle not in reentered),
            return_exceptions=True,
        )
        for (key, _), outcome in zip(singles, waited, strict=False):
            if isinstance(outcome, BaseException):
                errors[key] = outcome
            else:
                outcomes[key] = outcome
        for key, handle in [(key, batch) for key in plan.load] + list(plan.join.items()):
            assert handle is not None
            if handle in reentered:
                errors[key] = _batch_reentry(key)
                continue
            try:
                outcomes[key] = self._batch_value(key, handle)
            except Exception as exc:
                errors[key] = exc
        return assemble(wanted, outcomes, errors)

    async def refresh(self, key: K) -> V:
        """Load ``key`` again now and return the new value.

        Meanwhile other callers are answered from the current entry (if it is
        still usable).  A load of ``key`` that started before this call does
        not overwrite the new value.  If the load fails its error is raised
        here and the current entry is kept.  Cancelling the caller does not
        stop the load (others may have joined it).  ``TypeError`` for an
        unhashable key.
        """
        seen = self._force(key)
        try:
            return await self._through(key, seen, None, False)
        finally:
            self._unforce(key)

    # -- the slow paths ------------------------------------------------------------------

    async def _get(self, key: K, thunk: Callable[[], Awaitable[V]] | None) -> V:
        """A read that is not a plain hit; ``thunk`` loads the key (default ``load(key)``)."""
        action, found, batch = self._read(key, thunk)
        if action == SERVE:
            return found  # type: ignore[no-any-return]
        if action == JOIN:
            await batch.wait(key)
            return self._batch_value(key, batch)
        return await self._load_key(key, found, thunk)

    async def _load_key(
        self, key: K, seen: Entry | None, thunk: Callable[[], Awaitable[V]] | None
    ) -> V:
        """Load ``key`` through the group; on failure the old entry may stand in."""
        try:
            return await self._through(key, seen, thunk, False)
        except Exception:
            entry = self._stand_in(key)
            if entry is None:
                raise
            return entry.value  # type: ignore[no-any-return]

    async def _through(
        self,
        key: K,
        seen: Entry | None,
        thunk: Callable[[], Awaitable[V]] | None,
        background: bool,
    ) -> V:
        """``group.do`` running :meth:`_lead`; an outcome the group brought from another
        process (``_lead`` did not run here) is written back as ``_lead`` would have.

        Raises what the group raises; cancelling the caller cancels only its
        wait (the outcome is then written back by another caller of the flight,
        if any).  A group that stays in this process is called as it is.
        """
        token = self._hold(key, seen)
        if not token:
            return await self._group.do(key, self._lead, key, seen, thunk, background)  # type: ignore[no-any-return]
        started = self._clock()
        try:
            value = await self._group.do(key, self._lead, key, seen, thunk, background)
        except Exception as exc:
            self._landed(key, token, None, exc, started)
            raise
        except BaseException:
            self._unhold(key, token)
            raise
        self._landed(key, token, value, None, started)
        return value  # type: ignore[no-any-return]

    async def _lead(
        self,
        key: K,
        seen: Entry | None,
        thunk: Callable[[], Awaitable[V]] | None,
        background: bool,
    ) -> V:
        """The load a group flight runs: check the cache again, then load and write back."""
        ready, batch, token = self._begin_load(key, seen)
        if ready is not None:
            return ready.outcome()  # type: ignore[no-any-return]
        if batch is not None:
            await batch.wait(key)
            return batch.outcome(key)  # type: ignore[no-any-return]
        task = current_task() if background else None
        if task is not None:
            self._background_loads.add(task)
        clock = self._clock
        started = clock()
        try:
            awaitable = self._load(key) if thunk is None else thunk()
            if not inspect.isawaitable(awaitable):
                raise _not_awaitable(self._load if thunk is None else thunk, awaitable)
            value: V = await awaitable
        except BaseException as exc:
            self._load_failed(key, token, exc, started)
            raise
        finally:
            if task is not None:
                self._background_loads.discard(task)
        self._finish_load(key, token, value, started)
        return value

    def _batch_value(self, key: K, batch: _Batch) -> V:
        """``key``'s value from a finished batch; the old entry may stand in on failure."""
        try:
            return batch.outcome(key)  # type: ignore[no-any-return]
        except KeyError:
            raise
        except Exception:
            entry = self._stand_in(key)
            if entry is None:
                raise
            return entry.value  # type: ignore[no-any-return]

    async def _run_batch(self, batch: _Batch, keys: list[K], tokens: dict[K, int]) -> _BatchOutcome:
        """The body of a batch task: ``load_many``, then write back what the leases allow."""
        assert self._load_many is not None
        clock = self._clock
        started = clock()
        try:
            awaitable = self._load_many(list(keys))
            if not inspect.isawaitable(awaitable):
                raise _not_awaitable(self._load_many, awaitable)
            values = await awaitable
            self._check_values(values)
        except Exception as exc:
            self._batch_failed(batch, tokens, exc, started)
            return _BatchOutcome(None, exc)
        with self._lock:
            self._store.finish_batch(batch, tokens, values, None, started, clock())
        return _BatchOutcome(values)

    def _batch_done(self, batch: _Batch, tokens: dict[K, int], task: Task[Any]) -> None:
        """A batch task ended: if it was cancelled (or interrupted), release its keys."""
        if task.cancelled() or task.exception() is not None:
            with self._lock:
                self._store.finish_batch(batch, tokens, None, None, self._clock(), self._clock())

    # -- background work ------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> Task[Any]:
        task = get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_refresh(
        self, key: K, entry: Entry, thunk: Callable[[], Awaitable[V]] | None
    ) -> None:
        """Refresh ``entry`` in a task; the caller is answered from it meanwhile."""
        if self._closed:
            entry.refreshing = False
            return
        self._spawn(self._refresh(key, entry, thunk))

    async def _refresh(
        self, key: K, entry: Entry, thunk: Callable[[], Awaitable[V]] | None
    ) -> None:
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
        """Stop background work: cancel refreshes, the loads they started and batch loads,
        and wait until they have ended.

        A caller that joined a load cancelled here gets :class:`AbortedError`
        (or the old value, with ``stale_if_error``).  The cache stays usable:
        afterwards a read of an entry past its lifetime loads in the caller (no
        stale serving, no early refresh).  Only the running loop's work is
        touched.  Idempotent.
        """
        with self._lock:
            self._closed = True
        loop = get_running_loop()
        tasks = [
            task
            for task in (*self._tasks, *self._background_loads)
            if task.get_loop() is loop and not task.done()
        ]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def __aenter__(self) -> AsyncLoadingCache[K, V]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def _wait(task: asyncio.Future[Any]) -> None:
    """Wait for ``task`` to end without cancelling it if the waiter is cancelled."""
    if not task.done():
        await asyncio.wait((task,))


class _ObservedAsyncLoadingCache(AsyncLoadingCache[K, V]):
    """An AsyncLoadingCache made with ``on_event``: every read is told, hits included."""

    __slots__ = ()

    async def get(self, key: K) -> V:
        return await self._get(key, None)
