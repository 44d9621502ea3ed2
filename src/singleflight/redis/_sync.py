"""The thread driver: :class:`RedisGroup`, coalescing across processes on redis.Redis.

In front, an in-process :class:`singleflight.Group`: only the thread leading a
key's local flight talks to Redis, so a process sends at most one waiter per
key there.  That thread follows a :class:`_protocol.Plan`; one watchdog
thread per group renews the leases of the loaders it runs.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, Generic, Literal, ParamSpec, TypeVar

import redis
from redis.exceptions import NoScriptError, RedisError

from .._result import Result
from .._threads import Group
from ..events import EventHook
from ..stats import RedisGroupStats
from . import _protocol as proto
from ._clients import configure_sync
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

__all__ = ["RedisGroup"]

K = TypeVar("K")
V = TypeVar("V")
P = ParamSpec("P")

_monotonic = time.monotonic


def _command(client: Any, *args: Any) -> Any:
    """``client.execute_command(*args)``: redis-py leaves it untyped; _protocol parses replies."""
    return client.execute_command(*args)


def _eval(client: redis.Redis, script: Script, keys: list[str], args: list[Any]) -> Any:
    """EVALSHA, or EVAL when the server has lost its script cache (after a restart)."""
    try:
        return _command(client, "EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return _command(client, "EVAL", script.source, len(keys), *keys, *args)


def _with_budget(
    core: GroupCore[Any], what: str, keys: Keys, call: Callable[[], Any], *, deadline: float
) -> Any:
    """Run one Redis operation with the group's retry budget; raise its last error."""
    budget = RetryBudget(core.settings)
    while True:
        try:
            reply = call()
        except RedisError as exc:
            delay = core.retry_delay(budget, what, keys, exc, deadline)
            if delay is None:
                raise
            time.sleep(delay)
            continue
        core.breaker.success()
        return reply


class _Watchdog:
    """One thread per group renewing the leases its loaders hold, every ``lease / 3``.

    The thread starts with the first lease and ends after a while with none;
    renewals due together go in one pipeline.  After ``fork`` the child starts
    afresh (the parent's thread does not exist there).
    """

    __slots__ = (
        "__weakref__",
        "_client",
        "_core",
        "_idle_exit",
        "_lock",
        "_pid",
        "_renewals",
        "_thread",
        "_wake",
    )

    def __init__(self, core: GroupCore[Any], client: redis.Redis) -> None:
        self._core = core
        self._client = client
        self._idle_exit = max(core.settings.lease, 1.0)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._renewals = Renewals(self._core.settings)
        self._thread: threading.Thread | None = None

    def hold(self, held: Held) -> None:
        if self._pid != os.getpid():
            self._reset()
        with self._lock:
            was_idle = not self._renewals.held
            self._renewals.add(held, _monotonic())
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="singleflight redis watchdog", daemon=True
                )
                self._thread.start()
                _WATCHDOGS.add(self)
            elif was_idle:
                self._wake.notify()

    def release(self, held: Held) -> None:
        with self._lock:
            self._renewals.remove(held)

    def held(self) -> list[Held]:
        with self._lock:
            return list(self._renewals.held.values())

    def _run(self) -> None:
        renewals = self._renewals
        idle_since: float | None = None
        while True:
            with self._lock:
                while True:
                    now = _monotonic()
                    wait = renewals.next_wake(now)
                    if wait is None:
                        idle_since = now if idle_since is None else idle_since
                        if now - idle_since >= self._idle_exit:
                            self._thread = None
                            return
                        self._wake.wait(self._idle_exit - (now - idle_since))
                        continue
                    idle_since = None
                    if wait > 0:
                        self._wake.wait(wait)
                        continue
                    due = renewals.due(now)
                    break
            codes = self._renew(due)
            now = _monotonic()
            with self._lock:
                for held, code in zip(due, codes, strict=True):
                    if held.token not in renewals.held:
                        continue  # its loader finished meanwhile
                    if code is None:
                        renewals.failed(held, now)
                    else:
                        renewals.renewed(held, code, now)
            self._count(due, codes)

    def _renew(self, due: list[Held]) -> list[int | None]:
        """RENEW every due lease in one round trip; None where it failed."""
        settings = self._core.settings
        script = proto.RENEW_SCRIPT
        extra = [settings.lease_ms, settings.fence_ttl_ms]
        for attempt in (0, 1):
            pipe = self._client.pipeline(transaction=False)
            for held in due:
                name, code = ("EVAL", script.source) if attempt else ("EVALSHA", script.sha)
                _command(pipe, name, code, 2, *held.renew_keys(), held.token, *extra)
            try:
                replies = pipe.execute(raise_on_error=False)
            except RedisError as exc:
                log.debug("lease renewal failed: %s", describe(exc))
                return [None] * len(due)
            if attempt or not any(isinstance(r, NoScriptError) for r in replies):
                break
        return [None if isinstance(r, Exception) else int(r) for r in replies]

    def _count(self, due: list[Held], codes: list[int | None]) -> None:
        for held, code in zip(due, codes, strict=True):
            self._core.renewed(held, code)


_WATCHDOGS: weakref.WeakSet[_Watchdog] = weakref.WeakSet()


@atexit.register
def _abandon_at_exit() -> None:
    """At interpreter exit, abandon the leases of loaders still running, so others take over now."""
    for watchdog in list(_WATCHDOGS):
        if watchdog._pid != os.getpid():
            continue
        settings = watchdog._core.settings
        for held in watchdog.held():
            keys = held.keys
            try:
                _eval(
                    watchdog._client,
                    proto.COMPLETE_SCRIPT,
                    [keys.fence, keys.res, keys.lease, keys.done(held.token)],
                    [
                        held.token,
                        proto.ABANDONED,
                        b"",
                        settings.result_ttl_ms,
                        settings.done_ttl_ms,
                    ],
                )
            except RedisError:
                break  # Redis is not answering: do not hold up the exit for each lease


class RedisGroup(Generic[K, V]):
    """Coalesces calls that share a key across threads, processes and machines, on Redis.

    ``RedisGroup(redis.Redis(...), namespace="users")``.  It has the API of
    :class:`singleflight.Group` (``do``, ``do_result``, ``do_future``,
    ``forget``, ``forget_unshared``, ``in``, ``len``), and calls of one key
    share one execution of the loader among every process using the same
    Redis and namespace, while the loader's lease is live.

    Options (keyword-only):

    ``namespace``
        Prefix of every Redis key of the group (required).  Groups with the
        same namespace and Redis share flights: give each kind of value its own.
    ``lease`` (3 s)
        How long a leader's claim lasts without renewal.  A watchdog thread
        renews it every ``lease / 3`` while the loader runs, so it bounds how
        long others wait for a leader that died, not how long a loader may run.
    ``result_ttl`` (5 s)
        How long a result stays in Redis for callers arriving just after the
        flight; ``0`` keeps none (coalescing only).  Errors are never kept.
    ``max_wait`` (30 s)
        The longest a process's flight waits on other processes; then
        ``on_redis_error`` applies.
    ``on_redis_error`` (``"open"``)
        ``"open"``: when Redis fails (after the retry budget) or ``max_wait``
        passes, run the loader locally.  ``"closed"``: raise
        :class:`RedisUnavailableError` or :class:`WaitTimeoutError`.
    ``codec`` (:class:`JsonCodec`)
        How values travel: :class:`JsonCodec`, :class:`MsgpackCodec` or
        :class:`SignedPickleCodec`.  A payload that fails to decode is a miss.
    ``key``
        A function turning the caller's key into a str for Redis; by default
        str and int keys, and tuples of str, int, float, bool and None, are
        accepted (``42`` and ``"42"`` are the same key).
    ``redis_timeout`` (0.5 s)
        Socket connect and read timeout of each Redis command.
    ``retry_budget`` (0.5 s)
        How long one operation retries transient Redis errors (within the
        caller's deadline) before the error policy applies.
    ``max_payload`` (1 MiB)
        Largest encoded value; a larger one raises :class:`PayloadTooLargeError`.
    ``breaker_threshold`` (5), ``breaker_cooldown`` (2 s)
        After that many failed Redis operations in a row, skip Redis for the
        cooldown, then probe with one call.
    ``configure_client`` (True)
        Talk through copies of ``client``'s pool with bounded timeouts and no
        redis-py retry (see the README); False uses ``client`` as given.
    ``executor``
        Runs the loaders of :meth:`do_future`, as for :class:`Group`.
    ``name`` (the namespace)
        Labels the group's events and metrics; a non-empty str.
    ``on_event``
        A callable given each :mod:`singleflight.events` event, in the thread
        of the call it concerns: ``FlightStarted`` when this process leads
        (holding the lease), ``Joined`` when a call waits on another's flight
        (here, or in another process; also for a stored result), the flight's
        ``FlightFinished`` / ``FlightFailed`` / ``FlightAborted`` (``callers``
        counts those here and in other processes), ``TimedOut`` at
        ``max_wait``, ``RanLocally`` when the loader runs without Redis
        (policy "open"), ``RedisUnavailable`` when a call fails for Redis
        (policy "closed").  A hook that raises is logged
        and ignored.  :meth:`stats` returns the counters.
    ``max_flights``, ``on_limit`` (``"raise"``), ``timeout``
        As for :class:`Group`, applied in this process: at most
        ``max_flights`` keys in flight here (a new key beyond it raises
        :class:`TooManyFlightsError` or waits for a slot), and a caller waits at
        most ``timeout`` seconds, then alone raises ``WaitTimeoutError`` while the
        flight goes on (``Rejected`` and ``TimedOut`` events; counted in
        ``rejected`` and ``timeouts``).

    Guarantee: an efficiency lock.  Duplicate loads can happen when a leader
    stalls past its lease, when Redis restarts or fails over, or under the
    ``"open"`` policy; a stale leader never overwrites a newer result.
    """

    # Its do() may return a value (or raise a RemoteError) loaded by another
    # process: a LoadingCache in front writes such outcomes back (see GroupLike).
    crosses_processes = True

    __slots__ = (
        "__weakref__",
        "_blocking",
        "_commands",
        "_configure",
        "_core",
        "_local",
        "_watchdog",
    )

    def __init__(
        self,
        client: redis.Redis,
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
        executor: Executor | None = None,
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
        self._commands, self._blocking = configure_sync(client, settings, configure_client)
        self._configure = configure_client
        # The local group tells the core of its flights and joins (always: the
        # counts of led flights come from there, hook or not).
        self._local: Group[K, V] = Group(
            executor=executor,
            name=self._core.name,
            on_event=self._core.local_event,
            max_flights=max_flights,
            on_limit=on_limit,
            timeout=timeout,
        )
        self._watchdog = _Watchdog(self._core, self._commands)

    # -- the Group API ----------------------------------------------------------------

    def do(self, key: K, fn: Callable[P, V], /, *args: P.args, **kwargs: P.kwargs) -> V:
        """Run ``fn(*args, **kwargs)`` once for ``key`` across every process, or join that run.

        Returns the loader's value: the object itself in the leader's process,
        a copy decoded by the codec elsewhere.

        Errors: in the leader's process the loader's :class:`Exception` is
        raised as :class:`Group` raises it; callers in other processes raise
        :class:`LoaderError` (type name and message).  A ``BaseException``
        stopping the loader (``KeyboardInterrupt``, ``SystemExit``) abandons
        the flight in Redis, so other processes take over at once; local
        waiters get :class:`AbortedError`.  Under ``on_redis_error="closed"``:
        :class:`RedisUnavailableError` when Redis fails past the retry budget
        or the breaker is open, :class:`WaitTimeoutError` after ``max_wait``;
        under ``"open"`` the loader runs locally instead.
        :class:`PayloadTooLargeError` / :class:`CodecError` when the value
        cannot be encoded (in every caller of the flight).  ``TypeError`` for a
        key that is unhashable or of another type (without ``key_to_str=``), or a
        non-callable ``fn``, before anything runs; ``RuntimeError`` for a
        loader calling ``do`` on its own key.

        Timing: a caller returns at most about ``max_wait + redis_timeout``
        after its process's flight started, plus the loader's own time when
        it runs here.  A waiting ``do`` cannot be cancelled; use :meth:`do_future`.
        """
        text = self._core.checked(key, fn)
        with calling() as caller:
            return self._local.do(key, self._fly, key, text, fn, args, kwargs, caller)

    def do_result(
        self, key: K, fn: Callable[P, V], /, *args: P.args, **kwargs: P.kwargs
    ) -> Result[V]:
        """Like :meth:`do`, but returns a :class:`Result` instead of raising.

        ``Result.error`` holds the loader's exception, a :class:`LoaderError`,
        :class:`AbortedError`, or under ``"closed"`` the Redis errors of
        :meth:`do`.  ``shared`` is true when the value reached more than one
        caller: in this process, or through Redis (taken from another process,
        or given to one that waited).  ``TypeError`` and ``RuntimeError`` are
        raised as by :meth:`do`.
        """
        text = self._core.checked(key, fn)
        with calling() as caller:
            result = self._local.do_result(key, self._fly, key, text, fn, args, kwargs, caller)
        return with_shared(result, caller)

    def do_future(
        self, key: K, fn: Callable[P, V], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[V]:
        """Start or join the flight of ``key`` and return at once with a future of its outcome.

        As :meth:`Group.do_future`: each caller gets its own future, which it
        may cancel or wait on with a timeout without affecting the flight.
        The future holds what :meth:`do` would return or raise.
        """
        text = self._core.checked(key, fn)
        with calling() as caller:
            return self._local.do_future(key, self._fly, key, text, fn, args, kwargs, caller)

    def forget(self, key: K) -> None:
        """Let the next call of ``key``, in any process, start a new flight.

        Drops the result stored in Redis and detaches the running flight, if
        any: new callers lead a new one, while the running loader's callers,
        here and elsewhere, still get its outcome (it is not stored).  Under
        ``on_redis_error="closed"`` a Redis failure raises
        :class:`RedisUnavailableError` (the local flight is forgotten anyway);
        under ``"open"`` it is logged.
        """
        text = self._core.redis_key(key)
        self._local.forget(key)
        self._forget_remote(key, text, only_unshared=False)

    def forget_unshared(self, key: K) -> bool:
        """Forget ``key`` only if nobody joined its flight, here or in another process.

        Returns True if it was forgotten or not in flight.  The two checks
        (local, then Redis) are not one atomic step: a caller joining in
        between may find the flight forgotten.
        """
        text = self._core.redis_key(key)
        if not self._local.forget_unshared(key):
            return False
        return self._forget_remote(key, text, only_unshared=True)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is in flight in this process."""
        return key in self._local

    def __len__(self) -> int:
        """The number of keys in flight in this process."""
        return len(self._local)

    def __repr__(self) -> str:
        return f"<RedisGroup namespace={self._core.namespace!r} in_flight={len(self)}>"

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

    def close(self) -> None:
        """Close the group's own Redis connections (not ``client``'s).

        Loaders still running keep their leases until they end or the leases
        lapse; a call after ``close`` reconnects.
        """
        if self._configure:
            self._commands.close()
            self._blocking.close()

    def __enter__(self) -> RedisGroup[K, V]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the distributed flight ---------------------------------------------------------

    def _fly(
        self,
        key: K,
        text: str,
        fn: Callable[..., V],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        caller: Caller,
    ) -> V:
        """The local flight's loader: get the value through Redis, or lead and load it."""
        core = self._core
        keys = core.keys(text)
        plan = Plan(core.settings, keys, core.breaker, _monotonic())
        watch = Watch(core, key, caller)
        try:
            while True:
                op = plan.op
                if op == proto.ACQUIRE:
                    try:
                        reply = _eval(
                            self._commands,
                            proto.ACQUIRE_SCRIPT,
                            plan.acquire_keys(),
                            plan.acquire_args(),
                        )
                    except RedisError as exc:
                        core.redis_error(plan, exc)
                        continue
                    except BaseException:
                        # Interrupted (KeyboardInterrupt): the script may have run
                        # and made us leader; give the lease back, don't sit on it.
                        self._complete(plan, proto.ABANDONED, b"")
                        raise
                    plan.acquired(reply, _monotonic())
                elif op == proto.READ:
                    watch.read()
                    try:
                        reply = _command(self._blocking, *plan.read_command())
                    except RedisError as exc:
                        core.redis_error(plan, exc)
                        continue
                    plan.read(reply, _monotonic())
                elif op == proto.SLEEP:
                    time.sleep(plan.delay)
                    plan.resume(_monotonic())
                elif op == proto.HIT or op == proto.REMOTE_ERROR:
                    value: V = core.received(key, plan, watch)
                    if value is not RETRY:
                        return value
                elif op == proto.LEAD:
                    return self._lead(key, plan, fn, args, kwargs, watch)
                elif op == proto.LOCAL:
                    core.local_run(key, plan, watch)
                    return fn(*args, **kwargs)
                else:
                    raise core.failure(key, plan, watch)
        finally:
            watch.stop()  # interrupted while waiting: the wait still counts

    def _lead(
        self,
        key: K,
        plan: Plan,
        fn: Callable[..., V],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        watch: Watch,
    ) -> V:
        """Run the loader holding the lease, then complete (or abandon) the flight in Redis."""
        core = self._core
        held = core.lead(plan, watch)
        watchdog = self._watchdog
        watchdog.hold(held)
        context = _CURRENT.set(FlightInfo(key, held))
        try:
            value = fn(*args, **kwargs)
        except Exception as exc:
            watchdog.release(held)
            completion = self._complete(plan, proto.ERROR, core.error_payload(plan.keys, exc))
            core.note_waiters(watch, completion)
            raise
        except BaseException:
            # KeyboardInterrupt, SystemExit: abandon so others take over at once.
            watchdog.release(held)
            self._complete(plan, proto.ABANDONED, b"")
            raise
        finally:
            _CURRENT.reset(context)
        watchdog.release(held)
        try:
            payload = core.encode(plan.keys, value)
        except CodecError as exc:
            completion = self._complete(plan, proto.ERROR, core.error_payload(plan.keys, exc))
            core.note_waiters(watch, completion)
            raise
        completion = self._complete(plan, proto.OK, payload)
        core.note_waiters(watch, completion)
        return value

    def _complete(self, plan: Plan, status: str, payload: bytes) -> Completion | None:
        """COMPLETE (fenced): publish the outcome.  A Redis failure is logged, not raised:
        the leader's callers still get its outcome, and waiters take over after the lease."""
        core = self._core
        keys, args = plan.complete_keys(), plan.complete_args(status, payload)
        try:
            reply = _with_budget(
                core,
                "completion",
                plan.keys,
                lambda: _eval(self._commands, proto.COMPLETE_SCRIPT, keys, args),
                deadline=_monotonic() + core.settings.retry_budget,
            )
        except RedisError:
            return None
        return core.completed(plan, reply)

    def _forget_remote(self, key: K, text: str, *, only_unshared: bool) -> bool:
        core = self._core
        keys = core.keys(text)
        closed = core.settings.policy == "closed"
        if core.forget_skipped(key, closed=closed):
            return True
        try:
            reply = _with_budget(
                core,
                "forget",
                keys,
                lambda: _eval(
                    self._commands,
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
