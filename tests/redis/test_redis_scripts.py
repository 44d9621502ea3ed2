"""The Lua scripts themselves, on redis-server and valkey-server: leadership, fencing, TTLs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from _redis_server import RedisServer

from singleflight.redis import _protocol as proto
from singleflight.redis._protocol import Keys, Script

pytestmark = pytest.mark.timeout(30)

K = Keys("ns", "k")
LEASE_MS, FENCE_MS, RESULT_MS, DONE_MS = 1000, 60_000, 5000, 2000


@pytest.fixture
def r(server_kind: str, make_server: Any) -> Iterator[redis.Redis]:
    server: RedisServer = make_server(server_kind)
    client = server.client()
    yield client
    eternal = [key for key in client.scan_iter("sf:*") if client.pttl(key) < 0]
    client.close()
    assert eternal == [], f"keys without a TTL: {eternal}"


def run(r: redis.Redis, script: Script, keys: list[str], args: list[Any]) -> Any:
    return r.eval(script.source, len(keys), *keys, *args)


def acquire(r: redis.Redis, token: str, use_hit: str = "1") -> Any:
    return run(
        r, proto.ACQUIRE_SCRIPT, [K.res, K.lease, K.fence], [token, LEASE_MS, FENCE_MS, use_hit]
    )


def renew(r: redis.Redis, token: str, expected_ms: int = 0, tolerance_ms: int = 500) -> Any:
    return run(
        r,
        proto.RENEW_SCRIPT,
        [K.lease, K.fence],
        [token, LEASE_MS, FENCE_MS, expected_ms, tolerance_ms],
    )


def complete(r: redis.Redis, token: str, status: str = "o", payload: bytes = b"v") -> Any:
    return run(
        r,
        proto.COMPLETE_SCRIPT,
        [K.fence, K.res, K.lease, K.done(token)],
        [token, status, payload, RESULT_MS, DONE_MS],
    )


def forget(r: redis.Redis, only_unshared: bool = False) -> Any:
    return run(r, proto.FORGET_SCRIPT, K.forget_keys(), ["1" if only_unshared else "0", DONE_MS])


def led(reply: Any) -> int:
    """The epoch of a lead reply (asserted to be one): the server clock in µs, or more."""
    assert reply[0] == 1, reply
    assert reply[1] > 1_600_000_000 * 10**6, reply
    return int(reply[1])


def record(r: redis.Redis, token: str) -> dict[bytes, bytes] | None:
    reply = r.xread({K.done(token): "0-0"}, count=1)
    return reply[0][1][0][1] if reply else None


def test_one_leader_then_waiters_then_a_hit(r: redis.Redis) -> None:
    led(acquire(r, "A"))
    wait = acquire(r, "B")
    assert wait[:2] == [2, b"A"] and 900 < wait[2] <= LEASE_MS
    assert acquire(r, "C")[:2] == [2, b"A"]
    assert complete(r, "A") == [1, 2]  # two waiters were told
    assert record(r, "A") == {b"s": b"o", b"v": b"v"}
    assert r.exists(K.lease) == 0
    assert acquire(r, "D") == [0, b"v"]
    assert 0 < r.pttl(K.done("A")) <= DONE_MS
    assert 0 < r.pttl(K.res) <= RESULT_MS


def test_epochs_grow_per_leader(r: redis.Redis) -> None:
    epochs = []
    for token in "ABC":
        epochs.append(led(acquire(r, token, use_hit="0")))
        assert complete(r, token)[0] == 1
    assert epochs == sorted(set(epochs))
    # A stored epoch ahead of the clock (the clock went back) still grows by one.
    r.hset(K.fence, "ep", str(epochs[-1] + 10**9))
    assert acquire(r, "D", use_hit="0") == [1, epochs[-1] + 10**9 + 1]
    complete(r, "D")


def test_epochs_grow_after_the_fence_record_is_lost(r: redis.Redis) -> None:
    first = led(acquire(r, "A"))
    complete(r, "A")
    r.flushall()
    assert led(acquire(r, "B")) > first


def test_a_retried_acquire_finds_its_own_lease(r: redis.Redis) -> None:
    epoch = led(acquire(r, "A"))
    assert acquire(r, "A") == [1, epoch]


def test_renew_extends_resurrects_or_reports_loss(r: redis.Redis) -> None:
    acquire(r, "A")
    r.pexpire(K.lease, 100)
    assert renew(r, "A") == 1 and r.pttl(K.lease) > 900
    r.delete(K.lease)  # lapsed during a stall, nobody took it
    assert renew(r, "A") == 2 and r.get(K.lease) == b"A"
    r.delete(K.lease)
    assert acquire(r, "B")[0] == 1  # somebody took it
    assert renew(r, "A") == 0
    assert r.get(K.lease) == b"B"


def test_a_late_renew_extends_nothing_and_takes_nothing_back(r: redis.Redis) -> None:
    acquire(r, "A")
    r.pexpire(K.lease, 300)
    # Sent when 2 s were left at least, run with 0.3 s left: it waited behind a stall.
    assert renew(r, "A", expected_ms=2000) == 3
    assert 0 < r.pttl(K.lease) <= 300
    assert renew(r, "A", expected_ms=700) == 1  # within the tolerance: renewed
    assert r.pttl(K.lease) > 900
    r.delete(K.lease)  # lapsed while the watchdog thought it live: a late RENEW
    assert renew(r, "A", expected_ms=2000) == 3 and r.exists(K.lease) == 0
    assert renew(r, "A", expected_ms=-100) == 2  # the watchdog knew: resurrected
    assert r.get(K.lease) == b"A"


def test_a_stale_leader_is_fenced(r: redis.Redis) -> None:
    first = led(acquire(r, "A"))
    r.delete(K.lease)  # A's lease lapsed
    assert led(acquire(r, "B")) > first
    assert complete(r, "B", payload=b"new")[0] == 1
    assert complete(r, "A", payload=b"stale") == [0, 0]
    assert r.get(K.res) == b"new"
    assert record(r, "A") is None
    assert complete(r, "B", payload=b"new") == [3, 0]  # a retried completion


def test_a_fenced_completion_cannot_touch_a_running_leader(r: redis.Redis) -> None:
    acquire(r, "A")
    r.delete(K.lease)
    acquire(r, "B")
    assert complete(r, "A", status="a", payload=b"") == [0, 0]
    assert r.get(K.lease) == b"B"


def test_errors_and_abandons_are_announced_not_stored(r: redis.Redis) -> None:
    acquire(r, "A")
    assert complete(r, "A", status="e", payload=b"why")[0] == 1
    assert record(r, "A") == {b"s": b"e", b"v": b"why"}
    assert r.exists(K.res) == 0
    assert acquire(r, "B")[0] == 1
    assert complete(r, "B", status="a", payload=b"")[0] == 1
    assert r.exists(K.res) == 0 and r.exists(K.lease) == 0
    assert acquire(r, "C")[0] == 1  # the next caller leads at once


def test_forget_detaches_the_running_flight(r: redis.Redis) -> None:
    acquire(r, "A")
    r.set(K.res, b"older", px=RESULT_MS)
    assert forget(r) == 1
    assert r.exists(K.res) == 0 and r.exists(K.lease) == 0
    assert renew(r, "A") == 0  # A learns it lost the key
    led(acquire(r, "B"))
    assert complete(r, "A", payload=b"old") == [2, 0]
    # Its waiters read the forget first, and ask again: the old outcome reaches none.
    assert record(r, "A") == {b"s": b"f", b"v": b""}
    assert 0 < r.pttl(K.done("A")) <= DONE_MS
    assert r.xlen(K.done("A")) == 1 and r.exists(K.res) == 0  # neither told nor stored
    assert complete(r, "B", payload=b"new")[0] == 1
    assert r.get(K.res) == b"new"


def test_forget_unshared(r: redis.Redis) -> None:
    acquire(r, "A")
    assert forget(r, only_unshared=True) == 1
    acquire(r, "B")
    acquire(r, "C")  # C waits on B: shared
    assert forget(r, only_unshared=True) == 0
    assert r.get(K.lease) == b"B"


def test_waiting_on_a_lease_with_no_fence_creates_no_eternal_key(r: redis.Redis) -> None:
    r.set(K.lease, "foreign", px=500)
    assert acquire(r, "A")[:2] == [2, b"foreign"]
    assert 0 < r.pttl(K.fence) <= FENCE_MS


def test_leases_expire_on_the_server_clock(r: redis.Redis) -> None:
    run(r, proto.ACQUIRE_SCRIPT, [K.res, K.lease, K.fence], ["A", 50, FENCE_MS, "1"])
    time.sleep(0.1)
    led(acquire(r, "B"))
