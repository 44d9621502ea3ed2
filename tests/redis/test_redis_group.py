"""RedisGroup and AsyncRedisGroup on a healthy server: the Group contract, across "processes".

Each side (see _redis_sides.py) is a group with its own clients, which Redis
cannot tell from a process; every test runs for both groups.
"""

from __future__ import annotations

import functools
import os
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from _redis_server import RedisServer
from _redis_sides import Loader
from redis.crc import key_slot

from singleflight.redis import (
    CodecError,
    JsonCodec,
    LoaderError,
    PayloadTooLargeError,
    SignedPickleCodec,
    current_flight,
)
from tests._support import wait_for

pytestmark = pytest.mark.timeout(30)

SECRET = b"s" * 32


def test_one_load_for_concurrent_callers_in_two_processes(sides: Any, server: RedisServer) -> None:
    a, b = sides(server.port), sides(server.port)
    loader = Loader({"n": 1}, seconds=0.3)
    futures = [side.submit("k", loader) for side in (a, b, a, b, a, b)]
    outcomes = [f.result(10) for f in futures]
    assert loader.runs == 1
    assert [o.value for o in outcomes] == [{"n": 1}] * 6
    assert [o.error for o in outcomes] == [None] * 6
    stats = [a.stats(), b.stats()]
    assert sum(s.leads for s in stats) == 1
    assert sum(s.hits for s in stats) == 1  # the other process's one Redis waiter
    assert server.eternal_keys() == []
    client = server.client()
    assert client.exists("sf:{test:k}:lease") == 0  # released at completion
    assert 0 < client.pttl("sf:{test:k}:res") <= 5000
    client.close()


def test_result_is_shared_through_redis(sides: Any, server: RedisServer) -> None:
    a, b = sides(server.port), sides(server.port)
    gate = threading.Event()
    loader = Loader("v", gate=gate)
    leader = a.submit_result("k", loader)
    _wait_for(lambda: loader.runs == 1)
    waiter = b.submit_result("k", loader)
    _wait_for(lambda: b.stats().waits >= 1)
    gate.set()
    given, taken = leader.result(10), waiter.result(10)
    # Alone in their processes, both results are shared: one given, one taken.
    assert (given.value, given.error, given.shared) == ("v", None, True)
    assert (taken.value, taken.error, taken.shared) == ("v", None, True)
    hit = a.call_result("k", loader)  # from the stored result
    assert (hit.value, hit.shared) == ("v", True)
    assert loader.runs == 1


def test_do_result_of_a_lone_call_is_not_shared(sides: Any, server: RedisServer) -> None:
    a = sides(server.port, result_ttl=0)
    result = a.call_result("k", Loader("v"))
    assert (result.value, result.error, result.shared) == ("v", None, False)


def test_stored_result_serves_late_callers_until_result_ttl(
    sides: Any, server: RedisServer
) -> None:
    a, b = sides(server.port, result_ttl=0.3), sides(server.port, result_ttl=0.3)
    loader = Loader([1, "two"])
    assert a.call("k", loader).value == [1, "two"]
    assert b.call("k", loader).value == [1, "two"]
    assert (loader.runs, b.stats().hits) == (1, 1)
    time.sleep(0.4)
    assert b.call("k", loader).value == [1, "two"]
    assert loader.runs == 2


def test_result_ttl_zero_stores_nothing(sides: Any, server: RedisServer) -> None:
    a, b = sides(server.port, result_ttl=0), sides(server.port, result_ttl=0)
    loader = Loader("v")
    a.call("k", loader)
    b.call("k", loader)
    assert loader.runs == 2
    client = server.client()
    assert client.exists("sf:{test:k}:res") == 0
    client.close()


def test_loader_error_reaches_remote_waiters_as_loader_error_and_is_not_cached(
    sides: Any, server: RedisServer
) -> None:
    a, b = sides(server.port), sides(server.port)
    gate = threading.Event()
    failing = Loader(error=KeyError("user 42 is gone"), gate=gate)
    leader = a.submit("k", failing)
    _wait_for(lambda: failing.runs == 1)
    waiter = b.submit("k", failing)
    _wait_for(lambda: b.stats().waits >= 1)
    gate.set()
    mine, theirs = leader.result(10).error, waiter.result(10).error
    assert isinstance(mine, KeyError)  # the leader's process gets the exception itself
    assert isinstance(theirs, LoaderError)
    assert theirs.type_name == "KeyError"
    assert theirs.message == "'user 42 is gone'"
    assert theirs.key == "k"
    assert failing.runs == 1
    # Not cached: the next call loads again.
    assert b.call("k", Loader("fine")).value == "fine"
    assert server.eternal_keys() == []


def test_forget_drops_the_stored_result(sides: Any, server: RedisServer) -> None:
    a, b = sides(server.port), sides(server.port)
    assert a.call("k", Loader("old")).value == "old"
    b.forget("k")
    assert a.call("k", Loader("new")).value == "new"


def test_forget_detaches_the_running_flight(sides: Any, server: RedisServer) -> None:
    a, b = sides(server.port), sides(server.port)
    gate = threading.Event()
    old = Loader("old", gate=gate)
    first = a.submit("k", old)
    _wait_for(lambda: old.runs == 1)
    b.forget("k")
    new = Loader("new")
    assert b.call("k", new).value == "new"  # a new flight, not the forgotten one
    gate.set()
    # Forgotten by another process, the flight does not answer with its value
    # (a caller may have joined it after the forget): it asks again, and hits.
    assert first.result(10).value == "new"
    assert (old.runs, new.runs) == (1, 1)
    # The forgotten flight's completion was not stored over the newer result.
    assert b.call("k", Loader("unused")).value == "new"
    assert server.eternal_keys() == []


def test_forget_unshared(sides: Any, server: RedisServer) -> None:
    a, b = sides(server.port), sides(server.port)
    assert a.forget_unshared("absent") is True
    gate = threading.Event()
    loader = Loader("v", gate=gate)
    first = a.submit("k", loader)
    _wait_for(lambda: loader.runs == 1)
    waiter = b.submit("k", loader)
    _wait_for(lambda: b.stats().waits >= 1)
    # Another process waits: RedisGroup answers False; AsyncRedisGroup.forget_unshared
    # is synchronous, so it answers for its own loop (True) and leaves the shared
    # Redis flight alone in the background.
    assert a.forget_unshared("k") is (a.mode == "async")
    gate.set()
    assert first.result(10).value == waiter.result(10).value == "v"
    assert loader.runs == 1


def test_forget_unshared_detaches_a_flight_nobody_else_waits_on(
    sides: Any, server: RedisServer
) -> None:
    a, b = sides(server.port), sides(server.port)
    gate = threading.Event()
    old = Loader("old", gate=gate)
    first = a.submit("k", old)
    _wait_for(lambda: old.runs == 1)
    assert a.forget_unshared("k") is True
    client = server.client()
    _wait_for(lambda: client.exists("sf:{test:k}:lease") == 0)
    client.close()
    assert b.call("k", Loader("new")).value == "new"
    gate.set()
    assert first.result(10).value == "old"


def test_epoch_grows_with_each_leader_and_is_none_outside(sides: Any, server: RedisServer) -> None:
    a = sides(server.port, result_ttl=0)
    seen: list[Any] = []

    class Recorder(Loader):
        def _exit(self) -> Any:
            flight = current_flight()
            seen.append((flight.key, flight.epoch, flight.lost) if flight else None)
            return super()._exit()

    for _ in range(3):
        a.call("k", Recorder())
    assert [(key, lost) for key, _, lost in seen] == [("k", False)] * 3
    epochs = [epoch for _, epoch, _ in seen]
    assert epochs == sorted(set(epochs)), epochs
    assert current_flight() is None


def test_keys_of_a_flight_share_one_cluster_slot(server: RedisServer) -> None:
    from singleflight.redis._protocol import Keys

    for namespace, key in [("users", "user:42"), ("n", "a}b{c"), ("n", "{x}"), ("n", "")]:
        keys = Keys(namespace, key)
        names = [keys.res, keys.lease, keys.fence, keys.done("t" * 32)]
        assert len({key_slot(name.encode()) for name in names}) == 1, names
        assert all(name.startswith(f"sf:{{{namespace}:") for name in names)


# -- payloads --------------------------------------------------------------------------


def test_forged_pickle_in_redis_runs_no_code_and_is_a_miss(
    sides: Any, server: RedisServer, tmp_path: Path
) -> None:
    sentinel = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {sentinel}",))

    a = sides(server.port, codec=SignedPickleCodec(SECRET))
    client = server.client()
    forged = b"p1:k1:" + b"\0" * 32 + pickle.dumps(Exploit())
    client.set("sf:{test:k}:res", forged, px=5000)
    # A payload signed with another secret, and one replayed from another key.
    other = SignedPickleCodec(b"o" * 32).encode(b"sf:{test:j}", "theirs")
    client.set("sf:{test:j}:res", other, px=5000)
    replayed = SignedPickleCodec(SECRET).encode(b"sf:{test:x}", "from x")
    client.set("sf:{test:i}:res", replayed, px=5000)
    client.close()

    assert a.call("k", Loader({"safe"})).value == {"safe"}
    assert a.call("j", Loader("mine")).value == "mine"
    assert a.call("i", Loader("mine")).value == "mine"
    assert not sentinel.exists()
    assert a.stats().untrusted_payloads == 3
    # The loaded value replaced the forged one.
    assert a.call("k", Loader("unused")).value == {"safe"}


def test_wrong_codec_payload_is_a_miss(sides: Any, server: RedisServer) -> None:
    pickled = sides(server.port, codec=SignedPickleCodec(SECRET), namespace="n1")
    jsoned = sides(server.port, namespace="n1")
    assert pickled.call("k", Loader(("a", "tuple"))).value == ("a", "tuple")
    assert jsoned.call("k", Loader(["json"])).value == ["json"]
    assert jsoned.stats().untrusted_payloads == 1
    assert pickled.call("k", Loader("again")).value == "again"
    assert pickled.stats().untrusted_payloads == 1


def test_forged_completion_record_is_a_miss(sides: Any, server: RedisServer) -> None:
    """A fake holder's stream carries garbage: the waiter ignores it and loads after the lease."""
    a = sides(server.port, lease=0.3)
    client = server.client()
    client.set("sf:{test:k}:lease", "fake", px=300)
    client.hset("sf:{test:k}:fence", mapping={"tok": "fake", "ep": 7})
    client.pexpire("sf:{test:k}:fence", 5000)
    client.xadd("sf:{test:k}:done:fake", {"s": "o", "v": b"j1:{not json"})
    client.pexpire("sf:{test:k}:done:fake", 5000)
    client.close()
    outcome = a.call("k", Loader("real"))
    assert outcome.value == "real"
    assert a.stats().untrusted_payloads >= 1
    assert a.stats().takeovers == 1


def test_payload_over_max_payload_is_a_clear_error_everywhere(
    sides: Any, server: RedisServer
) -> None:
    a, b = sides(server.port, max_payload=100), sides(server.port, max_payload=100)
    gate = threading.Event()
    big = Loader("x" * 200, gate=gate)
    leader = a.submit("k", big)
    _wait_for(lambda: big.runs == 1)
    waiter = b.submit("k", big)
    _wait_for(lambda: b.stats().waits >= 1)
    gate.set()
    mine, theirs = leader.result(10).error, waiter.result(10).error
    # One exception type for one failure, whichever process the caller is in.
    for error in (mine, theirs):
        assert type(error) is PayloadTooLargeError, repr(error)
        assert "max_payload=100" in str(error)
    client = server.client()
    assert client.exists("sf:{test:k}:res") == 0
    client.close()


def test_a_value_the_codec_refuses_is_a_codec_error_everywhere(
    sides: Any, server: RedisServer
) -> None:
    a, b = sides(server.port), sides(server.port)
    gate = threading.Event()
    refused = Loader(("a", 1), gate=gate)  # JsonCodec would give back a list
    leader = a.submit("k", refused)
    _wait_for(lambda: refused.runs == 1)
    waiter = b.submit("k", refused)
    _wait_for(lambda: b.stats().waits >= 1)
    gate.set()
    mine, theirs = leader.result(10).error, waiter.result(10).error
    for error in (mine, theirs):
        assert type(error) is CodecError, repr(error)
        assert "tuples" in str(error)
    assert b.stats().remote_errors == 1
    # A loader's own exception still reaches other processes as a LoaderError.
    failing = Loader(error=ValueError("nope"), gate=gate)
    gate.clear()
    leader = a.submit("v", failing)
    _wait_for(lambda: failing.runs == 1)
    waiter = b.submit("v", failing)
    _wait_for(lambda: b.stats().waits >= 2)
    gate.set()
    assert type(leader.result(10).error) is ValueError
    theirs = waiter.result(10).error
    assert isinstance(theirs, LoaderError) and theirs.type_name == "ValueError"


def test_value_json_cannot_give_back_is_refused(sides: Any, server: RedisServer) -> None:
    a = sides(server.port)
    tuple_error = a.call("k", Loader(("a", 1))).error
    assert isinstance(tuple_error, CodecError) and "tuples" in str(tuple_error)
    set_error = a.call("s", Loader({1, 2})).error
    assert isinstance(set_error, CodecError) and "JsonCodec cannot encode" in str(set_error)
    lax = sides(server.port, codec=JsonCodec(strict=False), namespace="lax")
    assert lax.call("k", Loader(("a", 1))).value == ("a", 1)  # the leader's own object


def test_msgpack_codec_round_trips_through_redis(sides: Any, server: RedisServer) -> None:
    pytest.importorskip("msgpack")
    from singleflight.redis import MsgpackCodec

    a = sides(server.port, codec=MsgpackCodec())
    b = sides(server.port, codec=MsgpackCodec())
    value = {"bytes": b"\x00\xff", 1: [1.5, None, True]}
    assert a.call("k", Loader(value)).value == value
    assert b.call("k", Loader("unused")).value == value
    assert b.stats().hits == 1


# -- the Group contract ------------------------------------------------------------------


def test_bad_keys_and_functions_are_refused_before_anything_runs(
    sides: Any, server: RedisServer
) -> None:
    a = sides(server.port)
    loader = Loader()
    for key in (["unhashable"], ("a", object()), ("nan", float("nan")), 1.5, None, b"bytes"):
        outcome = a.call(key, loader).error
        assert isinstance(outcome, TypeError), key
        assert "key_to_str=" in str(outcome) or "hashable" in str(outcome)
    assert loader.runs == 0
    tupled = sides(server.port, key_to_str=lambda k: "/".join(map(str, k)), namespace="t2")
    assert tupled.call(("user", 42), Loader("ok")).value == "ok"
    client = server.client()
    assert client.exists("sf:{t2:user/42}:res") == 1
    client.close()


def test_int_and_str_keys_are_the_same_redis_key(sides: Any, server: RedisServer) -> None:
    a = sides(server.port)
    assert a.call(42, Loader("v")).value == "v"
    assert a.call("42", Loader("unused")).value == "v"


def test_tuple_keys_become_json_arrays(sides: Any, server: RedisServer) -> None:
    a = sides(server.port)
    assert a.call(("user", 42, None, (1.5, True)), Loader("v")).value == "v"
    client = server.client()
    assert client.exists('sf:{test:["user",42,null,[1.5,true]]}:res') == 1
    client.close()
    assert a.call(("user", "42"), Loader("w")).value == "w"  # "42" and 42 differ in tuples


def _raises(call: Any) -> BaseException | None:
    try:
        call()
    except BaseException as exc:
        return exc
    return None


_wait_for = functools.partial(wait_for, timeout=10.0)


# -- sync-only and async-only details ---------------------------------------------------


@pytest.mark.parametrize("mode", ["async"])
def test_async_do_future_contains_and_len_like_async_group(sides: Any, server: RedisServer) -> None:
    import asyncio

    a = sides(server.port)
    group = a.group
    gate = threading.Event()
    loader = Loader("v", gate=gate)

    async def scenario() -> list[Any]:
        futures = [group.do_future("k", loader.coro) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert "k" in group and len(group) == 1
        futures[0].cancel()  # one caller stops waiting; the flight goes on
        gate.set()
        values = [await f for f in futures[1:]]
        assert "k" not in group and len(group) == 0
        with pytest.raises(TypeError, match="callable"):
            await group.do("k", "not callable")

        async def reenter() -> Any:
            return await group.do("r", reenter)

        with pytest.raises(RuntimeError, match="its own key"):
            await group.do("r", reenter)

        def not_async() -> str:
            return "plain"

        with pytest.raises(TypeError, match="async function"):
            await group.do("plain", not_async)
        return values

    assert a.run(scenario()) == ["v", "v"]
    assert loader.runs == 1


@pytest.mark.parametrize("mode", ["sync"])
def test_sync_do_future_and_errors_like_group(sides: Any, server: RedisServer) -> None:
    a = sides(server.port)
    group = a.group
    gate = threading.Event()
    loader = Loader("v", gate=gate)
    futures = [group.do_future("k", loader.sync) for _ in range(3)]
    assert "k" in group and len(group) == 1
    futures[0].cancel()  # one caller stops waiting; the flight goes on
    gate.set()
    assert [f.result(10) for f in futures[1:]] == ["v", "v"]
    assert loader.runs == 1
    _wait_for(lambda: len(group) == 0)
    with pytest.raises(TypeError, match="callable"):
        group.do("k", "not callable")  # type: ignore[arg-type]

    def reenter() -> Any:
        return group.do("r", reenter)

    with pytest.raises(RuntimeError, match="its own key"):
        group.do("r", reenter)


class _Interrupt(BaseException):
    pass


@pytest.mark.parametrize("mode", ["sync"])
def test_sync_interrupted_leader_abandons_and_a_waiter_takes_over_at_once(
    sides: Any, server: RedisServer
) -> None:
    a, b = sides(server.port, lease=5.0), sides(server.port, lease=5.0)
    interrupted = Loader(error=_Interrupt(), seconds=0.2)
    leader = threading.Thread(target=lambda: _raises(lambda: a.group.do("k", interrupted.sync)))
    leader.start()
    _wait_for(lambda: interrupted.runs == 1)
    started = time.monotonic()
    outcome = b.call("k", Loader("taken over"))
    leader.join(10)
    assert outcome.value == "taken over"
    assert time.monotonic() - started < 1.0  # not a 5 s lease
    assert b.stats().takeovers == 1
    assert server.eternal_keys() == []


@pytest.mark.parametrize("mode", ["async"])
def test_async_cancelled_leader_abandons_and_a_waiter_takes_over_at_once(
    sides: Any, server: RedisServer
) -> None:
    import asyncio

    a = sides(server.port, lease=5.0, cancel_orphaned=True)
    b = sides(server.port, lease=5.0)
    slow = Loader("never", seconds=10)

    async def start() -> asyncio.Future[Any]:
        return asyncio.ensure_future(a.group.do("k", slow.coro))

    task = a.run(start())
    _wait_for(lambda: slow.runs == 1)
    waiter = b.submit("k", Loader("taken over"))
    _wait_for(lambda: b.stats().waits >= 1)
    started = time.monotonic()
    # The only caller leaves; with cancel_orphaned the loader task is cancelled.
    a.loop.call_soon_threadsafe(task.cancel)
    outcome = waiter.result(10)
    assert outcome.value == "taken over"
    assert time.monotonic() - started < 1.0  # not a 5 s lease
    assert slow.finished == 0
    assert b.stats().takeovers == 1


def test_async_group_works_across_event_loops(server: RedisServer) -> None:
    import asyncio

    import redis.asyncio

    from singleflight.redis import AsyncRedisGroup

    client = redis.asyncio.Redis(port=server.port)
    group: AsyncRedisGroup[str, Any] = AsyncRedisGroup(client, namespace="loops", result_ttl=0)

    async def once(value: str) -> Any:
        async def load() -> str:
            return value

        try:
            return await group.do("k", load)
        finally:
            await group.aclose()

    assert asyncio.run(once("first")) == "first"
    assert asyncio.run(once("second")) == "second"
    asyncio.run(client.aclose())


def test_bad_options_are_refused_with_clear_errors(server: RedisServer) -> None:
    import redis.asyncio

    from singleflight.redis import AsyncRedisGroup, RedisGroup

    client = server.client()
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"lease": 0}, ValueError, "lease"),
        ({"lease": -1}, ValueError, "lease"),
        ({"lease": "3"}, TypeError, "lease"),
        ({"max_wait": float("inf")}, ValueError, "finite"),
        ({"result_ttl": -1}, ValueError, "result_ttl"),
        ({"on_redis_error": "ignore"}, ValueError, "open"),
        ({"max_payload": 0}, ValueError, "max_payload"),
        ({"breaker_threshold": 0}, ValueError, "breaker_threshold"),
        ({"namespace": ""}, TypeError, "namespace"),
        ({"namespace": "a{b"}, ValueError, "braces"),
        ({"namespace": "a b"}, ValueError, "spaces"),
        ({"codec": "json"}, TypeError, "codec"),
        ({"key": "str"}, TypeError, "key"),
    ]
    for options, error, match in bad:
        options = {"namespace": "n"} | options
        with pytest.raises(error, match=match):
            RedisGroup(client, **options)
    with pytest.raises(TypeError, match="AsyncRedisGroup"):
        RedisGroup(redis.asyncio.Redis(port=server.port), namespace="n")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="use RedisGroup"):
        AsyncRedisGroup(client, namespace="n")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="decode_responses"):
        RedisGroup(
            redis.Redis(port=server.port, decode_responses=True),
            namespace="n",
            configure_client=False,
        )
    sentinel_like = redis.Redis(
        connection_pool=type("CustomPool", (redis.ConnectionPool,), {})(port=server.port)
    )
    with pytest.raises(TypeError, match="configure_client=False"):
        RedisGroup(sentinel_like, namespace="n")
    # ... which then works, with the client as given.
    as_given: RedisGroup[str, str] = RedisGroup(
        sentinel_like, namespace="n", configure_client=False
    )
    assert as_given.do("k", lambda: "v") == "v"
    client.close()


def test_own_clients_have_bounded_timeouts_and_no_retry(server: RedisServer) -> None:
    user = redis.Redis(port=server.port, decode_responses=True, socket_timeout=None, protocol=3)
    from singleflight.redis import RedisGroup

    group: RedisGroup[str, Any] = RedisGroup(
        user, namespace="n", lease=1.0, redis_timeout=0.25, max_wait=10
    )
    commands, blocking = group._clients.commands, group._clients.blocking
    # The sync group's blocking reads bound their wait per call: its pool's socket
    # timeout bounds the rest (a connection's handshake included).
    for client, read_timeout in ((commands, 0.25), (blocking, 0.25)):
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == pytest.approx(read_timeout)
        assert kwargs["socket_connect_timeout"] == 0.25
        assert kwargs["retry"].get_retries() == 0
        assert kwargs["decode_responses"] is False
        assert kwargs["protocol"] == 2
    assert user.connection_pool.connection_kwargs["decode_responses"] is True  # untouched
    assert group.do("k", lambda: {"a": 1}) == {"a": 1}
    group.close()
    user.close()


def test_valkey_coalesces_takes_over_and_fences(sides: Any, make_server: Any) -> None:
    valkey = make_server("valkey")
    a, b = sides(valkey.port, lease=0.3), sides(valkey.port, lease=0.3)
    loader = Loader("v", seconds=0.5)  # longer than the lease: the watchdog renews it
    outcomes = [f.result(10) for f in (a.submit("k", loader), b.submit("k", loader))]
    assert [o.value for o in outcomes] == ["v", "v"] and loader.runs == 1
    interrupted = Loader(error=_Interrupt(), seconds=0.1)
    if a.mode == "sync":
        leader = threading.Thread(target=lambda: _raises(lambda: a.group.do("i", interrupted.sync)))
        leader.start()
        _wait_for(lambda: interrupted.runs == 1)
        assert b.call("i", Loader("taken over")).value == "taken over"
        leader.join(10)
    assert valkey.eternal_keys() == []


@pytest.mark.parametrize("mode", ["sync"])
def test_group_made_before_fork_works_in_the_child(sides: Any, server: RedisServer) -> None:
    import multiprocessing
    import warnings

    a, b = sides(server.port, lease=0.3), sides(server.port, lease=0.3)
    assert a.call("warm", Loader("parent", seconds=0.2)).value == "parent"  # watchdog running
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child() -> None:
        loader = Loader("child", seconds=0.8)  # outlives the lease: needs the child's watchdog
        outcome = a.call("k", loader)
        send.send((outcome.value, repr(outcome.error), a.stats().lost_leases, loader.runs))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        process = context.Process(target=child)
        process.start()
    client = server.client()
    _wait_for(lambda: client.exists("sf:{test:k}:lease") == 1)
    client.close()
    mine = Loader("parent's")
    assert b.call("k", mine).value == "child"  # the lease held: b waited for the child
    assert mine.runs == 0
    assert receive.poll(20)
    assert receive.recv() == ("child", "None", 0, 1)
    process.join(10)
    assert process.exitcode == 0


def test_a_forgotten_leader_learns_it_lost_the_lease(sides: Any, server: RedisServer) -> None:
    a, b = sides(server.port, lease=0.3), sides(server.port, lease=0.3)
    seen: list[bool] = []
    gate = threading.Event()

    class Watcher(Loader):
        def _exit(self) -> Any:
            flight = current_flight()
            assert flight is not None
            seen.append(flight.lost)
            return super()._exit()

    first = a.submit("k", Watcher("old", seconds=0.35, gate=gate))
    client = server.client()
    _wait_for(lambda: client.exists("sf:{test:k}:lease") == 1)
    client.close()
    b.forget("k")
    gate.set()  # the loader now runs past at least one renewal (every 0.1 s)
    assert first.result(10).value == "old"
    assert seen == [True, False]  # lost; then, forgotten by another process, it ran again
    assert a.stats().lost_leases == 1


@pytest.mark.parametrize("mode", ["async"])
def test_a_loader_blocking_the_loop_past_its_lease_resurrects_it(
    sides: Any, server: RedisServer
) -> None:
    import asyncio

    a = sides(server.port, lease=0.3)

    async def blocking() -> str:
        time.sleep(0.5)  # blocks the loop: the watchdog task cannot renew; the lease lapses
        await asyncio.sleep(0.2)  # the watchdog runs again: nobody took the key
        return "v"

    assert a.run(a.group.do("k", blocking)) == "v"
    stats = a.stats()
    assert (stats.resurrections, stats.fenced, stats.lost_leases) == (1, 0, 0)
    client = server.client()
    assert client.get("sf:{test:k}:res") == b'j1:"v"'
    client.close()


@pytest.mark.parametrize("mode", ["async"])
def test_async_forget_is_ordered_before_the_next_flight_and_aclose(
    sides: Any, server: RedisServer
) -> None:
    a = sides(server.port)
    group = a.group
    assert a.call("k", Loader("old")).value == "old"

    async def forget_then_load() -> Any:
        group.forget("k")  # synchronous: the Redis part runs in a task...
        return await group.do("k", Loader("new").coro)  # ...which this flight waits for

    assert a.run(forget_then_load()) == "new"

    async def forget_then_close() -> None:
        group.forget("k")
        await group.aclose()  # waits for the forget to reach Redis

    a.run(forget_then_close())
    client = server.client()
    assert client.exists("sf:{test:k}:res") == 0
    client.close()
