"""What only the thread Redis group has: its watchdog thread (and the leases it gives
back at exit), its clients, and calling loaders.

The asyncio group gets the same names from ``_asyncio_only.py``.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Callable
from time import monotonic as _monotonic
from typing import Any

import redis
import redis.cluster
from redis.exceptions import NoScriptError, RedisError

from .._protocols import Args, Kwargs, V
from . import _protocol as proto
from ._core import GroupCore, command
from ._errors import cluster_errors
from ._protocol import Held, Renewals, Script

sleep = time.sleep

# A redis.Redis or a redis.cluster.RedisCluster.
Client = redis.Redis | redis.cluster.RedisCluster

# The watchdog's round trip renewing the due leases (``_sync._renew``).
Renew = Callable[[Client, Renewals, list[Held]], list[int | None]]


def eval_script(client: Client, script: Script, keys: list[str], args: list[Any]) -> Any:
    """EVALSHA, or EVAL when the server has lost its script cache (after a restart).
    On a cluster, the node owning the keys' slot runs it (they share one)."""
    with cluster_errors():
        try:
            return command(client, "EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return command(client, "EVAL", script.source, len(keys), *keys, *args)


def read_blocking(client: Client, key: str, args: list[Any], timeout: float) -> Any:
    """A blocking command (XREAD BLOCK) on ``key`` that ends within ``timeout`` seconds
    whatever the server does: a server that never answers (stopped) raises redis's
    TimeoutError.

    Sent on a connection of the client's pool (on a cluster: of the client of
    the node owning ``key``'s slot, ``get_redis_connection(get_node_from_key(key))``)
    through redis-py's public Connection methods, so the wait is bounded per
    call (the pool's socket timeout is one for every call); the reply is the
    parsed RESP, without redis-py's response callbacks.  A connection that
    timed out or failed is dropped, never reused with a reply still owed.
    """
    node: redis.Redis
    if isinstance(client, redis.cluster.RedisCluster):
        cluster: Any = client  # redis-py leaves RedisCluster's methods untyped
        with cluster_errors():
            node = cluster.get_redis_connection(cluster.get_node_from_key(key))
    else:
        node = client
    pool = node.connection_pool
    conn: Any  # redis-py leaves Connection's methods untyped
    try:
        conn = pool.get_connection()
    except TypeError:  # redis-py 5 wants the command's name
        conn = pool.get_connection(str(args[0]))
    try:
        conn.send_command(*args)
        if not conn.can_read(timeout=timeout):
            raise redis.exceptions.TimeoutError(f"no reply within {timeout:.3f}s")
        return conn.read_response()
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


class Watchdog:
    """One thread per group renewing the leases its loaders hold, every ``lease / 3``.

    The thread starts with the first lease and ends after a while with none;
    renewals due together go in one pipeline.  After ``fork`` the child starts
    afresh (the parent's thread does not exist there).
    """

    __slots__ = (
        "__weakref__",
        "_client",
        "_core",
        "_lock",
        "_pid",
        "_renew",
        "_renewals",
        "_thread",
        "_wake",
    )

    def __init__(self, core: GroupCore[Any], client: Client, renew: Renew) -> None:
        self._core = core
        self._client = client
        self._renew = renew
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
        while True:
            with self._lock:
                while (wait := renewals.wait(_monotonic())) != 0:
                    if wait is None:
                        self._thread = None
                        return
                    self._wake.wait(wait)
                due = renewals.due(_monotonic())
            codes = self._renew(self._client, renewals, due)
            with self._lock:
                news = renewals.apply(due, codes, _monotonic())
            for held, code in news:
                self._core.renewed(held, code)


_WATCHDOGS: weakref.WeakSet[Watchdog] = weakref.WeakSet()


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
                eval_script(
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


class Clients:
    """A group's clients (commands, and blocking reads) and its watchdog."""

    __slots__ = ("blocking", "commands", "watchdog")

    def __init__(self, commands: Client, blocking: Client, watchdog: Watchdog) -> None:
        self.commands = commands
        self.blocking = blocking
        self.watchdog = watchdog


def call(fn: Callable[..., V], args: Args, kwargs: Kwargs) -> V:
    return fn(*args, **kwargs)
