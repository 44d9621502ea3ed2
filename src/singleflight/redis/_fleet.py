"""A fleet-wide cache tier: entries every process shares in Redis, and the channel
that tells each process's in-process cache what was invalidated.

A :class:`Fleet` is given to a loading cache (``LoadingCache(..., fleet=Fleet(r))``,
``@cached(ttl=60, fleet=r)``).  The cache stays the first level (L1): its hits
never touch Redis.  An L1 miss runs one fleet flight of a Redis group
(``FLEET_ACQUIRE``): it returns the stored entry with its remaining freshness
(PTTL: the server's clock), or makes this process the key's one leader in the
fleet, or waits for that leader.  A leader stores the entry it loaded for
everybody, with the cache's lifetimes.

Invalidation: ``invalidate``, ``put``, ``clear`` and ``refresh`` detach the
key's flight in Redis (a load that started before never stores its value),
change the stored entry, and publish on the namespace's channel
``sf:{<ns>}:inv``; every process drops the key from its L1 when the message
arrives.  One subscriber connection and thread per process and Redis address
(a :class:`_Hub`) carries the channels of every fleet, and PINGs on it: while
no PING sent in the last ``channel_timeout`` seconds has been answered, a
message may have been missed, so every L1 it serves is dropped, and stays
unused (nothing is written to it) until the channel is subscribed again.

On a Redis Cluster the channel is sharded: a hub per process and namespace
subscribes (``SSUBSCRIBE``) on the master owning the channel's slot, and the
commands of a change are sent one by one (a transaction cannot span slots):
the entries first, each script on its key's master, then ``SPUBLISH``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.retry import Retry

from .._protocols import crosses_processes
from ._clients import _bounded, _kwargs, clone_cluster_sync, cluster_nodes, cluster_options
from ._errors import RedisUnavailableError
from ._protocol import FORGET_SCRIPT, FleetEntry, Script, escape_namespace

__all__ = ["Fleet"]

log = logging.getLogger("singleflight.redis.fleet")

_monotonic = time.monotonic

# PUT(res, lease, fence; payload, px, done_ttl_ms): FORGET, then store the entry.
_PUT = FORGET_SCRIPT.source.replace(
    "return 1\n", "redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])\nreturn 1\n"
)
PUT_SCRIPT = Script("fleet put", _PUT)

# TAG(tag sets..., tag versions...; text, ttl_ms, epoch, version_ttl_ms): remember
# that the key (text) carries these tags; 0 (and nothing done) when a tag was
# invalidated after the flight of the given epoch began (its version, the
# server's clock then in microseconds, is larger): that load must not be kept.
_TAG = """
local n = #KEYS / 2
if tonumber(ARGV[3]) > 0 then
  for i = 1, n do
    local v = redis.call('GET', KEYS[n + i])
    if v and tonumber(v) >= tonumber(ARGV[3]) then return 0 end
  end
end
for i = 1, n do
  redis.call('SADD', KEYS[i], ARGV[1])
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  end
end
return 1
"""
TAG_SCRIPT = Script("fleet tag", _TAG)

# UNTAG(tag sets..., tag versions...; version_ttl_ms): the keys these tags carry,
# and the tags' new versions (the server's clock, in microseconds): a flight that
# began before cannot tag (TAG), so cannot store, a key with them any more.
_UNTAG = """
local n = #KEYS / 2
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
local found = {}
for i = 1, n do
  redis.call('SET', KEYS[n + i], now, 'PX', ARGV[1])
  for _, m in ipairs(redis.call('SMEMBERS', KEYS[i])) do table.insert(found, m) end
  redis.call('DEL', KEYS[i])
end
return found
"""
UNTAG_SCRIPT = Script("fleet untag", _UNTAG)


_SOURCES = {s.sha: s.source for s in (FORGET_SCRIPT, PUT_SCRIPT, TAG_SCRIPT, UNTAG_SCRIPT)}
_CLIENTS = (
    redis.Redis,
    redis.asyncio.Redis,
    redis.cluster.RedisCluster,
    redis.asyncio.cluster.RedisCluster,
)


class _Ops:
    """The commands of one change on a cluster, as a pipeline would be given them,
    to be sent one by one; ``publish`` is a sharded one there."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, tuple[Any, ...]]] = []

    def evalsha(self, *args: Any) -> None:
        self.ops.append(("evalsha", args))

    def publish(self, channel: bytes, message: bytes) -> None:
        self.ops.append(("spublish", (channel, message)))


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class Fleet:
    """The shared tier of one loading cache: Redis holds its entries for every process.

    ``Fleet(client, namespace=None, channel_timeout=0.5, **options)``; ``client``
    is a ``redis.Redis`` or ``redis.cluster.RedisCluster`` (for
    :class:`~singleflight.LoadingCache` and sync ``@cached``) or a
    ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster`` (for the
    async ones); on a cluster the invalidation channel is a sharded one.  The cache
    passes a bare client through this class itself, so ``fleet=client`` is
    enough.  ``namespace`` defaults to the cache's name (``@cached``: the
    function's qualified name).  ``channel_timeout``: how long a process goes on
    serving its L1 while its invalidation channel does not answer.  The other
    options are those of :class:`RedisGroup` (``lease``, ``max_wait``,
    ``on_redis_error``, ``codec``, ``key_to_str``, ``redis_timeout``,
    ``retry_budget``, ``max_payload``, ``breaker_*``, ``on_event``, ...), for
    the group the fleet's misses go through; ``result_ttl`` is not one (each
    entry lives as long as the cache says).  One fleet serves one cache.
    """

    def __init__(
        self,
        client: redis.Redis
        | redis.asyncio.Redis
        | redis.cluster.RedisCluster
        | redis.asyncio.cluster.RedisCluster,
        *,
        namespace: str | None = None,
        channel_timeout: float = 0.5,
        **options: Any,
    ) -> None:
        if not isinstance(client, _CLIENTS):
            raise TypeError(
                "fleet= needs a redis.Redis, redis.asyncio.Redis or (redis.asyncio.cluster.)"
                f"RedisCluster client; got {client!r}"
            )
        if "result_ttl" in options:
            raise TypeError("a fleet's entries live as long as its cache says: no result_ttl=")
        if isinstance(channel_timeout, bool) or not isinstance(channel_timeout, (int, float)):
            raise TypeError(f"channel_timeout must be a number of seconds; got {channel_timeout!r}")
        if not 0.01 <= channel_timeout < 3600:
            raise ValueError(
                f"channel_timeout must be in [0.01, 3600) seconds; got {channel_timeout!r}"
            )
        self.is_async = isinstance(
            client, (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster)
        )
        self.cluster = isinstance(
            client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)
        )
        self.channel_timeout = float(channel_timeout)
        self._client = client
        self._namespace = namespace
        self._options = options
        self._cache: Any = None
        self.group: Any = None
        self._lock = threading.Lock()
        self.trusted = False
        # Counters (see CacheStats).
        self.invalidations_sent = 0
        self.invalidations_received = 0
        self.l1_drops = 0
        self.channel: bytes = b""
        # The async cache's invalidations go to Redis on this one thread, in order.
        self._sender: ThreadPoolExecutor | None = None
        self._scripts_loaded = False
        self._closed = False  # its cache was closed: it left the channel

    # -- binding to its cache ------------------------------------------------------------

    def _prepare(self, name: str) -> Any:
        """Make the group of the cache named ``name`` (once); returns it."""
        if self.group is not None:
            raise ValueError("a Fleet serves one cache; make one per cache")
        namespace = self._namespace if self._namespace is not None else name
        if self.is_async:
            from ._async import AsyncRedisGroup

            self.group = AsyncRedisGroup(
                self._client,  # type: ignore[arg-type]
                namespace=namespace,
                result_ttl=0,
                **self._options,
            )
        else:
            from ._sync import RedisGroup

            self.group = RedisGroup(
                self._client,  # type: ignore[arg-type]
                namespace=namespace,
                result_ttl=0,
                **self._options,
            )
        assert crosses_processes(self.group)
        core = self.group._core
        self._core = core
        self.namespace = core.namespace
        self.channel = f"sf:{{{escape_namespace(core.namespace)}}}:inv".encode()
        self._tag_prefix = f"sf:{{{escape_namespace(core.namespace)}}}:tag:"
        self._version_prefix = f"sf:{{{escape_namespace(core.namespace)}}}:tagv:"
        # Commands of invalidations, from any thread or loop: a sync client of
        # the same server with the group's bounded timeouts.
        settings = core.settings
        self._commands: Any
        if self.cluster:
            # Its channel is a sharded one, in the namespace's slot: the hub
            # subscribes on the master owning that slot, with the node options
            # of the caller's client (credentials, TLS).
            self._commands = clone_cluster_sync(self._client, settings)
            self._kw = cluster_options(self._client)
            self._kw.update(
                _bounded(settings.redis_timeout, settings.redis_timeout, Retry(NoBackoff(), 0))
            )
            nodes = sorted(f"{node.host}:{node.port}" for node in cluster_nodes(self._client))
            self._hub_key: tuple[Any, ...] = ("cluster", tuple(nodes), self.channel)
        else:
            assert isinstance(self._client, (redis.Redis, redis.asyncio.Redis))
            self._kw = _kwargs(
                self._client.connection_pool,
                settings.redis_timeout,
                settings.redis_timeout,
                Retry(NoBackoff(), 0),
            )
            self._commands = redis.Redis(**self._kw)
            self._hub_key = ()
        return self.group

    def _hub(self) -> _Hub:
        return _hub_for(
            self._kw,
            self.channel_timeout,
            self._hub_key,
            self._commands if self.cluster else None,
        )

    def _bind(self, cache: Any) -> None:
        """Serve ``cache``: subscribe its channel (its L1 is unused until then)."""
        self._cache = weakref.ref(cache)
        _FLEETS.add(self)
        self._hub().add(self)

    def _unbind(self) -> None:
        """Leave the channel (the cache was closed): the L1 goes unused from now on
        (every read asks Redis), and the hub stops once no fleet needs it."""
        with self._lock:
            if self._closed or self._cache is None:
                return
            self._closed = True
            sender, self._sender = self._sender, None
        self._hub().remove(self)
        if sender is not None:
            sender.shutdown(wait=False)  # the invalidations queued still go out
        with self._lock:
            self.trusted = False
        cache = self._cache()
        if cache is not None:
            cache._fleet_trust(False)

    def wait_trusted(self, timeout: float) -> bool:
        """Wait until the channel is subscribed (the L1 is in use); True if it is."""
        deadline = _monotonic() + timeout
        while not self.trusted and _monotonic() < deadline:
            time.sleep(0.002)
        return self.trusted

    # -- what the cache asks ----------------------------------------------------------------

    def text(self, key: Any) -> str:
        return str(self._core.redis_key(key))

    def _origin(self) -> str:
        return f"{os.getpid()}-{id(self):x}"

    def _message(self, kind: str, arg: str) -> bytes:
        return f"{self._origin()}|{kind}|{arg}".encode()

    def _run(self, what: str, build: Callable[[Any], None]) -> list[Any]:
        """One pipeline (built by ``build``), retried within the group's budget.
        RedisUnavailableError when it cannot reach Redis: an invalidation that
        returns has reached it."""
        if self.cluster:
            return self._run_cluster(what, build)
        deadline, delay = self._retrying()
        loaded = False
        if not self._scripts_loaded:
            # Before the first pipeline: a NOSCRIPT inside MULTI fails only its
            # EVALSHA, so the PUBLISH after it would go out twice (once more on
            # the retry; after a restart or SCRIPT FLUSH it still may).
            try:
                for script in (FORGET_SCRIPT, PUT_SCRIPT, TAG_SCRIPT, UNTAG_SCRIPT):
                    self._commands.script_load(script.source)
                self._scripts_loaded = True
            except RedisError:
                pass
        while True:
            pipe = self._commands.pipeline(transaction=True)
            build(pipe)
            try:
                replies: list[Any] = pipe.execute()
                return replies
            except NoScriptError:
                if loaded:  # pragma: no cover - a server flushing scripts in a loop
                    raise
                loaded = True
                try:  # after a restart (or SCRIPT FLUSH): load ours, then again
                    for script in (FORGET_SCRIPT, PUT_SCRIPT, TAG_SCRIPT, UNTAG_SCRIPT):
                        self._commands.script_load(script.source)
                except RedisError:
                    pass
                continue
            except RedisError as exc:
                delay = self._retry(what, exc, deadline, delay)

    def _retrying(self) -> tuple[float, float]:
        """The deadline of a change's retries, and the delay before the first one."""
        settings = self._core.settings
        return _monotonic() + settings.redis_timeout + settings.retry_budget, settings.backoff_base

    def _retry(self, what: str, exc: Exception, deadline: float, delay: float) -> float:
        """After a failed try: wait ``delay``, and return the next one; past ``deadline``,
        RedisUnavailableError instead."""
        if _monotonic() + delay > deadline:
            raise RedisUnavailableError(
                f"{what} of fleet {self.namespace!r} did not reach Redis: {exc}"
            ) from exc
        time.sleep(delay)
        return min(delay * 2, float(self._core.settings.backoff_cap))

    def _run_cluster(self, what: str, build: Callable[[Any], None]) -> list[Any]:
        """:meth:`_run` on a cluster: the commands one by one, in the order built
        (a transaction cannot span slots; each script's keys share one slot, and
        the channel is in the namespace's), each retried within the group's budget."""
        deadline, delay = self._retrying()
        ops = _Ops()
        build(ops)
        replies: list[Any] = []
        while len(replies) < len(ops.ops):
            name, args = ops.ops[len(replies)]
            try:
                if name == "spublish":
                    reply = self._commands.spublish(*args)
                else:
                    try:
                        reply = self._commands.evalsha(*args)
                    except NoScriptError:  # that master restarted, or never had it
                        reply = self._commands.eval(_SOURCES[args[0]], *args[1:])
            except (RedisError, RedisClusterException) as exc:
                delay = self._retry(what, exc, deadline, delay)
                continue
            replies.append(reply)
        return replies

    def _forget_local(self, key: Any, text: str) -> None:
        self._core.forgetting(text)
        self.group._local.forget(key)

    def submit(self, fn: Callable[[], None]) -> Future[None]:
        """Run ``fn`` (an invalidation's round trip) off the event loop: on one thread,
        so the invalidations of one async cache reach Redis in the order asked."""
        with self._lock:
            if self._sender is None:
                self._sender = ThreadPoolExecutor(1, "singleflight fleet sender")
            future = self._sender.submit(fn)
        future.add_done_callback(self._sent)
        return future

    def _sent(self, future: Future[None]) -> None:
        error = None if future.cancelled() else future.exception()
        if error is not None:
            log.warning(
                "an invalidation of fleet %s did not reach Redis: other processes may "
                "serve the old entry until it expires",
                self.namespace,
                exc_info=error,
            )

    def invalidate(self, key: Any, local: bool = True) -> None:
        """Drop ``key``'s entry in Redis, detach its flight, tell every process;
        ``local=False``: the caller has detached the flight here already."""
        self._change("invalidate", key, local, FORGET_SCRIPT, lambda keys: [])

    def put(self, key: Any, value: Any, entry: FleetEntry, local: bool = True) -> None:
        """Store ``value`` as ``key``'s entry (detaching its flight), tell every process."""
        self._change(
            "put",
            key,
            local,
            PUT_SCRIPT,
            lambda keys: [entry.header() + self._core.encode(keys, value), entry.px(_monotonic())],
        )

    def _change(
        self,
        what: str,
        key: Any,
        local: bool,
        script: Script,
        extra: Callable[[Any], list[Any]],
    ) -> None:
        """Run ``script`` (FORGET, or PUT with the ``extra`` arguments made from the
        key's Redis keys, before anything changes) on ``key``, then publish its name."""
        text = self.text(key)
        keys = self._core.keys(text)
        args = [*self._core.forget_args(False), *extra(keys)]
        if local:
            self._forget_local(key, text)
        message = self._message("k", text)

        def build(pipe: Any) -> None:
            pipe.evalsha(script.sha, 3, *keys.forget_keys(), *args)
            pipe.publish(self.channel, message)

        self._run(what, build)
        self.invalidations_sent += 1

    def tag(self, text: str, tags: Iterable[str], epoch: int, ttl_ms: int) -> bool:
        """Record (before its entry is stored) that the key ``text`` carries ``tags``.
        False when one was invalidated after the flight of ``epoch`` began (0: no check)."""
        names = [self._tag_prefix + t for t in tags]
        if not names:
            return True
        names += [self._version_prefix + t for t in tags]
        args = [text, max(1, ttl_ms), epoch, self._core.settings.fence_ttl_ms]
        replies = self._run(
            "tag", lambda pipe: pipe.evalsha(TAG_SCRIPT.sha, len(names), *names, *args)
        )
        return bool(replies[0])

    def invalidate_tags(self, tags: Iterable[str]) -> list[str]:
        """Drop every key tagged with one of ``tags``, in Redis and in every process.
        Returns the keys' texts."""
        tags = list(tags)
        names = [self._tag_prefix + t for t in tags] + [self._version_prefix + t for t in tags]
        ttl = self._core.settings.fence_ttl_ms
        if not tags:
            return []
        members = self._run(
            "invalidate_tags",
            lambda pipe: pipe.evalsha(UNTAG_SCRIPT.sha, len(names), *names, ttl),
        )
        texts = sorted({m.decode() for m in members[0]})
        args = self._core.forget_args(False)

        def build(pipe: Any) -> None:
            for text in texts:
                pipe.evalsha(FORGET_SCRIPT.sha, 3, *self._core.keys(text).forget_keys(), *args)
            for tag in tags:
                pipe.publish(self.channel, self._message("t", tag))
            for text in texts:
                pipe.publish(self.channel, self._message("k", text))

        self._run("invalidate_tags", build)
        self.invalidations_sent += len(tags)
        return texts

    def clear(self) -> None:
        """Drop every entry of the namespace in Redis, detach its flights, tell every process."""
        pattern = _glob_escape(f"sf:{{{escape_namespace(self.namespace)}:") + "*"
        try:
            if self.cluster:  # the namespace's keys are spread over every master
                scanned: list[bytes] = [
                    key
                    for node in self._commands.get_primaries()
                    for key in self._commands.scan_iter(
                        match=pattern, count=1000, target_nodes=node
                    )
                ]
            else:
                scanned = list(self._commands.scan_iter(match=pattern, count=1000))
            found = {
                key.decode().rsplit(":", 1)[0]
                for key in scanned
                if key.endswith((b"}:res", b"}:fence"))
            }
        except (RedisError, RedisClusterException) as exc:
            raise RedisUnavailableError(f"clear of fleet {self.namespace!r}: {exc}") from exc
        args = self._core.forget_args(False)
        bases = sorted(found)

        def build(pipe: Any) -> None:
            for base in bases:
                pipe.evalsha(
                    FORGET_SCRIPT.sha, 3, base + ":res", base + ":lease", base + ":fence", *args
                )
            pipe.publish(self.channel, self._message("*", ""))

        self._run("clear", build)
        self.invalidations_sent += 1

    # -- what the hub tells ----------------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        origin, _, rest = data.decode("utf-8", "replace").partition("|")
        kind, _, arg = rest.partition("|")
        if origin == self._origin():
            return  # ours: applied here before it was sent
        self.invalidations_received += 1
        cache = self._cache() if self._cache is not None else None
        if cache is not None:
            cache._fleet_drop(kind, arg)

    def _set_trusted(self, trusted: bool) -> None:
        """The channel was lost (False) or subscribed (True): either way, the L1 goes."""
        with self._lock:
            if self._closed:
                return  # it left the channel: told by a hub that had not seen it go
            was, self.trusted = self.trusted, trusted
            if was and not trusted:
                self.l1_drops += 1
        cache = self._cache() if self._cache is not None else None
        if cache is not None:
            cache._fleet_trust(trusted)
            if trusted and self._closed:  # closed meanwhile: _unbind's False came first
                cache._fleet_trust(False)
        if was and not trusted:
            log.warning("fleet %s lost its invalidation channel: its L1 is dropped", self.namespace)

    def _after_fork(self) -> None:
        self.trusted = False
        self._sender = None  # its thread is not in the child
        cache = self._cache() if self._cache is not None else None
        if cache is not None:
            cache._fleet_trust(False)
            if not self._closed:
                self._hub().add(self)

    def __repr__(self) -> str:
        state = "trusted" if self.trusted else "untrusted"
        return f"<Fleet namespace={getattr(self, 'namespace', self._namespace)!r} {state}>"


class _Hub:
    """One subscriber connection (and thread) per process and server, carrying the
    invalidation channels of every fleet on that server, with a PING heartbeat.
    Its thread ends, and its connection is closed, once no fleet uses it (every
    one was closed or collected); the next fleet starts them again.

    On a cluster (``cluster``, a RedisCluster to locate the channel's slot with):
    one per process and channel, subscribed with ``SSUBSCRIBE`` on the master that
    owns the channel's slot, looked up again at each (re)subscription."""

    def __init__(self, kwargs: dict[str, Any], timeout: float, cluster: Any = None) -> None:
        kw = dict(kwargs)
        kw["socket_timeout"] = kw["socket_connect_timeout"] = timeout
        self._kw = kw
        self._cluster = cluster
        self._client = redis.Redis(**kw) if cluster is None else None
        self.timeout = timeout
        self.interval = timeout / 4
        self._lock = threading.Lock()
        self._fleets: dict[bytes, weakref.WeakSet[Fleet]] = {}
        self._pending: list[bytes] = []
        self._thread: threading.Thread | None = None

    def add(self, fleet: Fleet) -> None:
        with self._lock:
            self._fleets.setdefault(fleet.channel, weakref.WeakSet()).add(fleet)
            self._pending.append(fleet.channel)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="singleflight fleet channel", daemon=True
                )
                self._thread.start()

    def remove(self, fleet: Fleet) -> None:
        with self._lock:
            fleets = self._fleets.get(fleet.channel)
            if fleets is not None:
                fleets.discard(fleet)

    def _each(self, channel: bytes | None, act: Callable[..., None], *args: Any) -> None:
        """``act(fleet, *args)`` for every fleet of ``channel`` (None: of every channel).

        In a frame of its own: the thread holds no fleet between messages, so one
        that no cache uses any more is collected (and its hub stops)."""
        with self._lock:
            if channel is None:
                fleets = [fleet for of in self._fleets.values() for fleet in of]
            else:
                fleets = list(self._fleets.get(channel, ()))
        for fleet in fleets:
            act(fleet, *args)

    def _needed(self) -> bool:
        """Whether a fleet still uses the hub; if not, its thread is over (it must return)."""
        with self._lock:
            for channel in [c for c, fleets in self._fleets.items() if not fleets]:
                del self._fleets[channel]
            if self._fleets:
                return True
            self._thread = None
            return False

    def _run(self) -> None:
        backoff = 0.02
        while self._needed():
            try:
                if self._session():
                    backoff = 0.02
            except (RedisError, RedisClusterException, OSError, ValueError) as exc:
                log.debug("fleet channel lost: %s", exc)
            if not self._needed():
                return
            if self._cluster is not None:
                try:  # the slot may have moved (a failover, a resharding)
                    self._cluster.nodes_manager.initialize()
                except Exception as exc:  # RedisClusterException is no RedisError
                    log.debug("fleet channel: cluster topology not refreshed: %s", exc)
            self._each(None, _distrust)
            time.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _session(self) -> bool:
        """Subscribe and serve until the channel is lost, or no fleet uses it any more;
        True if it was ever subscribed."""
        client = self._client
        if client is None:
            with self._lock:
                channel = next(iter(self._fleets))
            node = self._cluster.get_node_from_key(channel)
            client = redis.Redis(host=node.host, port=node.port, **self._kw)
        pubsub = client.pubsub()
        sharded = self._cluster is not None
        subscribe = pubsub.ssubscribe if sharded else pubsub.subscribe
        subscribed = False
        try:
            with self._lock:
                channels = list(self._fleets)
                self._pending.clear()
            sent = _monotonic()
            sending: dict[bytes, float] = dict.fromkeys(channels, sent)
            subscribe(*channels)
            acked_channels: set[bytes] = set()
            acked = sent  # a reply to anything sent from then on proves the channel live
            pings: deque[float] = deque()
            last_ping = sent
            while True:
                with self._lock:
                    if not any(self._fleets.values()):
                        return subscribed  # every fleet was closed or collected
                    fresh = [c for c in self._pending if c not in sending]
                    fresh_acked = [c for c in self._pending if c in acked_channels]
                    self._pending.clear()
                for channel in fresh_acked:  # another fleet of the channel: subscribed
                    self._each(channel, _trust_new)
                if fresh:
                    now = _monotonic()
                    for channel in fresh:
                        sending[channel] = now
                    subscribe(*fresh)
                now = _monotonic()
                if now - acked > self.timeout:
                    return subscribed
                if now - last_ping >= self.interval:
                    pubsub.ping()
                    pings.append(now)
                    last_ping = now
                wait = max(
                    0.0, min(self.interval - (now - last_ping), acked + self.timeout - now, 0.05)
                )
                message = pubsub.get_message(timeout=wait)
                if message is None:
                    continue
                kind = message["type"]
                if kind in ("message", "smessage"):
                    self._each(message["channel"], Fleet._received, message["data"])
                elif kind == "pong":
                    if pings:
                        acked = max(acked, pings.popleft())
                elif kind == "sunsubscribe":  # its slot moved to another master
                    return subscribed
                elif kind in ("subscribe", "ssubscribe"):
                    channel = message["channel"]
                    acked = max(acked, sending.get(channel, acked))
                    acked_channels.add(channel)
                    subscribed = True
                    self._each(channel, _trust)
        finally:
            try:
                pubsub.reset()
                if client is not self._client:
                    client.close()
            except (RedisError, OSError):
                pass


def _trust(fleet: Fleet) -> None:
    fleet._set_trusted(True)


def _trust_new(fleet: Fleet) -> None:
    if not fleet.trusted:
        fleet._set_trusted(True)


def _distrust(fleet: Fleet) -> None:
    if fleet.trusted:
        fleet._set_trusted(False)


_HUBS: dict[tuple[int, str, float], _Hub] = {}
_HUBS_LOCK = threading.Lock()
_FLEETS: weakref.WeakSet[Fleet] = weakref.WeakSet()


def _hub_for(
    kwargs: dict[str, Any], timeout: float, extra: tuple[Any, ...] = (), cluster: Any = None
) -> _Hub:
    ident = repr(sorted((k, repr(v)) for k, v in kwargs.items() if k != "retry")) + repr(extra)
    with _HUBS_LOCK:
        hub = _HUBS.get((os.getpid(), ident, timeout))
        if hub is None:
            hub = _HUBS[(os.getpid(), ident, timeout)] = _Hub(kwargs, timeout, cluster)
        return hub


def _reset_after_fork() -> None:
    global _HUBS_LOCK
    _HUBS_LOCK = threading.Lock()
    _HUBS.clear()
    for fleet in list(_FLEETS):
        fleet._lock = threading.Lock()
        fleet._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
