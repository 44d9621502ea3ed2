"""Redis failing under the groups: down, restarted mid-flight, paused, connections killed.

Every caller must return within its deadline under both error policies:
"open" gives values (loading locally when it must), "closed" gives values or
the group's own errors.  Each test has a private server, and runs for
RedisGroup and AsyncRedisGroup.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from typing import Any

import pytest
import redis
from _redis_server import RedisServer, free_port
from _redis_sides import Loader

from singleflight import WaitTimeoutError
from singleflight.redis import RedisUnavailableError
from singleflight.redis import _protocol as proto
from tests._support import wait_for

pytestmark = pytest.mark.timeout(60)

POLICIES = ["open", "closed"]


_wait_for = functools.partial(wait_for, timeout=10.0)


def _check(outcomes: list[Any], policy: str, value: Any, bound: float) -> None:
    """Every caller returned within ``bound`` with the value, or (closed) a group error."""
    for outcome in outcomes:
        assert outcome.elapsed <= bound, outcomes
        if policy == "open" or outcome.error is None:
            assert (outcome.value, outcome.error) == (value, None), outcomes
        else:
            assert isinstance(outcome.error, (RedisUnavailableError, WaitTimeoutError)), outcomes


def test_redis_down_open_loads_locally_and_the_breaker_opens_then_probes(
    sides: Any, redis_binary: str
) -> None:
    port = free_port()  # nothing listens here yet
    a = sides(port, breaker_threshold=2, breaker_cooldown=0.5, retry_budget=0.1)
    loader = Loader("local")
    first = a.call("k", loader)
    assert (first.value, first.error) == ("local", None)
    assert first.elapsed < 0.1 + 0.5  # retry budget, not redis-py's multi-second retries
    a.call("k", loader)
    assert a.stats().breaker == "open"
    started = time.monotonic()
    for _ in range(20):  # the open breaker skips Redis: no connection attempts, no delay
        assert a.call("k", loader).value == "local"
    assert time.monotonic() - started < 0.5
    stats = a.stats()
    assert stats.local_runs == 22 and stats.breaker_opens == 1
    # Redis comes back; after the cooldown one call probes it and closes the breaker.
    server = RedisServer(redis_binary, port)
    try:
        server.start()
        time.sleep(0.5)
        assert a.call("k", Loader("coordinated")).value == "coordinated"
        assert a.stats().breaker == "closed"
        assert a.stats().leads == 1
    finally:
        server.stop()


def test_redis_down_closed_raises_unavailable_with_the_cause(sides: Any) -> None:
    a = sides(free_port(), on_redis_error="closed", breaker_threshold=2, retry_budget=0.05)
    loader = Loader("never")
    errors = [a.call("k", loader).error for _ in range(3)]
    assert loader.runs == 0
    assert all(isinstance(e, RedisUnavailableError) for e in errors)
    assert isinstance(errors[0].__cause__, redis.ConnectionError)
    assert "Redis is unavailable for key 'k'" in str(errors[0])
    assert "circuit breaker is open" in str(errors[2])
    assert isinstance(errors[0], ConnectionError)  # catchable as the builtin


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("downtime", [0.0, 0.8])
def test_restart_mid_flight_every_caller_returns_within_its_deadline(
    sides: Any, own_server: RedisServer, policy: str, downtime: float
) -> None:
    options = {"lease": 1.0, "max_wait": 4.0, "on_redis_error": policy, "retry_budget": 0.3}
    a, b, c = (sides(own_server.port, **options) for _ in range(3))
    loader = Loader("value", seconds=1.5)
    leader = a.submit("k", loader)
    _wait_for(lambda: loader.runs == 1)
    waiters = [b.submit("k", loader), c.submit("k", loader)]
    _wait_for(lambda: b.stats().waits >= 1 and c.stats().waits >= 1)
    time.sleep(0.3)
    own_server.restart(downtime)
    outcomes = [f.result(20) for f in (leader, *waiters)]
    # max_wait + one command's timeout + a load run locally, plus scheduling slack.
    _check(outcomes, policy, "value", bound=4.0 + 0.5 + 1.5 + 1.0)
    assert (outcomes[0].value, outcomes[0].error) == ("value", None)  # the leader keeps its value
    if policy == "open":
        assert loader.runs <= 3
    if downtime and policy == "closed":
        assert all(isinstance(o.error, RedisUnavailableError) for o in outcomes[1:]), outcomes
    # Redis is back and the groups coordinate again.
    fresh = Loader("after", seconds=0.2)
    after = [f.result(10) for f in (b.submit("k2", fresh), c.submit("k2", fresh))]
    assert [o.value for o in after] == ["after", "after"] and fresh.runs == 1
    assert own_server.eternal_keys() == []


@pytest.mark.parametrize("policy", POLICIES)
def test_client_pause_longer_than_the_deadline(
    sides: Any, own_server: RedisServer, policy: str
) -> None:
    options = {"lease": 1.0, "max_wait": 1.5, "on_redis_error": policy}
    options |= {"redis_timeout": 0.3, "retry_budget": 0.3}
    a, b, c = (sides(own_server.port, **options) for _ in range(3))
    loader = Loader("value", seconds=0.5)
    leader = a.submit("k", loader)
    _wait_for(lambda: loader.runs == 1)
    waiter = b.submit("k", loader)
    _wait_for(lambda: b.stats().waits >= 1)
    admin = own_server.client()
    admin.client_pause(2500, all=True)
    late = c.submit("k", loader)  # arrives during the pause
    outcomes = [f.result(20) for f in (leader, waiter, late)]
    admin.close()
    _check(outcomes, policy, "value", bound=1.5 + 0.3 + 0.5 + 1.0)
    assert (outcomes[0].value, outcomes[0].error) == ("value", None)


@pytest.mark.parametrize("policy", POLICIES)
def test_max_wait_shorter_than_a_healthy_load(sides: Any, server: RedisServer, policy: str) -> None:
    a, b = sides(server.port), sides(server.port, max_wait=0.3, on_redis_error=policy)
    gate = threading.Event()
    slow = Loader("slow", gate=gate)
    leader = a.submit("k", slow)
    _wait_for(lambda: slow.runs == 1)
    mine = Loader("mine")
    outcome = b.call("k", mine)
    gate.set()
    assert 0.25 <= outcome.elapsed < 1.0
    if policy == "open":
        assert (outcome.value, mine.runs) == ("mine", 1)  # loaded locally after max_wait
    else:
        assert isinstance(outcome.error, WaitTimeoutError) and mine.runs == 0
        assert "max_wait=0.3" in str(outcome.error)
    assert b.stats().timeouts == 1
    assert leader.result(10).value == "slow"


def test_killed_blocking_connection_the_waiter_recovers(
    sides: Any, own_server: RedisServer
) -> None:
    a, b = sides(own_server.port), sides(own_server.port)
    gate = threading.Event()
    loader = Loader("value", gate=gate)
    leader = a.submit("k", loader)
    _wait_for(lambda: loader.runs == 1)
    waiter = b.submit("k", loader)
    _wait_for(lambda: b.stats().waits >= 1)
    admin = own_server.client()
    time.sleep(0.05)
    blocked = [c["id"] for c in admin.client_list() if c["cmd"] == "xread"]
    assert blocked
    for client_id in blocked:
        admin.client_kill_filter(_id=client_id)
    time.sleep(0.1)
    gate.set()
    admin.close()
    assert leader.result(10).value == waiter.result(10).value == "value"
    assert loader.runs == 1
    assert b.stats().redis_errors >= 1


def test_script_cache_flushed_mid_flight(sides: Any, own_server: RedisServer) -> None:
    a, b = sides(own_server.port, lease=0.5), sides(own_server.port, lease=0.5)
    loader = Loader("value", seconds=0.6)
    leader = a.submit("k", loader)
    _wait_for(lambda: loader.runs == 1)
    admin = own_server.client()
    admin.script_flush()  # like a restart without losing keys: NOSCRIPT everywhere
    waiter = b.submit("k", loader)
    time.sleep(0.25)
    admin.script_flush()
    assert leader.result(10).value == waiter.result(10).value == "value"
    admin.close()
    assert loader.runs == 1
    assert a.stats().lost_leases == 0


def test_a_completion_timed_out_by_a_pause_is_retried(sides: Any, own_server: RedisServer) -> None:
    """A 0.7 s CLIENT PAUSE at completion: the first COMPLETE times out (redis_timeout
    0.5 s), a retry gets through after the pause, and the waiters get the value without
    sitting out the lease: one load."""
    a, b = sides(own_server.port, lease=3.0), sides(own_server.port, lease=3.0)
    gate = threading.Event()
    loader = Loader("value", gate=gate)
    leader = a.submit("k", loader)
    _wait_for(lambda: loader.runs == 1)
    waiter = b.submit("k", loader)
    _wait_for(lambda: b.stats().waits >= 1)
    admin = own_server.client()
    admin.client_pause(700, all=True)
    gate.set()
    outcomes = [leader.result(20), waiter.result(20)]
    admin.close()
    assert [(o.value, o.error) for o in outcomes] == [("value", None)] * 2, outcomes
    assert loader.runs == 1
    assert a.stats().redis_errors >= 1  # the first attempt did time out
    assert b.stats().takeovers == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_a_stopped_server_never_holds_a_waiter_past_its_deadline(
    sides: Any, own_server: RedisServer, policy: str
) -> None:
    """max_wait=2 with lease=10: a waiter blocked in XREAD when the server is
    SIGSTOPped returns by max_wait + redis_timeout, not after the lease."""
    options = {"lease": 10.0, "max_wait": 2.0, "redis_timeout": 0.5, "on_redis_error": policy}
    a, b = sides(own_server.port, **options), sides(own_server.port, **options)
    gate = threading.Event()
    slow = Loader("slow", gate=gate)
    leader = a.submit("k", slow)
    _wait_for(lambda: slow.runs == 1)
    mine = Loader("mine")
    waiter = b.submit("k", mine)
    _wait_for(lambda: b.stats().waits >= 1)
    assert own_server.process is not None
    own_server.process.send_signal(signal.SIGSTOP)
    try:
        outcome = waiter.result(30)
    finally:
        own_server.process.send_signal(signal.SIGCONT)
        gate.set()
    # max_wait + one command's timeout, plus scheduling slack; the lease is 10 s.
    assert outcome.elapsed <= 2.0 + 0.5 + 1.0, outcome
    if policy == "open":
        assert (outcome.value, mine.runs) == ("mine", 1)
    else:
        assert isinstance(outcome.error, (WaitTimeoutError, RedisUnavailableError)), outcome
    leader.result(30)


def _held(side: Any) -> list[Any]:
    """The leases a side's watchdog holds (read from another thread: a snapshot)."""
    if side.mode == "sync":
        return list(side.group._clients.watchdog.held())
    return [h for s in list(side.group._clients.values()) for h in list(s.watchdog.held())]


def test_a_renewal_delivered_after_a_stall_never_extends_a_finished_leaders_lease(
    sides: Any, own_server: RedisServer
) -> None:
    """The server stops (SIGSTOP) while a leader loads: the watchdog's RENEW waits
    in the server's socket, the loader returns and its completion cannot get
    through (the leader's callers get the value anyway).  When the server goes
    on after the lease's end, that RENEW must not take the lease back for a
    lease more: the next caller leads at once, not after another lease."""
    lease = 1.0
    admin = own_server.client()
    for script in (proto.RENEW_SCRIPT, proto.COMPLETE_SCRIPT):
        admin.script_load(script.source)  # a warm server: the queued EVALSHA runs
    admin.close()
    a = sides(own_server.port, lease=lease, redis_timeout=0.2, retry_budget=0.1)
    gate = threading.Event()
    loader = Loader("first", gate=gate)
    leading = a.submit("k", loader)
    _wait_for(lambda: loader.runs == 1 and len(_held(a)) == 1)
    started = time.monotonic()
    (held,) = _held(a)
    due = held.due
    assert own_server.process is not None
    own_server.process.send_signal(signal.SIGSTOP)
    try:
        _wait_for(lambda: held.due != due)  # a renewal was sent, and timed out
        gate.set()
        first = leading.result(20)  # its completion timed out too
        time.sleep(max(0.0, started + lease + 0.3 - time.monotonic()))  # the lease ends
    finally:
        own_server.process.send_signal(signal.SIGCONT)
        gate.set()
    assert (first.value, first.error) == ("first", None)
    admin = own_server.client()
    assert admin.ping()  # the server has run what waited in its sockets
    assert admin.pttl("sf:{test:k}:lease") == -2, "a late RENEW took the lease back"
    admin.close()
    b = sides(own_server.port, lease=lease)
    second = b.call("k", Loader("second"))
    assert (second.value, second.error) == ("second", None)
    assert (b.stats().leads, b.stats().waits) == (1, 0)
