"""The ``driver`` fixture: one contract test, run against every group.

A contract test is a plain function taking ``driver``; its body is an ``async def main()``
run by ``driver.run(main)``.  Through the driver it makes groups, loaders and gates of the
right kind, and starts calls: on a thread of their own for the thread groups (``Group``,
``RedisGroup``), in a task of their own for the async ones (``AsyncGroup``,
``AnyIOGroup`` on asyncio and on trio, ``AsyncRedisGroup``).  Waits are bounded: the whole
body runs under ``anyio.fail_after``.

A test knows that a caller has joined a flight from the group's counters (``stats().joins``)
or, for Redis groups, from their ``Joined`` events, so overlap is made with events, never with
sleeps.  In-process groups are made without options unless the test gives some, so the
contract is checked on their fast path; the drivers named "-general" and "-timeout" check it
on Group's and AsyncGroup's general path (events, limits, timeouts).
"""

from __future__ import annotations

import itertools
import os
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from singleflight import AsyncGroup, Group, Result
from singleflight.events import Event, Joined

from .._support import WAIT, CallThread, Gate, Loader, until

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379

DRIVERS = [
    "threads",
    "threads-general",
    "threads-timeout",
    "asyncio",
    "asyncio-general",
    "anyio-asyncio",
    "anyio-trio",
    "redis",
    "redis-async",
]

# Options that put Group and AsyncGroup on their general path without changing what a
# contract test sees: an event hook, a limit no test reaches (waiting, not refusing), and
# timeouts no test reaches.  With ``timeout``, Group runs every loader on a worker thread.
_NO_EVENT = None
GENERAL: dict[str, dict[str, Any]] = {
    "threads-general": {"on_event": _NO_EVENT, "max_flights": 1000, "on_limit": "wait"},
    "threads-timeout": {"timeout": 60.0},
    "asyncio-general": {
        "on_event": _NO_EVENT,
        "max_flights": 1000,
        "on_limit": "wait",
        "timeout": 60.0,
        "loader_timeout": 60.0,
    },
}


@dataclass
class Outcome:
    """What one caller saw: a value or an error, and ``shared`` (``do_result`` alone says)."""

    value: Any = None
    error: BaseException | None = None
    shared: bool | None = None


class Call:
    """One caller's call, started by :meth:`Driver.start`; ``await outcome()`` ends it."""

    def __init__(self, entry: str, done: Callable[[], bool], get: Callable[[], Outcome]) -> None:
        self.entry = entry
        self.done = done
        self._get = get

    async def outcome(self) -> Outcome:
        await until(self.done, WAIT, f"a {self.entry} call to end")
        return self._get()

    async def result(self) -> Any:
        """The value the caller got; fails the test if it got an error."""
        seen = await self.outcome()
        assert seen.error is None, f"{self.entry} got {seen.error!r}"
        return seen.value

    async def error(self) -> BaseException:
        """The error the caller got; fails the test if it got a value."""
        seen = await self.outcome()
        assert seen.error is not None, f"{self.entry} got {seen.value!r} instead of an error"
        return seen.error


def _from_result(res: Any) -> Outcome:
    assert isinstance(res, Result), res
    if res.error is not None:
        assert res.value is None
    return Outcome(res.value, res.error, res.shared)


class Driver:
    """Makes groups, loaders and gates for one kind of group, and runs a test's body."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_async = not name.startswith("threads") and name != "redis"
        self.redis = name.startswith("redis")
        self.backend = "trio" if name == "anyio-trio" else "asyncio"
        # Whether a do()/do_result() leader runs the loader itself (in its own thread): then
        # it sees a BaseException that ends the loader as it is, where others see AbortedError.
        self.leader_runs_loader = not self.is_async and name != "threads-timeout"
        self._events: list[tuple[Any, Event]] = []
        self._events_lock = threading.Lock()
        self._closers: list[Callable[[], Any]] = []
        self._tg: Any = None

    def __repr__(self) -> str:
        return f"<Driver {self.name}>"

    # -- running a test --------------------------------------------------------------------

    def run(self, main: Callable[[], Awaitable[None]], timeout: float = WAIT * 2) -> None:
        """Run ``main()`` on the driver's event loop, under a deadline; then close its groups."""

        async def body() -> None:
            with anyio.fail_after(timeout):
                try:
                    async with anyio.create_task_group() as tg:
                        self._tg = tg
                        await main()
                        tg.cancel_scope.cancel()  # callers the test left behind
                finally:
                    self._tg = None
                    for close in reversed(self._closers):
                        done = close()
                        if done is not None:
                            await done
                    self._closers.clear()
                    with self._events_lock:
                        self._events.clear()  # events hold outcomes; the test is done with them

        anyio.run(body, backend=self.backend)

    # -- what a test makes -----------------------------------------------------------------

    def group(self, **options: Any) -> Any:
        """A new group of the driver's kind (Redis groups: a namespace of the test's own).

        In-process groups are made with the options given alone, so that without options
        they take their fast path; Redis groups also report their events to the driver.
        """
        if self.redis:
            hook = options.pop("on_event", None)

            def record(event: Event) -> None:
                with self._events_lock:
                    self._events.append((g, event))
                if hook is not None:
                    hook(event)

            options["on_event"] = record
        for option, value in GENERAL.get(self.name, {}).items():
            if option == "on_event":
                value = options.get("on_event") or _ignore
            options.setdefault(option, value)
        g: Any
        if self.name.startswith("threads"):
            g = Group(**options)
        elif self.name.startswith("asyncio"):
            g = AsyncGroup(**options)
        elif self.name.startswith("anyio"):
            from singleflight.anyio import AnyIOGroup

            g = AnyIOGroup(**options)
        else:
            import redis
            import redis.asyncio

            from singleflight.redis import AsyncRedisGroup, RedisGroup

            namespace = f"sf-contract-{uuid.uuid4().hex}"
            options.setdefault("result_ttl", 0)  # a result kept in Redis would be a cache
            if self.name == "redis":
                client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
                g = RedisGroup(client, namespace=namespace, **options)
                self._closers += [client.close, g.close]
            else:
                aclient = redis.asyncio.Redis(host=REDIS_HOST, port=REDIS_PORT)
                g = AsyncRedisGroup(aclient, namespace=namespace, **options)
                self._closers += [aclient.aclose, g.aclose]
        return g

    def loader(self, value: Any = None, **options: Any) -> Loader:
        """A :class:`Loader` of the driver's kind (``value`` None: a new value per call)."""
        if value is None and self.redis:
            value = f"value-{next(_values)}"  # Redis groups carry JSON values
        if value is None:
            return Loader(is_async=self.is_async, **options)
        return Loader(value, is_async=self.is_async, **options)

    def fn(self, body: Callable[..., Any], *, gate: Gate | None = None) -> Callable[..., Any]:
        """A loader of the driver's kind that runs the plain function ``body``.

        With ``gate``, the loader runs ``body`` first, then waits at the gate, then
        returns what ``body`` returned.
        """
        if not self.is_async:
            if gate is None:
                return body

            def gated(*args: Any, **kwargs: Any) -> Any:
                got = body(*args, **kwargs)
                gate.wait()
                return got

            return gated

        async def loader(*args: Any, **kwargs: Any) -> Any:
            got = body(*args, **kwargs)
            if gate is not None:
                await gate.wait_async()
            else:
                await anyio.sleep(0)
            return got

        return loader

    def gate(self) -> Gate:
        return Gate()

    # -- calls -----------------------------------------------------------------------------

    def start(self, entry: str, g: Any, key: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Call:
        """Begin a call of ``entry`` ("do", "do_result", "do_future") and return at once."""
        if entry == "do_future":
            return self._future_call(g.do_future(key, fn, *args, **kwargs))
        if not self.is_async:
            thread = CallThread(getattr(g, entry), key, fn, *args, **kwargs)

            def get_thread() -> Outcome:
                thread.finish(0)
                if entry == "do_result" and thread.error is None:
                    return _from_result(thread.value)
                return Outcome(thread.value, thread.error)

            return Call(entry, lambda: not thread.is_alive(), get_thread)
        seen: list[Outcome] = []

        async def caller() -> None:
            try:
                got = await getattr(g, entry)(key, fn, *args, **kwargs)
            except Exception as exc:
                seen.append(Outcome(error=exc))
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:
                seen.append(Outcome(error=exc))
            else:
                seen.append(_from_result(got) if entry == "do_result" else Outcome(got))

        assert self._tg is not None, "start() outside driver.run()"
        self._tg.start_soon(caller)
        return Call(entry, lambda: bool(seen), lambda: seen[0])

    def start_fn(self, fn: Callable[[], Any]) -> Call:
        """Run ``fn()`` as a caller of its own: on a thread (thread drivers) or, awaited, in a
        task (async drivers); the call's value is what ``fn`` returns."""
        if not self.is_async:
            thread = CallThread(fn)
            return Call(
                "fn", lambda: not thread.is_alive(), lambda: Outcome(thread.value, thread.error)
            )
        seen: list[Outcome] = []

        async def caller() -> None:
            try:
                seen.append(Outcome(await fn()))
            except Exception as exc:
                seen.append(Outcome(error=exc))

        assert self._tg is not None, "start_fn() outside driver.run()"
        self._tg.start_soon(caller)
        return Call("fn", lambda: bool(seen), lambda: seen[0])

    async def until(self, condition: Callable[[], object], what: str = "") -> None:
        """Let the callers run until ``condition`` holds (bounded)."""
        await until(condition, WAIT, what)

    def _future_call(self, future: Any) -> Call:
        def get() -> Outcome:
            exc = future.exception()
            return Outcome(error=exc) if exc is not None else Outcome(future.result())

        return Call("do_future", future.done, get)

    async def call(
        self, entry: str, g: Any, key: Any, fn: Any, /, *args: Any, **kw: Any
    ) -> Outcome:
        """Make one call of ``entry`` and wait for what it sees."""
        return await self.start(entry, g, key, fn, *args, **kw).outcome()

    async def do(self, g: Any, key: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        """``g.do(key, fn, ...)``: the value, or the error raised."""
        return await self.start("do", g, key, fn, *args, **kwargs).result()

    async def lead(self, g: Any, key: Any, loader: Loader, entry: str = "do") -> Call:
        """Start the flight of ``key`` with ``loader`` and wait until the loader runs."""
        call = self.start(entry, g, key, loader)
        await loader.started_async()
        return call

    def _joins(self, g: Any, key: Any) -> int:
        """How many callers have joined flights: of ``key`` (Redis groups, from their
        ``Joined`` events), or of any key (in-process groups, from ``stats().joins``, which
        counts a joiner when it joins, on the fast path too)."""
        if not self.redis:
            return int(g.stats().joins)
        with self._events_lock:
            return sum(
                1
                for group, event in self._events
                if group is g and isinstance(event, Joined) and event.key == key
            )

    async def joined(self, g: Any, key: Any, n: int) -> None:
        """Wait until ``n`` callers have joined ``g``'s flights (of ``key``), in all."""
        await until(lambda: self._joins(g, key) >= n, WAIT, f"{n} joiners of {key!r}")

    async def join(self, g: Any, key: Any, entry: str = "do", fn: Any = None) -> Call:
        """Start a joiner of the flight of ``key`` and wait until it has joined."""
        before = self._joins(g, key)
        call = self.start(entry, g, key, fn if fn is not None else self.never_called)
        await self.joined(g, key, before + 1)
        return call

    @property
    def never_called(self) -> Callable[..., Any]:
        """A joiner's loader, of the driver's kind: it must never run."""

        def never(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a joiner's fn ran")

        return self.fn(never)


_values = itertools.count()


def _ignore(event: Event) -> None:
    """An event hook that drops every event (it puts a group on its general path)."""


def _redis_required() -> bool:
    return bool(os.environ.get("SINGLEFLIGHT_REQUIRE_REDIS"))


def _redis_answers() -> bool:
    try:
        import redis
    except ImportError:
        return False
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_available() -> bool:
    return _redis_answers()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "diverges(**reasons): the named drivers fail this contract test (strict xfail), "
        "e.g. diverges(anyio_trio='...'); '-' in a driver's name is '_' here",
    )


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest, redis_available: bool) -> Iterator[Driver]:
    name = str(request.param)
    for mark in request.node.iter_markers("diverges"):
        reason = mark.kwargs.get(name.replace("-", "_"))
        if reason is not None:
            request.node.add_marker(pytest.mark.xfail(strict=True, reason=reason))
    if name.startswith("redis") and not redis_available:
        if _redis_required():
            pytest.fail(f"SINGLEFLIGHT_REQUIRE_REDIS is set but {REDIS_HOST}:{REDIS_PORT} is down")
        pytest.skip(f"no Redis on {REDIS_HOST}:{REDIS_PORT}")
    if name == "anyio-trio":
        pytest.importorskip("trio")
    yield Driver(name)
