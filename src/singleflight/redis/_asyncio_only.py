"""What only the asyncio Redis group has: its watchdog task, its per-loop clients,
and awaiting loaders.

The generated ``_sync.py`` gets the same names from ``_threads_only.py``.
"""

from __future__ import annotations

import asyncio
from asyncio import CancelledError
from collections.abc import Awaitable, Callable
from inspect import isawaitable
from time import monotonic as _monotonic
from typing import Any

import redis.asyncio
import redis.asyncio.cluster
from redis.exceptions import NoScriptError

from .._protocols import Args, Kwargs, V
from ._core import GroupCore, command
from ._errors import cluster_errors
from ._protocol import Held, Renewals, Script

sleep = asyncio.sleep

# A redis.asyncio.Redis or a redis.asyncio.cluster.RedisCluster.
Client = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster

# The watchdog's round trip renewing the due leases (``_async._renew``).
Renew = Callable[[Client, Renewals, list[Held]], Awaitable[list[int | None]]]


async def eval_script(client: Client, script: Script, keys: list[str], args: list[Any]) -> Any:
    """EVALSHA, or EVAL when the server has lost its script cache (after a restart).
    On a cluster, the node owning the keys' slot runs it (they share one)."""
    with cluster_errors():
        try:
            return await command(client, "EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await command(client, "EVAL", script.source, len(keys), *keys, *args)


async def read_blocking(client: Client, key: str, args: list[Any], timeout: float) -> Any:
    """A blocking command (XREAD BLOCK) on ``key`` that ends within ``timeout`` seconds
    whatever the server does: a server that never answers (stopped) raises redis's
    TimeoutError.  On a cluster it goes to the node owning ``key``'s slot
    (``get_node_from_key``; learning the slots first counts in ``timeout``).
    redis.asyncio drops the connection of a command cancelled by the timeout."""

    async def read() -> Any:
        if isinstance(client, redis.asyncio.cluster.RedisCluster):
            await client.initialize()  # learns the slots on first use; then returns at once
            node = client.get_node_from_key(key)
            return await client.execute_command(*args, target_nodes=node)
        return await command(client, *args)

    with cluster_errors():
        try:
            return await asyncio.wait_for(read(), timeout)
        except TimeoutError as exc:
            raise redis.exceptions.TimeoutError(f"no reply within {timeout:.3f}s") from exc


class Watchdog:
    """One task per group and event loop, renewing its loaders' leases every ``lease / 3``.

    A task, not a thread: redis.asyncio clients live in their loop.  A loader
    that blocks the loop for longer than the lease delays renewals, so another
    process may take over; the late leader's completion is then fenced (or its
    lease resurrected if nobody took it).  The task ends after a while with
    nothing to renew.
    """

    __slots__ = ("_client", "_core", "_renew", "_renewals", "_task", "_wake")

    def __init__(self, core: GroupCore[Any], client: Client, renew: Renew) -> None:
        self._core = core
        self._client = client
        self._renew = renew
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

    def held(self) -> list[Held]:
        return list(self._renewals.held.values())

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
        while (wait := renewals.wait(_monotonic())) is not None:
            if wait > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass
                continue
            due = renewals.due(_monotonic())
            codes = await self._renew(self._client, renewals, due)
            for held, code in renewals.apply(due, codes, _monotonic()):
                self._core.renewed(held, code)


class Clients:
    """A group's things that belong to one event loop: its clients, watchdog, forgets
    and background tasks."""

    __slots__ = ("background", "blocking", "commands", "forgets", "watchdog")

    def __init__(self, commands: Client, blocking: Client, watchdog: Watchdog) -> None:
        self.commands = commands
        self.blocking = blocking
        self.watchdog = watchdog
        self.forgets: dict[str, asyncio.Task[Any]] = {}
        self.background: set[asyncio.Task[Any]] = set()


async def call(fn: Callable[..., Awaitable[V]], args: Args, kwargs: Kwargs) -> V:
    returned = fn(*args, **kwargs)
    if not isawaitable(returned):
        raise TypeError(
            f"AsyncRedisGroup needs fn to be an async function or to return an awaitable; "
            f"{fn!r} returned {type(returned).__name__}"
        )
    return await returned
