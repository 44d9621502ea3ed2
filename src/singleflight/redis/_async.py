"""The asyncio driver: :class:`AsyncRedisGroup`, coalescing across processes on redis.asyncio.

The twin of ``_sync.py``: the same :class:`_protocol.Plan` and
:class:`_core.GroupCore`, awaited instead of blocked on.  An
:class:`singleflight.AsyncGroup` in front keeps one Redis waiter per key per
event loop.  Redis clients, the watchdog task and pending forgets are kept per
event loop, since redis.asyncio connections belong to the loop that made them.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from asyncio import AbstractEventLoop, CancelledError, get_running_loop
from collections.abc import Awaitable, Callable
from inspect import isawaitable
from typing import Any, Generic, Literal, ParamSpec, TypeVar

import redis.asyncio
from redis.exceptions import NoScriptError, RedisError

from .._asyncio import AsyncGroup
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
    describe,
    log,
    with_shared,
)
from ._protocol import Completion, Held, Keys, Plan, Renewals, RetryBudget, Script, Settings
from .codecs import Codec, CodecError

__all__ = ["AsyncRedisGroup"]

K = TypeVar("K")
V = TypeVar("V")
P = ParamSpec("P")

_monotonic = time.monotonic


def _command(client: Any, *args: Any) -> Any:
    """``client.execute_command(*args)``: redis-py leaves it untyped; _protocol parses replies."""
    return client.execute_command(*args)


async def _eval(
    client: redis.asyncio.Redis, script: Script, keys: list[str], args: list[Any]
) -> Any:
    """EVALSHA, or EVAL when the server has lost its script cache (after a restart)."""
    try:
        return await _command(client, "EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return await _command(client, "EVAL", script.source, len(keys), *keys, *args)


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
            await asyncio.sleep(delay)
            continue
        core.breaker.success()
        return reply


class _Watchdog:
    """One task per group and event loop, renewing its loaders' leases every ``lease / 3``.

    A task, not a thread: redis.asyncio clients live in their loop.  A loader
    that blocks the loop for longer than the lease delays renewals, so another
    process may take over; the late leader's completion is then fenced (or its
    lease resurrected if nobody took it).  The task ends after a while with
    nothing to renew.
    """

    __slots__ = ("_client", "_core", "_idle_exit", "_renewals", "_task", "_wake")

    def __init__(self, core: GroupCore[Any], client: redis.asyncio.Redis) -> None:
        self._core = core
        self._client = client
        self._idle_exit = max(core.settings.lease, 1.0)
        self._renewals = Renewals(core.settings)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def hold(self, held: Held) -> None:
        was_idle = not self._renewals.held
        self._renewals.add(held, _monotonic())
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="singleflight redis watchdog"
            )
        elif was_idle:
            self._wake.set()

    def release(self, held: Held) -> None:
        self._renewals.remove(held)

    async def stop(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except CancelledError:
                pass

    async def _run(self) -> None:
        renewals = self._renewals
        idle_since: float | None = None
        while True:
            now = _monotonic()
            wait = renewals.next_wake(now)
            if wait is None:
                idle_since = now if idle_since is None else idle_since
                if now - idle_since >= self._idle_exit:
                    return
                wait = self._idle_exit - (now - idle_since)
            else:
                idle_since = None
            if wait > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass
                continue
            due = renewals.due(now)
            codes = await self._renew(due)
            now = _monotonic()
            for held, code in zip(due, codes, strict=True):
                if held.token not in renewals.held:
                    continue  # its loader finished meanwhile
                if code is None:
                    renewals.failed(held, now)
                    continue
                renewals.renewed(held, code, now)
                self._core.renewed(held, code)

    async def _renew(self, due: list[Held]) -> list[int | None]:
        """RENEW every due lease in one round trip; None where it failed."""
        settings = self._core.settings
        script = proto.RENEW_SCRIPT
        extra = [settings.lease_ms, settings.fence_ttl_ms]
        replies: list[Any] = []
        for attempt in (0, 1):
            pipe = self._client.pipeline(transaction=False)
            for held in due:
                name, code = ("EVAL", script.source) if attempt else ("EVALSHA", script.sha)
                _command(pipe, name, code, 2, *held.renew_keys(), held.token, *extra)
            try:
                replies = await pipe.execute(raise_on_error=False)
            except RedisError as exc:
                log.debug("lease renewal failed: %s", describe(exc))
                return [None] * len(due)
            if attempt or not any(isinstance(r, NoScriptError) for r in replies):
                break
        return [None if isinstance(r, Exception) else int(r) for r in replies]


class _LoopState:
    """A group's things that belong to one event loop."""

    __slots__ = ("background", "blocking", "commands", "forgets", "watchdog")

    def __init__(
        self, core: GroupCore[Any], commands: redis.asyncio.Redis, blocking: redis.asyncio.Redis
    ) -> None:
        self.commands = commands
        self.blocking = blocking
        self.watchdog = _Watchdog(core, commands)
        self.forgets: dict[str, asyncio.Task[Any]] = {}
        self.background: set[asyncio.Task[Any]] = set()


class AsyncRedisGroup(Generic[K, V]):
    """Coalesces calls that share a key across tasks, processes and machines, on Redis.

    ``AsyncRedisGroup(redis.asyncio.Redis(...), namespace="users")``.  The API
    of :class:`singleflight.AsyncGroup` (``do``, ``do_result``, ``do_future``,
    ``forget``, ``forget_unshared``, ``in``, ``len``) plus :meth:`aforget` and
    :meth:`aclose`; the options of :class:`RedisGroup` (``max_flights``,
    ``on_limit`` and ``timeout`` as for :class:`AsyncGroup`), and
    ``cancel_orphaned`` as for :class:`AsyncGroup`.

    The group makes its own Redis clients per event loop (copies of
    ``client``'s pool with bounded timeouts); close them with ``await
    group.aclose()`` or ``async with group:`` before the loop ends.
    """

    # Its do() may return a value (or raise a RemoteError) loaded by another
    # process: a LoadingCache in front writes such outcomes back (see GroupLike).
    crosses_processes = True

    __slots__ = ("__weakref__", "_client", "_configure", "_core", "_local", "_states")

    def __init__(
        self,
        client: redis.asyncio.Redis,
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
        cancel_orphaned: bool = False,
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
        configure_async(client, settings, configure_client)  # check the client now
        self._client = client
        self._configure = configure_client
        # The local group tells the core of its flights and joins (always: the
        # counts of led flights come from there, hook or not).
        self._local: AsyncGroup[K, V] = AsyncGroup(
            cancel_orphaned=cancel_orphaned,
            name=self._core.name,
            on_event=self._core.local_event,
            max_flights=max_flights,
            on_limit=on_limit,
            timeout=timeout,
        )
        self._states: weakref.WeakKeyDictionary[AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )

    # -- the AsyncGroup API ----------------------------------------------------------

    async def do(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> V:
        """Run ``fn(*args, **kwargs)`` once for ``key`` across every process, or join that run.

        Returns and raises as :meth:`RedisGroup.do`: the loader's value (a
        decoded copy in other processes), its exception in this process and
        :class:`LoaderError` in others, :class:`RedisUnavailableError` /
        :class:`WaitTimeoutError` under ``on_redis_error="closed"``,
        :class:`CodecError` for a value that cannot be encoded, ``TypeError``
        for a bad key or ``fn`` before anything runs.

        Cancellation: as :meth:`AsyncGroup.do`: cancelling a caller affects
        that caller alone.  The Redis work runs in the local flight's loader
        task; when that task is cancelled (``cancel_orphaned=True`` and every
        caller left, or the loop shutting down) while it leads, the flight is
        abandoned in Redis so another process takes over at once; local
        waiters get :class:`AbortedError`.
        """
        text = self._core.checked(key, fn)
        with calling() as caller:
            return await self._local.do(key, self._fly, key, text, fn, args, kwargs, caller)

    async def do_result(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Result[V]:
        """Like :meth:`do`, but returns a :class:`Result` instead of raising.

        ``shared`` as for :meth:`RedisGroup.do_result`.  Cancellation, and
        ``TypeError`` / ``RuntimeError``, as for :meth:`do`.
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

        As :meth:`AsyncGroup.do_future`: each caller's future is its own.
        """
        text = self._core.checked(key, fn)
        with calling() as caller:
            return self._local.do_future(key, self._fly, key, text, fn, args, kwargs, caller)

    def forget(self, key: K) -> None:
        """Let the next call of ``key``, in any process, start a new flight.

        The local flight is forgotten at once.  The Redis part (dropping the
        stored result, detaching the running flight, as :meth:`RedisGroup.forget`)
        runs in a task of the running loop, and this loop's next flight of the
        key waits for it; a failure is logged.  Outside an event loop only the
        local part is done.  ``await`` :meth:`aforget` to wait for Redis.
        """
        text = self._core.redis_key(key)
        self._local.forget(key)
        try:
            loop = get_running_loop()
        except RuntimeError:
            return
        state = self._state(loop)
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
        self._local.forget(key)
        await self._forget_remote(self._state(get_running_loop()), key, text, False, quiet=False)

    def forget_unshared(self, key: K) -> bool:
        """Forget ``key`` only if nobody joined its flight in this loop.

        Returns the local answer; when it is True, the Redis part runs as for
        :meth:`forget` but only if no other process waited on the flight.
        """
        text = self._core.redis_key(key)
        if not self._local.forget_unshared(key):
            return False
        try:
            loop = get_running_loop()
        except RuntimeError:
            return True
        state = self._state(loop)
        self._spawn(state, self._forget_remote(state, key, text, True, quiet=True))
        return True

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is in flight in the running loop (outside a loop: in any loop)."""
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

    async def __aenter__(self) -> AsyncRedisGroup[K, V]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the distributed flight -------------------------------------------------------

    def _state(self, loop: AbstractEventLoop) -> _LoopState:
        state = self._states.get(loop)
        if state is None:
            commands, blocking = configure_async(self._client, self._core.settings, self._configure)
            state = self._states[loop] = _LoopState(self._core, commands, blocking)
        return state

    def _spawn(self, state: _LoopState, work: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(work)
        state.background.add(task)
        task.add_done_callback(state.background.discard)
        return task

    async def _fly(
        self,
        key: K,
        text: str,
        fn: Callable[..., Awaitable[V]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        caller: Caller,
    ) -> V:
        """The local flight's loader task: get the value through Redis, or lead and load it."""
        core = self._core
        state = self._state(get_running_loop())
        forgetting = state.forgets.get(text)
        if forgetting is not None:
            await asyncio.shield(forgetting)  # never raises: quiet forgets log their errors
        keys = core.keys(text)
        plan = Plan(core.settings, keys, core.breaker, _monotonic())
        watch = Watch(core, key, caller)
        try:
            while True:
                op = plan.op
                if op == proto.ACQUIRE:
                    try:
                        reply = await _eval(
                            state.commands,
                            proto.ACQUIRE_SCRIPT,
                            plan.acquire_keys(),
                            plan.acquire_args(),
                        )
                    except RedisError as exc:
                        core.redis_error(plan, exc)
                        continue
                    except CancelledError:
                        # The script may have run and made us leader: give the
                        # lease back rather than keep others waiting a lease.
                        self._spawn(state, self._complete(state, plan, proto.ABANDONED, b""))
                        raise
                    plan.acquired(reply, _monotonic())
                elif op == proto.READ:
                    watch.read()
                    try:
                        reply = await _command(state.blocking, *plan.read_command())
                    except RedisError as exc:
                        core.redis_error(plan, exc)
                        continue
                    plan.read(reply, _monotonic())
                elif op == proto.SLEEP:
                    await asyncio.sleep(plan.delay)
                    plan.resume(_monotonic())
                elif op == proto.HIT or op == proto.REMOTE_ERROR:
                    value: V = core.received(key, plan, watch)
                    if value is not RETRY:
                        return value
                elif op == proto.LEAD:
                    return await self._lead(state, key, plan, fn, args, kwargs, watch)
                elif op == proto.LOCAL:
                    core.local_run(key, plan, watch)
                    return await _call(fn, args, kwargs)
                else:
                    raise core.failure(key, plan, watch)
        finally:
            watch.stop()  # cancelled while waiting: the wait still counts

    async def _lead(
        self,
        state: _LoopState,
        key: K,
        plan: Plan,
        fn: Callable[..., Awaitable[V]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        watch: Watch,
    ) -> V:
        """Run the loader holding the lease, then complete (or abandon) the flight in Redis."""
        core = self._core
        held = core.lead(plan, watch)
        watchdog = state.watchdog
        watchdog.hold(held)
        context = _CURRENT.set(FlightInfo(key, held))
        try:
            value = await _call(fn, args, kwargs)
        except Exception as exc:
            watchdog.release(held)
            completion = await self._complete(
                state, plan, proto.ERROR, core.error_payload(plan.keys, exc)
            )
            core.note_waiters(watch, completion)
            raise
        except BaseException:
            # Cancelled (or stopped): abandon so others take over at once.  In
            # a task of its own, so that cancelling us again cannot stop it.
            watchdog.release(held)
            abandon = self._spawn(state, self._complete(state, plan, proto.ABANDONED, b""))
            try:
                await asyncio.shield(abandon)
            except CancelledError:
                pass
            raise
        finally:
            _CURRENT.reset(context)
        watchdog.release(held)
        try:
            payload = core.encode(plan.keys, value)
        except CodecError as exc:
            completion = await self._complete(
                state, plan, proto.ERROR, core.error_payload(plan.keys, exc)
            )
            core.note_waiters(watch, completion)
            raise
        completion = await self._complete(state, plan, proto.OK, payload)
        core.note_waiters(watch, completion)
        return value

    async def _complete(
        self, state: _LoopState, plan: Plan, status: str, payload: bytes
    ) -> Completion | None:
        """COMPLETE (fenced).  A Redis failure is logged, not raised (see RedisGroup)."""
        core = self._core
        keys, args = plan.complete_keys(), plan.complete_args(status, payload)
        try:
            reply = await _with_budget(
                core,
                "completion",
                plan.keys,
                lambda: _eval(state.commands, proto.COMPLETE_SCRIPT, keys, args),
                deadline=_monotonic() + core.settings.retry_budget,
            )
        except RedisError:
            return None
        return core.completed(plan, reply)

    async def _forget_remote(
        self, state: _LoopState, key: K, text: str, only_unshared: bool, *, quiet: bool
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
                lambda: _eval(
                    state.commands,
                    proto.FORGET_SCRIPT,
                    [keys.res, keys.lease, keys.fence],
                    ["1" if only_unshared else "0"],
                ),
                deadline=_monotonic() + core.settings.retry_budget,
            )
        except RedisError as exc:
            core.forget_failed(key, exc, closed=closed)
            return True
        return bool(reply)


async def _call(
    fn: Callable[..., Awaitable[V]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> V:
    returned = fn(*args, **kwargs)
    if not isawaitable(returned):
        raise TypeError(
            f"AsyncRedisGroup needs fn to be an async function or to return an awaitable; "
            f"{fn!r} returned {type(returned).__name__}"
        )
    return await returned
