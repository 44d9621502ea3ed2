"""Fleet caches (``fleet=``) across real processes on a private redis-server.

Loads are counted in Redis by the workers' loader; the time scale (TTL) is
short and every bound is loose, so a loaded machine passes.  Waits are bounded
and synchronize on replies, except where the test is about the propagation
bound itself (then it waits out that documented bound).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from _redis_fleet import Worker, started
from _redis_server import RedisServer

from singleflight import LoadingCache
from singleflight.redis import Fleet, RedisUnavailableError

WORKER = str(__import__("pathlib").Path(__file__).with_name("_redis_fleet_cache_worker.py"))
ASYNC_WORKER = str(
    __import__("pathlib").Path(__file__).with_name("_redis_fleet_cache_async_worker.py")
)
# The sides of a fleet's processes: LoadingCache, AsyncLoadingCache (redis.asyncio),
# or both alternating in one fleet.
SIDES = {"sync": [WORKER], "async": [ASYNC_WORKER], "mixed": [WORKER, ASYNC_WORKER]}
CHANNEL_TIMEOUT = 0.5
BOUND = CHANNEL_TIMEOUT + 0.5  # propagation bound, with room for a loaded machine


def ask(worker: Worker, line: str, timeout: float = 20.0) -> Any:
    worker.send(line)
    reply = json.loads(worker._line(timeout))
    if isinstance(reply, dict) and "error" in reply:
        raise AssertionError(f"worker {worker.pid}: {reply['error']}")
    return reply


@pytest.fixture
def workers(server: RedisServer, request: pytest.FixtureRequest) -> Iterator[list[Worker]]:
    n, ttl, *side = getattr(request, "param", (4, 30.0))
    scripts = SIDES[side[0] if side else "sync"]
    config = {"port": server.port, "ttl": ttl, "channel_timeout": CHANNEL_TIMEOUT}
    with started([(config, scripts[i % len(scripts)]) for i in range(n)]) as made:
        yield made


def loads(server: RedisServer, key: str) -> int:
    client = server.client()
    try:
        return int(client.get(f"loads:{key}") or 0)
    finally:
        client.close()


def set_source(server: RedisServer, key: str, value: str) -> None:
    client = server.client()
    try:
        client.set(f"src:{key}", value)
    finally:
        client.close()


@pytest.mark.parametrize(
    "workers", [(4, 30.0, "sync"), (4, 30.0, "async"), (4, 30.0, "mixed")], indirect=True
)
def test_one_load_for_the_fleet_and_l1_lives_as_long_as_the_shared_entry(
    server: RedisServer, workers: list[Worker]
) -> None:
    set_source(server, "k", "one")
    first = [ask(w, "get k") for w in workers]
    assert {v["v"] for v in first} == {"one"}
    assert len({v["t"] for v in first}) == 1  # one load's value everywhere
    assert loads(server, "k") == 1
    stats = [ask(w, "stats") for w in workers]
    assert sum(s["l2_misses"] for s in stats) == 1
    assert sum(s["l2_hits"] for s in stats) == len(workers) - 1
    again = [ask(w, "get k") for w in workers]  # L1 hits now
    assert again == first
    assert sum(ask(w, "stats")["hits"] for w in workers) == len(workers)


@pytest.mark.parametrize("workers", [(4, 30.0, "sync"), (4, 30.0, "async")], indirect=True)
def test_invalidate_put_clear_and_tags_reach_every_process(
    server: RedisServer, workers: list[Worker]
) -> None:
    for key in ("a1", "a2", "b1"):
        set_source(server, key, "old")
        assert {ask(w, f"get {key}")["v"] for w in workers} == {"old"}
    # invalidate in one process: after it returns (and the bound), nobody has "old"
    set_source(server, "a1", "new")
    ask(workers[0], "inv a1")
    time.sleep(BOUND)
    assert {ask(w, "get a1")["v"] for w in workers} == {"new"}
    assert loads(server, "a1") == 2
    # put: every process reads the put value
    ask(workers[1], "put a2 put")
    time.sleep(BOUND)
    assert {ask(w, "get a2")["v"] for w in workers} == {"put"}
    # tags: tag-a covers a1 and a2, not b1
    for key in ("a1", "a2", "b1"):
        set_source(server, key, "tagged")
    ask(workers[2], "tags tag-a")
    time.sleep(BOUND)
    assert {ask(w, "get a1")["v"] for w in workers} == {"tagged"}
    assert {ask(w, "get a2")["v"] for w in workers} == {"tagged"}
    assert {ask(w, "get b1")["v"] for w in workers} == {"old"}
    # clear
    ask(workers[3], "clear")
    time.sleep(BOUND)
    assert {ask(w, "get b1")["v"] for w in workers} == {"tagged"}
    received = [ask(w, "stats")["invalidations_received"] for w in workers]
    assert all(r >= 3 for r in received), received


@pytest.mark.parametrize("workers", [(3, 30.0, "sync"), (3, 30.0, "async")], indirect=True)
def test_a_load_that_started_before_an_invalidation_never_lands(
    server: RedisServer, workers: list[Worker]
) -> None:
    client = server.client()
    try:
        set_source(server, "k", "old")
        client.set("gate:k", 1, ex=60)
        workers[0].send("get k")  # its load waits at the gate, in flight
        deadline = time.monotonic() + 20
        while loads(server, "k") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        set_source(server, "k", "new")
        ask(workers[1], "inv k")  # the flight in worker 0 is detached
        client.delete("gate:k")
        assert json.loads(workers[0]._line(20))["v"] in ("old", "new")  # it answered its caller
        time.sleep(BOUND)
        assert {ask(w, "get k")["v"] for w in workers} == {"new"}
    finally:
        client.close()


def test_a_value_read_before_the_invalidation_is_never_stored(server: RedisServer) -> None:
    """In-process twin of the above, with the load holding a value it read before."""
    client = redis.Redis(port=server.port)
    released = __import__("threading").Event()
    reading = __import__("threading").Event()
    source = {"k": "old"}

    def load(key: str) -> str:
        value = source[key]
        reading.set()
        assert released.wait(20)
        return value

    one: LoadingCache[str, str] = LoadingCache(
        load, ttl=30, fleet=Fleet(client, namespace="before", channel_timeout=CHANNEL_TIMEOUT)
    )
    two: LoadingCache[str, str] = LoadingCache(
        lambda key: source[key],
        ttl=30,
        fleet=Fleet(client, namespace="before", channel_timeout=CHANNEL_TIMEOUT),
    )
    with one, two:
        assert one._fleet.wait_trusted(10) and two._fleet.wait_trusted(10)
        thread = __import__("threading").Thread(target=one.get, args=("k",))
        thread.start()
        assert reading.wait(20)
        source["k"] = "new"
        two.invalidate("k")
        released.set()
        thread.join(20)
        assert not thread.is_alive()
        time.sleep(BOUND)
        assert one.get("k") == "new"
        assert two.get("k") == "new"
        assert client.get("sf:{before:k}:res") is None or b"new" in client.get("sf:{before:k}:res")


@pytest.mark.parametrize("workers", [(2, 30.0)], indirect=True)
def test_a_process_that_lost_its_channel_serves_no_l1_until_resubscribed(
    server: RedisServer, workers: list[Worker]
) -> None:
    set_source(server, "k", "one")
    for w in workers:
        ask(w, "get k")
        ask(w, "get k")
    assert all(ask(w, "stats")["l1"] == ["k"] for w in workers)
    client = server.client()
    try:
        assert client.client_kill_filter(_type="pubsub") >= 1
    finally:
        client.close()
    # Each process drops its L1 when it notices (at once: the socket closed),
    # then subscribes again; a drop is counted either way.
    deadline = time.monotonic() + 20
    while not all(ask(w, "stats")["l1_drops"] >= 1 for w in workers):
        assert time.monotonic() < deadline, [ask(w, "stats") for w in workers]
        time.sleep(0.02)
    for w in workers:
        stats = ask(w, "stats")
        assert stats["hits"] == 1  # nothing served from the dropped L1 since
    deadline = time.monotonic() + 20
    while not all(ask(w, "stats")["trusted"] for w in workers):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert {ask(w, "get k")["v"] for w in workers} == {"one"}
    assert loads(server, "k") == 1  # the entry in Redis answered


@pytest.mark.parametrize("workers", [(2, 2.0)], indirect=True)
def test_redis_stopped_then_restarted_empty(server: RedisServer, workers: list[Worker]) -> None:
    """SIGSTOP 3 s: callers keep their deadlines, L1 is dropped after the channel
    timeout; an invalidation during the stop does not return.  Then a restart
    with nothing: L1s are dropped again and the fleet loads afresh."""
    set_source(server, "k", "one")
    for w in workers:
        ask(w, "get k")
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        workers[0].send("inv k")
        reply = json.loads(workers[0]._line(20))
        assert "RedisUnavailableError" in reply["error"]  # it did not return
        assert time.monotonic() - started < 5  # within redis_timeout + budget, loosely
        time.sleep(BOUND)
        for w in workers:
            stats = ask(w, "stats")
            assert stats["l1"] == [] and not stats["trusted"]
            started = time.monotonic()
            ask(w, "get k", timeout=20)  # loaded locally (policy "open")
            assert time.monotonic() - started < 8  # max_wait 5 s + a load, loosely
    finally:
        server.process.send_signal(signal.SIGCONT)
    server.restart()
    set_source(server, "k", "two")
    deadline = time.monotonic() + 20
    while not all(ask(w, "stats")["trusted"] for w in workers):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert {ask(w, "get k")["v"] for w in workers} == {"two"}


def test_invalidate_raises_when_redis_is_unreachable(server: RedisServer) -> None:
    client = redis.Redis(port=server.port)
    cache: LoadingCache[str, str] = LoadingCache(
        lambda key: key, ttl=30, fleet=Fleet(client, namespace="down", retry_budget=0.05)
    )
    with cache:
        assert cache._fleet.wait_trusted(10)
        assert cache.get("k") == "k"
        server.stop()
        try:
            with pytest.raises(RedisUnavailableError):
                cache.invalidate("k")
            assert "k" not in cache
        finally:
            server.start()


@pytest.mark.parametrize("workers", [(4, 1.0)], indirect=True)
def test_one_load_per_key_per_ttl_with_staggered_processes(
    server: RedisServer, workers: list[Worker]
) -> None:
    keys = [f"h{i}" for i in range(5)]
    for key in keys:
        set_source(server, key, "v")
    run_seconds = 4.0
    for i, w in enumerate(workers):  # staggered over one TTL
        w.send(f"run {run_seconds - i * 0.25} {' '.join(keys)}")
        time.sleep(0.25)
    reports = [json.loads(w._line(60)) for w in workers]
    total = sum(loads(server, key) for key in keys)
    per_key_per_ttl = total / len(keys) / (run_seconds / 1.0)
    assert per_key_per_ttl <= 1.5, (total, reports)
    oldest = max(r["oldest"] for r in reports)
    assert oldest <= 1.0 * 1.5 + 0.3, reports  # TTL + one load time, loosely


def test_async_changes_do_not_block_the_event_loop(server: RedisServer) -> None:
    __import__("asyncio").run(_changes_do_not_block(server))


async def _changes_do_not_block(server: RedisServer) -> None:
    """With Redis stopped, invalidate/put/clear/invalidate_tags return at once (the
    change made here), other tasks run meanwhile, and awaiting one raises
    RedisUnavailableError once its round trip gives up."""
    import asyncio

    import redis.asyncio

    from singleflight import AsyncLoadingCache

    async def load(key: str) -> str:
        return key.upper()

    client = redis.asyncio.Redis(port=server.port)
    fleet = Fleet(client, namespace="async-down", redis_timeout=0.3, retry_budget=0.05)
    cache: AsyncLoadingCache[str, str] = AsyncLoadingCache(
        load, ttl=30, fleet=fleet, tags=lambda key, value: ["t"]
    )
    async with cache:
        deadline = time.monotonic() + 10
        while not fleet.trusted:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        assert await cache.get("a") == "A"
        assert await cache.get("b") == "B"
        assert "a" in cache
        await cache.invalidate("nothing")  # awaited: Redis has it
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        try:
            sent = [cache.invalidate("a"), cache.put("c", "put")]
            assert "a" not in cache  # dropped here at once
            assert not any(s.done() for s in sent)  # Redis cannot have answered
            ticked = asyncio.Event()
            asyncio.get_running_loop().call_soon(ticked.set)
            await asyncio.wait_for(ticked.wait(), 10)  # the loop runs meanwhile
            assert not sent[0].done()
            tags = cache.invalidate_tags("t")
            assert "b" not in cache
            cleared = cache.clear()
            for pending in [*sent, tags, cleared]:
                with pytest.raises(RedisUnavailableError):
                    await asyncio.wait_for(pending, 20)
            assert "c" not in cache  # a put Redis did not take is not kept here
        finally:
            server.process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 20
        while not fleet.trusted:  # the channel is subscribed again: the L1 in use
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert await cache.put("c", "put") is None
        assert "c" in cache and await cache.get("c") == "put"
        with pytest.raises(TypeError):
            AsyncLoadingCache(load).invalidate_tags("t")
    await client.aclose()


def test_async_changes_without_a_fleet_are_awaitable() -> None:
    __import__("asyncio").run(_changes_without_a_fleet())


async def _changes_without_a_fleet() -> None:
    from singleflight import AsyncLoadingCache

    async def load(key: str) -> str:
        return key

    cache: AsyncLoadingCache[str, str] = AsyncLoadingCache(load, ttl=30)
    assert await cache.get("a") == "a"
    done = cache.invalidate("a")
    assert done.done() and "a" not in cache
    assert await done is None
    await cache.put("b", "B")
    assert await cache.get("b") == "B"
    await cache.clear()
    assert len(cache) == 0


def test_load_many_with_a_fleet_is_refused_and_get_many_loads_key_by_key(
    server: RedisServer,
) -> None:
    client = redis.Redis(port=server.port)
    try:
        with pytest.raises(TypeError, match=r"lease of its own.*Drop load_many="):
            LoadingCache(str.upper, ttl=30, load_many=lambda keys: {}, fleet=client)
        loaded: list[str] = []

        def load(key: str) -> str:
            loaded.append(key)
            return key.upper()

        with LoadingCache(load, ttl=30, fleet=Fleet(client, namespace="many")) as cache:
            assert cache._fleet.wait_trusted(10)
            assert cache.get_many(["a", "b", "a"]) == {"a": "A", "b": "B"}
            assert sorted(loaded) == ["a", "b"]
            assert client.exists("sf:{many:a}:res", "sf:{many:b}:res") == 2
    finally:
        client.close()


@pytest.mark.parametrize("ttl", [0.3, 0.8, 4.0, 12.0])
def test_an_entry_is_shared_for_no_less_than_its_freshness_here(ttl: float) -> None:
    # 1234.56789 + 0.8 - 1234.56789 is 799.99… ms in floats: truncated, the shared
    # entry expired a millisecond before the leader's own copy, and another process
    # loaded the key again before its TTL had passed (seen in the demo's fleet mode).
    from singleflight.cache._base import CacheBase
    from singleflight.cache._policy import Policy

    now = 1234.56789
    policy = Policy(
        ttl=ttl,
        jitter=0,
        stale=0,
        stale_if_error=0,
        early_refresh=None,
        negative=None,
        negative_ttl=None,
        cache_if=None,
        random=lambda: 0.5,
    )
    entry = policy.value_entry("v", now, 0.05)
    assert entry is not None
    fresh, stale, stale_if_error, delta = CacheBase._lifetimes(entry, now)
    assert fresh >= ttl * 1000
    assert (stale, stale_if_error, delta) == (0, 0, 50)
