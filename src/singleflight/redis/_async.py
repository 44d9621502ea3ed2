# unasync: async-only
"""The asyncio driver: :class:`AsyncRedisGroup`, coalescing across processes on redis.asyncio.

The twin of ``_sync.py``: the same :class:`_protocol.Plan` and
:class:`_core.GroupCore`, awaited instead of blocked on.  An
:class:`singleflight.AsyncGroup` in front keeps one Redis waiter per key per
event loop.  Redis clients, the watchdog task and pending forgets are kept per
event loop, since redis.asyncio connections belong to the loop that made them.
"""
# unasync: sync-only
# """The thread driver: :class:`RedisGroup`, coalescing across processes on redis.Redis.
#
# In front, an in-process :class:`singleflight.Group`: only the thread leading a
# key's local flight talks to Redis, so a process sends at most one waiter per
# key there.  That thread follows a :class:`_protocol.Plan`; one watchdog
# thread per group renews the leases of the loaders it runs.
# """
# unasync: end

from __future__ import annotations

# unasync: async-only
import asyncio
import time
import weakref
from asyncio import AbstractEventLoop, CancelledError, get_running_loop
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Literal, ParamSpec, TypeVar

from redis.exceptions import RedisError

from .._asyncio import AsyncGroup
from .._result import Result
from ..events import EventHook
from ..stats import RedisGroupStats
from . import _protocol as proto
from ._asyncio_only import Client, Clients, call, eval_script, read_blocking, sleep
from ._clients import configure_async
from ._core import (
    _CURRENT,
    RETRY,
    Caller,
    FlightInfo,
    GroupCore,
    Watch,
    calling,
    with_shared,
)
from ._protocol import Completion, FleetCall, Keys, Plan, RetryBudget, Settings
from .codecs import Codec, CodecError

# unasync: sync-only
# import time
# from collections.abc import Callable
# from concurrent.futures import Executor, Future
# from typing import Any, Generic, Literal, ParamSpec, TypeVar
#
# from redis.exceptions import RedisError
#
# from .._result import Result
# from .._threads import Group
# from ..events import EventHook
# from ..stats import RedisGroupStats
# from . import _protocol as proto
# from ._clients import configure_sync
# from ._core import (
#     _CURRENT,
#     RETRY,
#     Caller,
#     FlightInfo,
#     GroupCore,
#     Watch,
#     calling,
#     with_shared,
# )
# from ._protocol import Completion, FleetCall, Keys, Plan, RetryBudget, Settings
# from ._threads_only import Client, Clients, call, eval_script, read_blocking, sleep
# from .codecs import Codec, CodecError
#
# unasync: end
__all__ = ["AsyncRedisGroup"]

K = TypeVar("K")
V = TypeVar("V")
P = ParamSpec("P")

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


class AsyncRedisGroup(Generic[K, V]):
    # unasync: async-only
    """Coalesces calls that share a key across tasks, processes and machines, on Redis.

    ``AsyncRedisGroup(redis.asyncio.Redis(...), namespace="users")`` (or a
    ``redis.asyncio.cluster.RedisCluster``, or a Sentinel's ``master_for``
    client).  The API
    of :class:`singleflight.AsyncGroup` (``do``, ``do_result``, ``do_future``,
    ``forget``, ``forget_unshared``, ``in``, ``len``) plus :meth:`aforget` and
    :meth:`aclose`; the options of :class:`RedisGroup` (``max_flights``,
    ``on_limit`` and ``timeout`` as for :class:`AsyncGroup`), and
    ``cancel_orphaned`` as for :class:`AsyncGroup`.

    The group makes its own Redis clients per event loop (copies of
    ``client``'s pool with bounded timeouts); close them with ``await
    group.aclose()`` or ``async with group:`` before the loop ends.
    """

    # unasync: sync-only
    # """Coalesces calls that share a key across threads, processes and machines, on Redis.
    #
    # ``RedisGroup(redis.Redis(...), namespace="users")`` (or a
    # ``redis.cluster.RedisCluster``, or a Sentinel's ``master_for`` client).  It has the API of
    # :class:`singleflight.Group` (``do``, ``do_result``, ``do_future``,
    # ``forget``, ``forget_unshared``, ``in``, ``len``), and calls of one key
    # share one execution of the loader among every process using the same
    # Redis and namespace, while the loader's lease is live.
    #
    # Options (keyword-only):
    #
    # ``namespace``
    #     Prefix of every Redis key of the group (required).  Groups with the
    #     same namespace and Redis share flights: give each kind of value its own.
    # ``lease`` (3 s)
    #     How long a leader's claim lasts without renewal.  A watchdog thread
    #     renews it every ``lease / 3`` while the loader runs, so it bounds how
    #     long others wait for a leader that died, not how long a loader may run.
    # ``result_ttl`` (5 s)
    #     How long a result stays in Redis for callers arriving just after the
    #     flight; ``0`` keeps none (coalescing only).  Errors are never kept.
    # ``max_wait`` (30 s)
    #     The longest a process's flight waits on other processes; then
    #     ``on_redis_error`` applies.
    # ``on_redis_error`` (``"open"``)
    #     ``"open"``: when Redis fails (after the retry budget) or ``max_wait``
    #     passes, run the loader locally.  ``"closed"``: raise
    #     :class:`RedisUnavailableError` or :class:`WaitTimeoutError`.
    # ``codec`` (:class:`JsonCodec`)
    #     How values travel: :class:`JsonCodec`, :class:`MsgpackCodec` or
    #     :class:`SignedPickleCodec`.  A payload that fails to decode is a miss.
    # ``key_to_str``
    #     A function turning the caller's key into a str for Redis; by default
    #     str and int keys, and tuples of str, int, float, bool and None, are
    #     accepted (``42`` and ``"42"`` are the same key).
    # ``redis_timeout`` (0.5 s)
    #     Socket connect and read timeout of each Redis command.
    # ``retry_budget`` (0.5 s)
    #     How long one operation retries transient Redis errors (within the
    #     caller's deadline) before the error policy applies.
    # ``max_payload`` (1 MiB)
    #     Largest encoded value; a larger one raises :class:`PayloadTooLargeError`.
    # ``breaker_threshold`` (5), ``breaker_cooldown`` (2 s)
    #     After that many failed Redis operations in a row, skip Redis for the
    #     cooldown, then probe with one call.
    # ``configure_client`` (True)
    #     Talk through copies of ``client`` (its pool, its Sentinel pool, or its
    #     cluster's nodes) with bounded timeouts and no redis-py retry (see the
    #     README); False uses ``client`` as given.
    # ``executor``
    #     Runs the loaders of :meth:`do_future`, as for :class:`Group`.
    # ``name`` (the namespace)
    #     Labels the group's events and metrics; a non-empty str.
    # ``on_event``
    #     A callable given each :mod:`singleflight.events` event, in the thread
    #     of the call it concerns: ``FlightStarted`` when this process leads
    #     (holding the lease), ``Joined`` when a call waits on another's flight
    #     (here, or in another process; also for a stored result), the flight's
    #     ``FlightFinished`` / ``FlightFailed`` / ``FlightAborted`` (``callers``
    #     counts those here and in other processes), ``TimedOut`` at
    #     ``max_wait``, ``RanLocally`` when the loader runs without Redis
    #     (policy "open"), ``RedisUnavailable`` when a call fails for Redis
    #     (policy "closed").  A hook that raises is logged
    #     and ignored.  :meth:`stats` returns the counters.
    # ``max_flights``, ``on_limit`` (``"raise"``), ``timeout``
    #     As for :class:`Group`, applied in this process: at most
    #     ``max_flights`` keys in flight here (a new key beyond it raises
    #     :class:`TooManyFlightsError` or waits for a slot), and a caller waits at
    #     most ``timeout`` seconds, then alone raises ``WaitTimeoutError`` while the
    #     flight goes on (``Rejected`` and ``TimedOut`` events; counted in
    #     ``rejected`` and ``timeouts``).
    #
    # Guarantee: an efficiency lock.  Duplicate loads can happen when a leader
    # stalls past its lease, when Redis restarts or fails over, or under the
    # ``"open"`` policy; a stale leader never overwrites a newer result.
    # """
    # unasync: end

    # Its do() may return a value (or raise a RemoteError) loaded by another
    # process: a LoadingCache in front writes such outcomes back (see GroupLike).
    crosses_processes = True

    # unasync: async-only
    __slots__ = ("__weakref__", "_client", "_configure", "_core", "_local", "_states")
    # unasync: sync-only
    # __slots__ = ("__weakref__", "_clients", "_configure", "_core", "_local")
    # unasync: end

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
        # unasync: async-only
        configure_async(client, settings, configure_client)  # check the client now
        self._client = client
        # unasync: sync-only
        # self._clients = Clients(self._core, *configure_sync(client, settings, configure_client))
        # unasync: end
        self._configure = configure_client
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
        # unasync: async-only
        self._states: weakref.WeakKeyDictionary[AbstractEventLoop, Clients] = (
            weakref.WeakKeyDictionary()
        )
        # unasync: end

    # -- the AsyncGroup API ----------------------------------------------------------

    async def do(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> V:
        # unasync: async-only
        """Run ``fn(*args, **kwargs)`` once for ``key`` across every process, or join that run.

        Returns and raises as :meth:`RedisGroup.do`: the loader's value (a
        decoded copy in other processes), its exception in this process and
        :class:`LoaderError` in others, :class:`RedisUnavailableError` /
        :class:`WaitTimeoutError` under ``on_redis_error="closed"``,
        :class:`CodecError` / :class:`PayloadTooLargeError` for a value that
        cannot be encoded (in every caller, in every process), ``TypeError``
        for a bad key or ``fn`` and ``ValueError`` for a key that is not valid
        Unicode, before anything runs.

        Cancellation: as :meth:`AsyncGroup.do`: cancelling a caller affects
        that caller alone.  The Redis work runs in the local flight's loader
        task; when that task is cancelled (``cancel_orphaned=True`` and every
        caller left, or the loop shutting down) while it leads, the flight is
        abandoned in Redis so another process takes over at once; local
        waiters get :class:`AbortedError`.
        """
        # unasync: sync-only
        # """Run ``fn(*args, **kwargs)`` once for ``key`` across every process, or join that run.
        #
        # Returns the loader's value: the object itself in the leader's process,
        # a copy decoded by the codec elsewhere.
        #
        # Errors: in the leader's process the loader's :class:`Exception` is
        # raised as :class:`Group` raises it; callers in other processes raise
        # :class:`LoaderError` (type name and message).  A ``BaseException``
        # stopping the loader (``KeyboardInterrupt``, ``SystemExit``) abandons
        # the flight in Redis, so other processes take over at once; local
        # waiters get :class:`AbortedError`.  Under ``on_redis_error="closed"``:
        # :class:`RedisUnavailableError` when Redis fails past the retry budget
        # or the breaker is open, :class:`WaitTimeoutError` after ``max_wait``;
        # under ``"open"`` the loader runs locally instead.
        # :class:`PayloadTooLargeError` / :class:`CodecError` when the value
        # cannot be encoded: in every caller of the flight, in every process
        # (never a :class:`LoaderError`).  ``TypeError`` for a
        # key that is unhashable or of another type (without ``key_to_str=``), or a
        # non-callable ``fn``, and ``ValueError`` for a str key that is not valid
        # Unicode (a lone surrogate), before anything runs; ``RuntimeError`` for a
        # loader calling ``do`` on its own key.
        #
        # Timing: a caller returns at most about ``max_wait + redis_timeout``
        # after its process's flight started, plus the loader's own time when
        # it runs here.  A waiting ``do`` cannot be cancelled; use :meth:`do_future`.
        # """
        # unasync: end
        text = self._core.checked(key, fn)
        with calling() as caller:
            return await self._local.do(key, self._fly, key, text, fn, args, kwargs, caller)

    async def do_result(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Result[V]:
        # unasync: async-only
        """Like :meth:`do`, but returns a :class:`Result` instead of raising.

        ``shared`` as for :meth:`RedisGroup.do_result`.  Cancellation, and
        ``TypeError`` / ``RuntimeError``, as for :meth:`do`.
        """
        # unasync: sync-only
        # """Like :meth:`do`, but returns a :class:`Result` instead of raising.
        #
        # ``Result.error`` holds the loader's exception, a :class:`LoaderError`,
        # :class:`AbortedError`, or under ``"closed"`` the Redis errors of
        # :meth:`do`.  ``shared`` is true when the value reached more than one
        # caller: in this process, or through Redis (taken from another process,
        # or given to one that waited).  ``TypeError`` and ``RuntimeError`` are
        # raised as by :meth:`do`.
        # """
        # unasync: end
        text = self._core.checked(key, fn)
        with calling() as caller:
            result = await self._local.do_result(
                key, self._fly, key, text, fn, args, kwargs, caller
            )
        return with_shared(result, caller)

    def do_future(
        self,
        key: K,
        fn: Callable[P, Awaitable[V]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
        # unasync: async-only
    ) -> asyncio.Future[V]:
        # unasync: sync-only
        # ) -> Future[V]:
        # unasync: end
        # unasync: async-only
        """Start or join the flight of ``key``; return at once with a future of its outcome.

        As :meth:`AsyncGroup.do_future`: each caller's future is its own.
        """
        # unasync: sync-only
        # """Start or join the flight of ``key`` and return at once with a future of its outcome.
        #
        # As :meth:`Group.do_future`: each caller gets its own future, which it
        # may cancel or wait on with a timeout without affecting the flight.
        # The future holds what :meth:`do` would return or raise.
        # """
        # unasync: end
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
        """Let the next call of ``key``, in any process, start a new flight.

        The local flight is forgotten at once.  The Redis part (dropping the
        stored result, detaching the running flight, as :meth:`RedisGroup.forget`)
        runs in a task of the running loop, and this loop's next flight of the
        key waits for it; a failure is logged.  Outside an event loop only the
        local part is done.  ``await`` :meth:`aforget` to wait for Redis.
        """
        text = self._core.redis_key(key)
        self._core.forgetting(text)
        self._local.forget(key)
        try:
            loop = get_running_loop()
        except RuntimeError:
            return
        state = self._state()
        task = loop.create_task(self._forget_remote(state, key, text, False, quiet=True))
        state.forgets[text] = task

        def done(task: asyncio.Task[Any]) -> None:
            if state.forgets.get(text) is task:
                del state.forgets[text]

        task.add_done_callback(done)

    async def aforget(self, key: K) -> None:
        """:meth:`forget`, waiting for Redis.

        Under ``on_redis_error="closed"`` a Redis failure raises
        :class:`RedisUnavailableError`.
        """
        text = self._core.redis_key(key)
        self._core.forgetting(text)
        self._local.forget(key)
        await self._forget_remote(self._state(), key, text, False, quiet=False)

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
            get_running_loop()
        except RuntimeError:
            return True
        state = self._state()
        self._spawn(state, self._forget_remote(state, key, text, True, quiet=True))
        return True

    # unasync: sync-only
    # def forget(self, key: K) -> None:
    #     """Let the next call of ``key``, in any process, start a new flight.
    #
    #     Drops the result stored in Redis and detaches the running flight, if
    #     any: new callers lead a new one.  Once it returns, no caller that
    #     starts after it, in any process, gets the outcome of a flight that
    #     started before it: this process's callers of the detached flight still
    #     get its outcome (they all came before), processes waiting on it ask
    #     again, and a process leading it runs it again.  The outcome is not
    #     stored.  Under ``on_redis_error="closed"`` a Redis failure raises
    #     :class:`RedisUnavailableError` (the local flight is forgotten anyway);
    #     under ``"open"`` it is logged.
    #     """
    #     text = self._core.redis_key(key)
    #     self._core.forgetting(text)
    #     self._local.forget(key)
    #     self._forget_remote(self._clients, key, text, False, quiet=False)
    #
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

    def __contains__(self, key: object) -> bool:
        # unasync: async-only
        """Whether ``key`` is in flight in the running loop (outside a loop: in any loop)."""
        # unasync: sync-only
        # """Whether ``key`` is in flight in this process."""
        # unasync: end
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
        state = self._states.pop(get_running_loop(), None)
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
        loop = get_running_loop()
        state = self._states.get(loop)
        if state is None:
            commands, blocking = configure_async(self._client, self._core.settings, self._configure)
            state = self._states[loop] = Clients(self._core, commands, blocking)
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
            except CancelledError:
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
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
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
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
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
            stored = core.stored_entry(plan, held, None, exc)  # a fleet's not-found entry
            if stored is not None:
                completion = await self._complete(state, plan, proto.OK, stored)
            else:
                completion = await self._complete(
                    state, plan, proto.ERROR, core.error_payload(plan.keys, exc)
                )
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
