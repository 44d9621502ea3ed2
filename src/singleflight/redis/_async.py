"""A driver of the Redis groups: :class:`AsyncRedisGroup`, generated into its twin.

Both drivers follow the same :class:`_protocol.Plan` and share a
:class:`_core.GroupCore`; one awaits where the other blocks.  An in-process
:class:`singleflight.AsyncGroup` in front means only the caller leading a key's
local flight talks to Redis.  The clients, the watchdog that renews leases and
how loaders are called come from ``_asyncio_only.py`` (the asyncio driver keeps
them per event loop, since its connections belong to the loop that made them).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Literal

from redis.exceptions import NoScriptError, RedisError

from .. import AsyncGroup
from .._protocols import Args, K, Kwargs, P, V
from .._result import Result
from ..events import EventHook
from ..stats import RedisGroupStats
from . import _protocol as proto
from ._clients import configure_async
from ._core import (
    _CURRENT,
    RETRY,
    Caller,
    FlightInfo,
    GroupCore,
    Watch,
    calling,
    command,
    describe,
    log,
    with_shared,
)
from ._errors import cluster_errors
from ._protocol import Completion, FleetCall, Held, Keys, Plan, Renewals, RetryBudget, Settings
from .codecs import Codec, CodecError

# isort: split
# unasync: async-only
import asyncio
import weakref

from ._asyncio_only import Client, Clients, Watchdog, call, eval_script, read_blocking, sleep

# unasync: sync-only
# from concurrent.futures import Executor, Future
#
# from ._threads_only import Client, Clients, Watchdog, call, eval_script, read_blocking, sleep
# unasync: end

_monotonic = time.monotonic


async def _with_budget(
    core: GroupCore[Any],
    what: str,
    keys: Keys,
    call: Callable[[], Awaitable[Any]],
    *,
    deadline: float,
) -> Any:
    """Run one Redis operation with the group's retry budget; raise its last error."""
    budget = RetryBudget(core.settings)
    while True:
        try:
            reply = await call()
        except RedisError as exc:
            delay = core.retry_delay(budget, what, keys, exc, deadline)
            if delay is None:
                raise
            await sleep(delay)
            continue
        core.breaker.success()
        return reply


async def _renew(client: Client, renewals: Renewals, due: list[Held]) -> list[int | None]:
    """The watchdog's RENEW of every due lease in one round trip (EVAL again after
    NOSCRIPT); None where it failed."""
    replies: list[Any] = []
    for fallback in (False, True):
        pipe = client.pipeline(transaction=False)
        for args in renewals.renew_commands(due, _monotonic(), fallback=fallback):
            command(pipe, *args)
        try:
            with cluster_errors():
                replies = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            log.debug("lease renewal failed: %s", describe(exc))
            return [None] * len(due)
        if not any(isinstance(r, NoScriptError) for r in replies):
            break
    return [None if isinstance(r, Exception) else int(r) for r in replies]


class AsyncRedisGroup(Generic[K, V]):
    """Coalesces calls that share a key across processes and machines, on Redis.

    ``AsyncRedisGroup(redis.asyncio.Redis(...), namespace="users")`` (or a
    ``redis.asyncio.cluster.RedisCluster``, or a Sentinel's ``master_for``
    client).  It has the API of :class:`singleflight.AsyncGroup` (``do``,
    ``do_result``, ``do_future``, ``forget``, ``forget_unshared``, ``in``,
    ``len``), and calls of one key share one execution of the loader among
    every process using the same Redis and namespace while its lease is live.

    Options (keyword-only): ``namespace`` (required), ``lease``,
    ``result_ttl``, ``max_wait``, ``on_redis_error``, ``codec``,
    ``key_to_str``, ``redis_timeout``, ``retry_budget``, ``max_payload``,
    ``breaker_threshold``, ``breaker_cooldown``, ``configure_client``,
    ``name``, ``on_event``, and those of :class:`AsyncGroup` it keeps, applied
    in this process (``max_flights``, ``on_limit``, ``timeout``, and
    ``cancel_orphaned`` with asyncio, ``executor`` with threads).  The Options
    table of the Redis guide gives each one's default and meaning, its
    Events section the events a group tells; :meth:`stats` returns the
    counters.

    The group talks through its own copies of ``client`` (bounded timeouts,
    no redis-py retry); close them with ``await group.aclose()`` or
    ``async with group:``.

    Guarantee: an efficiency lock.  Duplicate loads can happen when a leader
    stalls past its lease, when Redis restarts or fails over, or under the
    ``"open"`` policy; a stale leader never overwrites a newer result.
    """

    # Its do() may return a value (or raise a RemoteError) loaded by another
    # process: a LoadingCache in front writes such outcomes back (see GroupLike).
    crosses_processes = True

    __slots__ = ("__weakref__", "_client", "_clients", "_configure", "_core", "_local")

    def __init__(
        self,
        client: Client,
        *,
        namespace: str,
        lease: float = 3.0,
        result_ttl: float = 5.0,
        max_wait: float = 30.0,
        on_redis_error: str = "open",
        codec: Codec | None = None,
        key_to_str: Callable[[K], str] | None = None,
        redis_timeout: float = 0.5,
        retry_budget: float = 0.5,
        max_payload: int = 1 << 20,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 2.0,
        configure_client: bool = True,
        # unasync: async-only
        cancel_orphaned: bool = False,
        # unasync: sync-only
        # executor: Executor | None = None,
        # unasync: end
        name: str | None = None,
        on_event: EventHook | None = None,
        max_flights: int | None = None,
        on_limit: Literal["raise", "wait"] = "raise",
        timeout: float | None = None,
    ) -> None:
        settings = Settings(
            lease=lease,
            result_ttl=result_ttl,
            max_wait=max_wait,
            on_redis_error=on_redis_error,
            redis_timeout=redis_timeout,
            retry_budget=retry_budget,
            max_payload=max_payload,
            breaker_threshold=breaker_threshold,
            breaker_cooldown=breaker_cooldown,
        )
        self._core: GroupCore[K] = GroupCore(
            namespace=namespace,
            codec=codec,
            key_to_str=key_to_str,
            settings=settings,
            name=name,
            on_event=on_event,
        )
        self._client = client
        self._configure = configure_client
        # unasync: async-only
        configure_async(client, settings, configure_client)  # check the client now
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Clients] = (
            weakref.WeakKeyDictionary()
        )
        # unasync: sync-only
        # commands, blocking = configure_sync(client, settings, configure_client)
        # self._clients = Clients(commands, blocking, Watchdog(self._core, commands, _renew))
        # unasync: end
        # The local group tells the core of its flights and joins (always: the
        # counts of led flights come from there, hook or not).
        self._local: AsyncGroup[K, V] = AsyncGroup(
            # unasync: async-only
            cancel_orphaned=cancel_orphaned,
            # unasync: sync-only
            # executor=executor,
            # unasync: end
            name=self._core.name,
            on_event=self._core.local_event,
            max_flights=max_flights,
            on_limit=on_limit,
            timeout=timeout,
        )

    # -- the AsyncGroup API ----------------------------------------------------------

    async def do(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> V:
        """Run ``fn(*args, **kwargs)`` once for ``key`` across every process, or join that run.

        Returns:

        * the loader's value: the object itself in the leader's process, a copy
          decoded by the codec in other processes.

        Raises:

        * the loader's :class:`Exception` in the leader's process (as
          :class:`AsyncGroup` raises it); :class:`LoaderError` (its type name and
          message) in other processes;
        * :class:`AbortedError` in local waiters when a ``BaseException`` stops
          the loader (a cancelled loader, ``KeyboardInterrupt``, ``SystemExit``):
          the flight is then abandoned in Redis, so other processes take over
          at once;
        * under ``on_redis_error="closed"``: :class:`RedisUnavailableError` when
          Redis fails past the retry budget or the breaker is open,
          :class:`~singleflight.WaitTimeoutError` after ``max_wait`` (under
          ``"open"`` the loader runs locally instead);
        * :class:`PayloadTooLargeError` / :class:`CodecError` when the value cannot
          be encoded: in every caller of the flight, in every process;
        * ``TypeError`` for a key that is unhashable or of another type (without
          ``key_to_str=``) or a non-callable ``fn``, ``ValueError`` for a str key
          that is not valid Unicode, before anything runs; ``RuntimeError`` for a
          loader calling ``do`` on its own key.

        Cancellation:

        * as for :meth:`AsyncGroup.do`.  A caller returns at most about
          ``max_wait + redis_timeout`` after its process's flight started, plus
          the loader's own time when it runs here.
        """
        text = self._core.checked(key, fn)
        with calling() as caller:
            return await self._local.do(key, self._fly, key, text, fn, args, kwargs, caller)

    async def do_result(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Result[V]:
        """Like :meth:`do`, but returns a :class:`Result` instead of raising.

        Returns:

        * a :class:`Result`: ``error`` holds what :meth:`do` would raise but for
          the errors below; ``shared`` is true when the value reached more than
          one caller, in this process or through Redis.

        Raises:

        * ``TypeError``, ``ValueError`` and ``RuntimeError`` as :meth:`do`.

        Cancellation:

        * as for :meth:`do`.
        """
        text = self._core.checked(key, fn)
        with calling() as caller:
            result = await self._local.do_result(
                key, self._fly, key, text, fn, args, kwargs, caller
            )
        return with_shared(result, caller)

    def do_future(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> asyncio.Future[V]:
        """Start or join the flight of ``key``; return at once with a future of its outcome.

        As :meth:`AsyncGroup.do_future`: each caller's future is its own, to
        cancel or wait on with a timeout without affecting the flight.

        Returns:

        * a future holding what :meth:`do` would return or raise.
        """
        text = self._core.checked(key, fn)
        with calling() as caller:
            return self._local.do_future(key, self._fly, key, text, fn, args, kwargs, caller)

    async def _fetch(
        self, key: K, fleet: FleetCall, fn: Callable[..., Awaitable[V]], /, *args: Any
    ) -> Any:
        """:meth:`do` for a fleet cache: the flight reads and stores entries (see
        ``FleetCall``); answers with a :class:`SharedEntry` for an entry read from
        Redis, or the loader's value when it ran here."""
        text = self._core.checked(key, fn)
        with calling() as caller:
            return await self._local.do(key, self._fly, key, text, fn, args, {}, caller, fleet)

    # unasync: async-only
    def forget(self, key: K) -> None:
        """:meth:`aforget` without waiting: the local flight is forgotten at once.

        The Redis part runs in a task of the running loop, and this loop's next
        flight of the key waits for it; a failure is logged.  Outside an event
        loop only the local part is done.
        """
        text = self._core.redis_key(key)
        self._core.forgetting(text)
        self._local.forget(key)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        state = self._state()
        task = loop.create_task(self._forget_remote(state, key, text, False, quiet=True))
        state.forgets[text] = task

        def done(task: asyncio.Task[Any]) -> None:
            if state.forgets.get(text) is task:
                del state.forgets[text]

        task.add_done_callback(done)

    def forget_unshared(self, key: K) -> bool:
        """Forget ``key`` only if nobody joined its flight in this loop.

        Returns the local answer; when it is True, the Redis part runs as for
        :meth:`forget` but only if no other process waited on the flight.
        """
        text = self._core.redis_key(key)
        if not self._local.forget_unshared(key):
            return False
        self._core.forgetting(text)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return True
        state = self._state()
        self._spawn(state, self._forget_remote(state, key, text, True, quiet=True))
        return True

    # unasync: sync-only
    # def forget_unshared(self, key: K) -> bool:
    #     """Forget ``key`` only if nobody joined its flight, here or in another process.
    #
    #     Returns True if it was forgotten or not in flight.  The two checks
    #     (local, then Redis) are not one atomic step: a caller joining in
    #     between may find the flight forgotten.
    #     """
    #     text = self._core.redis_key(key)
    #     if not self._local.forget_unshared(key):
    #         return False
    #     self._core.forgetting(text)
    #     return self._forget_remote(self._clients, key, text, True, quiet=False)
    # unasync: end

    async def aforget(self, key: K) -> None:
        """Let the next call of ``key``, in any process, start a new flight.

        Drops the result stored in Redis and detaches the running flight, if
        any: new callers lead a new one.  Once it returns, no caller that
        starts after it, in any process, gets the outcome of a flight that
        started before it: this process's callers of the detached flight still
        get its outcome (they all came before), processes waiting on it ask
        again, and a process leading it runs it again.  The outcome is not
        stored.

        Raises:

        * :class:`RedisUnavailableError` under ``on_redis_error="closed"`` when
          Redis fails (the local flight is forgotten anyway); under ``"open"``
          the failure is logged.
        """
        text = self._core.redis_key(key)
        self._core.forgetting(text)
        self._local.forget(key)
        await self._forget_remote(self._state(), key, text, False, quiet=False)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is in flight in this process (with asyncio: in the running
        loop, or outside a loop in any loop)."""
        return key in self._local

    def __len__(self) -> int:
        """The number of keys in flight in this process."""
        return len(self._local)

    def __repr__(self) -> str:
        return f"<AsyncRedisGroup namespace={self._core.namespace!r} in_flight={len(self)}>"

    @property
    def namespace(self) -> str:
        return self._core.namespace

    @property
    def name(self) -> str:
        """The name in the group's events and metrics (by default its namespace)."""
        return self._core.name

    @property
    def result_ttl(self) -> float:
        """How long, in seconds, a flight's result stays in Redis for late callers (0: not kept)."""
        return self._core.settings.result_ttl

    def stats(self) -> RedisGroupStats:
        """What this group did in this process, and its breaker's state (see RedisGroupStats)."""
        return self._core.stats(self._local.stats())

    # unasync: async-only
    async def aclose(self) -> None:
        """Stop the running loop's watchdog and close the group's clients in this loop.

        Waits briefly for forgets and abandons still being sent.  Loaders still
        running keep their leases until they end or the leases lapse.  The
        caller's own client is not closed.
        """
        state = self._clients.pop(asyncio.get_running_loop(), None)
        if state is None:
            return
        pending = [*state.forgets.values(), *state.background]
        if pending:  # forgets and abandons in flight: let them reach Redis first
            await asyncio.wait(pending, timeout=self._core.settings.redis_timeout * 2)
        await state.watchdog.stop()
        if self._configure:
            await state.commands.aclose()
            await state.blocking.aclose()

    # unasync: sync-only
    # def close(self) -> None:
    #     """Close the group's own Redis connections (not ``client``'s).
    #
    #     Loaders still running keep their leases until they end or the leases
    #     lapse; a call after ``close`` reconnects.
    #     """
    #     if self._configure:
    #         self._clients.commands.close()
    #         self._clients.blocking.close()
    # unasync: end

    async def __aenter__(self) -> AsyncRedisGroup[K, V]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the distributed flight -------------------------------------------------------

    # unasync: async-only
    def _state(self) -> Clients:
        """The running loop's clients, watchdog and background work."""
        loop = asyncio.get_running_loop()
        state = self._clients.get(loop)
        if state is None:
            commands, blocking = configure_async(self._client, self._core.settings, self._configure)
            watchdog = Watchdog(self._core, commands, _renew)
            state = self._clients[loop] = Clients(commands, blocking, watchdog)
        return state

    def _spawn(self, state: Clients, work: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(work)
        state.background.add(task)
        task.add_done_callback(state.background.discard)
        return task

    async def _abandon(self, state: Clients, plan: Plan, *, wait: bool) -> None:
        """Give the lease back, so others take over at once.  In a task of its own, so
        that cancelling us again cannot stop it; ``wait`` for it, shielded."""
        abandon = self._spawn(state, self._complete(state, plan, proto.ABANDONED, b""))
        if wait:
            try:
                await asyncio.shield(abandon)
            except asyncio.CancelledError:
                pass

    # unasync: sync-only
    # def _state(self) -> Clients:
    #     return self._clients
    #
    # def _abandon(self, state: Clients, plan: Plan, *, wait: bool) -> None:
    #     """Give the lease back, so others take over at once."""
    #     self._complete(state, plan, proto.ABANDONED, b"")
    #
    # unasync: end
    async def _fly(
        self,
        key: K,
        text: str,
        fn: Callable[..., Awaitable[V]],
        args: Args,
        kwargs: Kwargs,
        caller: Caller,
        fleet: FleetCall | None = None,
    ) -> V:
        """The local flight's loader: get the value through Redis, or lead and load it."""
        core = self._core
        state = self._state()
        # unasync: async-only
        forgetting = state.forgets.get(text)
        if forgetting is not None:
            await asyncio.shield(forgetting)  # never raises: quiet forgets log their errors
        # unasync: end
        keys = core.keys(text)
        plan = Plan(core.settings, keys, core.breaker, _monotonic(), fleet=fleet)
        watch = Watch(core, key, caller)
        try:
            while True:
                op = plan.op
                if op == proto.ACQUIRE:
                    plan.sent = _monotonic()
                    try:
                        reply = await eval_script(
                            state.commands,
                            plan.acquire_script(),
                            plan.acquire_keys(),
                            plan.acquire_args(),
                        )
                    except RedisError as exc:
                        core.redis_error(plan, exc)
                        continue
                    except BaseException:
                        # Cancelled or interrupted: the script may have run and made
                        # us leader; give the lease back rather than keep others
                        # waiting a lease.
                        await self._abandon(state, plan, wait=False)
                        raise
                    plan.acquired(reply, _monotonic())
                elif op == proto.READ:
                    watch.read()
                    try:
                        reply = await read_blocking(
                            state.blocking, plan.stream, plan.read_command(), plan.read_timeout()
                        )
                    except RedisError as exc:
                        core.redis_error(plan, exc)
                        continue
                    plan.read(reply, _monotonic())
                elif op == proto.SLEEP:
                    await sleep(plan.delay)
                    plan.resume(_monotonic())
                elif op == proto.HIT and fleet is not None:
                    found: V = core.fetched(key, plan, watch)
                    if found is not RETRY:
                        return found
                elif op == proto.HIT or op == proto.REMOTE_ERROR:
                    value: V = core.received(key, plan, watch)
                    if value is not RETRY:
                        return value
                elif op == proto.LEAD:
                    led: V = await self._lead(state, key, plan, fn, args, kwargs, watch)
                    if led is not RETRY:
                        return led
                    # Forgotten by another process while it ran: run again.
                    plan = Plan(
                        core.settings, keys, core.breaker, _monotonic(), plan.deadline, fleet
                    )
                elif op == proto.LOCAL:
                    core.local_run(key, plan, watch)
                    context = _CURRENT.set(None)  # no flight shared with other processes
                    try:
                        return await call(fn, args, kwargs)
                    finally:
                        _CURRENT.reset(context)
                else:
                    raise core.failure(key, plan, watch)
        finally:
            watch.stop()  # cancelled or interrupted while waiting: the wait still counts

    async def _lead(
        self,
        state: Clients,
        key: K,
        plan: Plan,
        fn: Callable[..., Awaitable[V]],
        args: Args,
        kwargs: Kwargs,
        watch: Watch,
    ) -> V:
        """Run the loader holding the lease, then complete (or abandon) the flight in Redis.

        RETRY when another process forgot the key meanwhile: the flight must run again."""
        core = self._core
        held = core.lead(plan, watch)
        watchdog = state.watchdog
        watchdog.hold(held)
        context = _CURRENT.set(FlightInfo(key, held))
        try:
            value = await call(fn, args, kwargs)
        except Exception as exc:
            watchdog.release(held)
            payload: bytes | None = None
            try:
                stored = core.stored_entry(plan, held, None, exc)  # a fleet's not-found entry
                status = proto.OK if stored is not None else proto.ERROR
                payload = core.error_payload(plan.keys, exc) if stored is None else stored
            except Exception:  # a codec's bug: the callers here get the loader's error
                log.exception("the error record of %s could not be encoded", plan.keys.base)
            finally:
                if payload is None:  # the codec failed (or was interrupted): give the lease back
                    held.settle(False)
                    await self._abandon(state, plan, wait=True)
            if payload is None:
                raise
            completion = await self._complete(state, plan, status, payload)
            core.note_waiters(watch, completion)
            if not core.settled(held, completion):
                return RETRY  # type: ignore[no-any-return]
            raise
        except BaseException:
            # Cancelled, KeyboardInterrupt, SystemExit: abandon so others take over at once.
            watchdog.release(held)
            held.settle(False)
            await self._abandon(state, plan, wait=True)
            raise
        finally:
            _CURRENT.reset(context)
        watchdog.release(held)
        try:
            if plan.fleet is None:
                payload = core.encode(plan.keys, value)
            else:
                stored = core.stored_entry(plan, held, value, None)
                payload = b"" if stored is None else stored
                if stored is None:
                    plan.result_ms = 0  # no lifetimes given: announce, store nothing
        except CodecError as exc:
            completion = await self._complete(
                state, plan, proto.ERROR, core.error_payload(plan.keys, exc, encoding=True)
            )
            core.note_waiters(watch, completion)
            held.settle(False)  # its callers get the CodecError, not the value
            if not core.settled(held, completion):
                return RETRY  # type: ignore[no-any-return]
            raise
        except BaseException:
            # The codec raised something else (a bug, an interrupt): give the lease
            # back, so other processes take over at once rather than after a lease.
            held.settle(False)
            await self._abandon(state, plan, wait=True)
            raise
        completion = await self._complete(state, plan, proto.OK, payload)
        core.note_waiters(watch, completion)
        if not core.settled(held, completion):
            return RETRY  # type: ignore[no-any-return]
        return value

    async def _complete(
        self, state: Clients, plan: Plan, status: str, payload: bytes
    ) -> Completion | None:
        """COMPLETE (fenced): publish the outcome.  A Redis failure is logged, not raised:
        the leader's callers still get its outcome, and waiters take over after the lease."""
        core = self._core
        keys, args = plan.complete_keys(), plan.complete_args(status, payload)
        try:
            reply = await _with_budget(
                core,
                "completion",
                plan.keys,
                lambda: eval_script(state.commands, proto.COMPLETE_SCRIPT, keys, args),
                deadline=core.settings.operation_deadline(_monotonic()),
            )
        except RedisError:
            return None
        return core.completed(plan, reply)

    async def _forget_remote(
        self, state: Clients, key: K, text: str, only_unshared: bool, *, quiet: bool
    ) -> bool:
        core = self._core
        keys = core.keys(text)
        closed = core.settings.policy == "closed" and not quiet
        if core.forget_skipped(key, closed=closed):
            return True
        try:
            reply = await _with_budget(
                core,
                "forget",
                keys,
                lambda: eval_script(
                    state.commands,
                    proto.FORGET_SCRIPT,
                    keys.forget_keys(),
                    core.forget_args(only_unshared),
                ),
                deadline=core.settings.operation_deadline(_monotonic()),
            )
        except RedisError as exc:
            core.forget_failed(key, exc, closed=closed)
            return True
        return bool(reply)
