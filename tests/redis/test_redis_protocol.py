"""The sans-I/O protocol: plans, retries, the breaker, renewals, settings.  No Redis here."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from singleflight.redis import _protocol as proto
from singleflight.redis._protocol import (
    VALUE_ENTRY,
    Breaker,
    Completion,
    FleetEntry,
    Held,
    Keys,
    Plan,
    Renewals,
    RetryBudget,
    Settings,
    check_namespace,
)

KEYS = Keys("ns", "k")


def plan(now: float = 100.0, breaker: Breaker | None = None, **options: Any) -> Plan:
    return Plan(Settings(**options), KEYS, breaker or Breaker(5, 2.0), now)


def test_a_new_plan_acquires_with_a_fresh_token_and_the_hit_allowed() -> None:
    p, q = plan(), plan()
    assert p.op == proto.ACQUIRE
    assert len(p.token) == 32 and p.token != q.token
    assert p.acquire_keys() == ["sf:{ns:k}:res", "sf:{ns:k}:lease", "sf:{ns:k}:fence"]
    assert p.acquire_args() == [p.token, 3000, 600000, "1"]
    assert p.deadline == 130.0


def test_hit_lead_and_wait_replies() -> None:
    p = plan()
    assert p.acquired([0, b"payload"], 100.0) == proto.HIT and p.payload == b"payload"
    p = plan()
    assert p.acquired([1, 7], 100.0) == proto.LEAD and p.epoch == 7
    assert p.waited is False
    p = plan()
    assert p.acquired([2, b"T" * 32, 2500], 100.0) == proto.READ
    assert p.stream == "sf:{ns:k}:done:" + "T" * 32
    assert p.block_ms == 2520  # the holder's remaining lease plus slack
    assert p.waited is True


def test_wait_slice_is_bounded_by_the_lease_and_the_deadline() -> None:
    p = plan(lease=1.0, max_wait=30)
    p.acquired([2, b"T", 60_000], 100.0)  # another group's longer lease
    assert p.block_ms == 1020
    p = plan(max_wait=2.0)
    p.acquired([2, b"T", 2900], 101.5)  # 0.5 s left before the deadline
    assert p.block_ms == 500
    p = plan()
    p.acquired([2, b"T", -1], 100.0)  # a lease without expiry: wait one lease
    assert p.block_ms == 3020


def test_a_vanished_holder_means_ask_again_with_a_new_token() -> None:
    p = plan()
    token = p.token
    assert p.acquired([2, None, -2], 100.0) == proto.ACQUIRE
    assert p.token != token
    assert p.acquired([2], 100.0) == proto.ACQUIRE


def test_completion_records() -> None:
    record = [[b"stream", [(b"1-0", {b"s": b"o", b"v": b"payload"})]]]
    p = plan()
    p.acquired([2, b"T", 1000], 100.0)
    assert p.read(record, 100.1) == proto.HIT and p.payload == b"payload"
    p = plan()
    p.acquired([2, b"T", 1000], 100.0)
    error = [[b"stream", [(b"1-0", {b"s": b"e", b"v": b"why"})]]]
    assert p.read(error, 100.1) == proto.REMOTE_ERROR and p.payload == b"why"
    for abandoned in ([[b"stream", [(b"1-0", {b"s": b"a", b"v": b""})]]], [], None):
        p = plan()
        p.acquired([2, b"T", 1000], 100.0)
        assert p.read(abandoned, 100.1) == proto.ACQUIRE


def test_completion_records_in_every_reply_shape() -> None:
    raw = [[b"stream", [[b"1-0", [b"s", b"o", b"v", b"x"]]]]]  # no response callback
    resp3 = {b"stream": [[[b"1-0", {b"s": b"o", b"v": b"x"}]]]}
    for reply in (raw, resp3):
        p = plan()
        p.acquired([2, b"T", 1000], 100.0)
        assert p.read(reply, 100.1) == proto.HIT and p.payload == b"x"


def test_a_bad_payload_asks_again_without_the_stored_result() -> None:
    p = plan()
    p.acquired([0, b"garbage"], 100.0)
    assert p.bad_payload(100.0) == proto.ACQUIRE
    assert p.acquire_args()[-1] == "0"


def test_a_bad_record_is_skipped_by_the_next_read_of_its_stream() -> None:
    p = plan()
    p.acquired([2, b"T", 1000], 100.0)
    assert p.read_command()[-1] == b"0-0"
    assert p.read([[b"s", [(b"7-1", [b"s", b"o", b"v", b"forged"])]]], 100.1) == proto.HIT
    assert p.bad_payload(100.1) == proto.ACQUIRE and p.first_bad
    assert p.acquire_args()[-1] == "1"  # the stored result is still welcome
    p.acquired([2, b"T", 900], 100.2)
    assert p.read_command()[-1] == b"7-1"  # waits for what comes after the forged record
    assert p.read([[b"s", [(b"7-2", [b"s", b"x", b"v", b""])]]], 100.3) == proto.REMOTE_ERROR
    assert p.bad_status == b"x"
    p.bad_payload(100.3)
    assert not p.first_bad  # logged once per stream and plan
    p.acquired([2, b"T", 800], 100.4)
    assert p.read_command()[-1] == b"7-2"


@pytest.mark.parametrize(("policy", "op"), [("open", proto.LOCAL), ("closed", proto.FAIL)])
def test_the_deadline_applies_the_policy(policy: str, op: int) -> None:
    p = plan(max_wait=1.0, on_redis_error=policy)
    p.acquired([2, b"T", 3000], 100.0)
    assert p.read([], 101.0) == op
    assert p.reason == proto.REASON_TIMEOUT and p.error is None
    p = plan(max_wait=1.0, on_redis_error=policy)
    assert p.acquired([2, b"T", 3000], 101.0) == op


def test_transient_errors_back_off_within_the_budget_then_the_policy() -> None:
    p = plan(retry_budget=0.1)
    error = ConnectionError("refused")
    now = 100.0
    delays = []
    while p.failed(error, True, now) == proto.SLEEP:
        delays.append(p.delay)
        now += p.delay
        assert p.resume(now) == proto.ACQUIRE
    assert delays == [0.01, 0.02, 0.04]  # the next (0.08) would pass the 0.1 s budget
    assert p.op == proto.LOCAL and p.reason == proto.REASON_UNAVAILABLE and p.error is error


def test_a_success_resets_the_budget() -> None:
    p = plan(retry_budget=0.05)
    assert p.failed(ConnectionError(), True, 100.0) == proto.SLEEP
    p.resume(100.01)
    p.acquired([2, b"T", 1000], 100.01)
    assert p.failed(ConnectionError(), True, 100.2) == proto.SLEEP
    assert p.delay == 0.01


def test_permanent_errors_apply_the_policy_at_once() -> None:
    p = plan(on_redis_error="closed")
    assert p.failed(ValueError("NOPERM"), False, 100.0) == proto.FAIL


def test_retries_never_pass_the_deadline() -> None:
    p = plan(max_wait=0.015, retry_budget=10)
    assert p.failed(ConnectionError(), True, 100.0) == proto.SLEEP  # 0.01 fits
    p.resume(100.01)
    assert p.failed(ConnectionError(), True, 100.01) == proto.LOCAL  # 0.02 would not


def test_breaker_opens_after_threshold_then_lets_one_probe_through() -> None:
    breaker = Breaker(threshold=2, cooldown=1.0)
    assert breaker.allow(0.0) and breaker.state == "closed"
    assert breaker.failure(0.0) is False
    assert breaker.failure(0.1) is True and breaker.state == "open"
    assert breaker.opens == 1
    assert not breaker.allow(0.5)
    assert plan(breaker=breaker, now=0.5).op == proto.LOCAL
    closed = plan(breaker=breaker, now=0.5, on_redis_error="closed")
    assert (closed.op, closed.reason) == (proto.FAIL, proto.REASON_CIRCUIT_OPEN)
    assert breaker.allow(1.2) and breaker.state == "half-open"  # the probe
    assert not breaker.allow(1.2)  # only one
    assert breaker.failure(1.3) is False  # the probe failed: open again
    assert breaker.state == "open" and not breaker.allow(2.0)
    assert breaker.allow(2.4)
    breaker.success()
    assert breaker.state == "closed" and breaker.allow(2.5)
    assert breaker.opens == 1


def test_a_probe_that_never_reports_is_replaced_after_a_cooldown() -> None:
    breaker = Breaker(threshold=1, cooldown=1.0)
    breaker.failure(0.0)
    assert breaker.allow(1.0)  # the probe's caller is then interrupted: no report
    assert not breaker.allow(1.5)
    assert breaker.allow(2.0)


def test_an_open_breaker_stops_retries() -> None:
    breaker = Breaker(threshold=1, cooldown=5.0)
    p = plan(breaker=breaker)
    breaker.failure(100.0)
    assert p.failed(ConnectionError(), True, 100.0) == proto.LOCAL


def test_retry_budget_delays_double_up_to_the_cap() -> None:
    budget = RetryBudget(Settings(retry_budget=1.0))
    delays = []
    now = 0.0
    while (delay := budget.delay(now, deadline=100.0)) is not None:
        delays.append(delay)
        now += delay
    assert delays[:5] == [0.01, 0.02, 0.04, 0.08, 0.1]
    assert set(delays[4:]) == {0.1}
    assert sum(delays) <= 1.0


def test_renewals_schedule() -> None:
    renewals = Renewals(Settings(lease=3.0))
    a, b = Held(KEYS, "a", 1), Held(KEYS, "b", 2)
    assert renewals.next_wake(0.0) is None
    renewals.add(a, 0.0)
    renewals.add(b, 0.5)
    assert renewals.next_wake(0.0) == 1.0
    assert renewals.due(1.0) == [a]
    renewals.renewed(a, proto.RENEWED, 1.0)
    assert renewals.next_wake(1.0) == 0.5
    renewals.failed(b, 1.5)
    assert b.due == pytest.approx(1.6)
    renewals.renewed(b, proto.LOST, 1.6)
    assert b.lost and list(renewals.held) == ["a"]
    # RENEW carries how long the lease has left at least (lease - redis_timeout after
    # its last reply), for the server to refuse a RENEW that waited behind a stall.
    assert renewals.renew_args(a, 2.0)[3:] == [1500, 500]
    renewals.renewed(a, proto.LATE, 2.0)
    assert a.due == pytest.approx(2.1) and a.expires == pytest.approx(3.5)
    renewals.remove(a)
    assert renewals.next_wake(2.0) is None


def test_renewals_steps_of_the_watchdog() -> None:
    """wait() says sleep, renew now, or end after idle_exit with nothing held; apply()
    takes the replies and names the news of the leases still held."""
    renewals = Renewals(Settings(lease=3.0))
    a, b, c = Held(KEYS, "a", 1), Held(KEYS, "b", 2), Held(KEYS, "c", 3)
    assert renewals.wait(0.0) == 3.0  # idle: wait out idle_exit (the lease)
    assert renewals.wait(2.0) == 1.0
    assert renewals.wait(3.0) is None
    renewals.add(a, 3.0)
    renewals.add(b, 3.0)
    renewals.add(c, 3.0)
    assert renewals.wait(3.5) == pytest.approx(0.5)
    assert renewals.wait(4.0) == 0.0
    due = renewals.due(4.0)
    commands = renewals.renew_commands(due, 4.0, fallback=False)
    assert [command[:5] for command in commands] == [
        ["EVALSHA", proto.RENEW_SCRIPT.sha, 2, *h.renew_keys()] for h in due
    ]
    assert renewals.renew_commands(due, 4.0, fallback=True)[0][:2] == [
        "EVAL",
        proto.RENEW_SCRIPT.source,
    ]
    renewals.remove(c)  # its loader finished while the RENEWs were out
    news = renewals.apply(due, [proto.LOST, None, proto.RENEWED], 4.1)
    assert news == [(a, proto.LOST)]
    assert a.lost and list(renewals.held) == ["b"]
    assert b.due == pytest.approx(4.2)  # failed: retried sooner
    renewals.remove(b)
    assert renewals.wait(5.0) == 3.0  # idle again: a fresh idle_exit


def test_completion_replies() -> None:
    assert Completion([1, 3]).waiters == 3
    assert Completion([0, 0]).fenced
    assert not Completion([2, 0]).fenced


def test_keys_and_namespaces() -> None:
    keys = Keys("users", "user:42")
    assert keys.res == "sf:{users:user:42}:res"
    assert keys.done("t") == "sf:{users:user:42}:done:t"
    assert check_namespace("app:users-v2") == "app:users-v2"
    for bad in ("", "a{", "}", "a b", "tab\t", "nl\n"):
        with pytest.raises((TypeError, ValueError)):
            check_namespace(bad)
    with pytest.raises(TypeError):
        check_namespace(b"bytes")


def test_settings_units_and_validation() -> None:
    s = Settings(lease=0.5, result_ttl=0, max_wait=2)
    assert (s.lease_ms, s.result_ttl_ms, s.renew_interval) == (500, 0, pytest.approx(0.5 / 3))
    assert s.blocking_timeout == pytest.approx(0.52 + 0.5)
    assert Settings(result_ttl=0.0001).result_ttl_ms == 1  # PX 0 would be an error
    with pytest.raises(ValueError, match="fence_ttl"):
        Settings(lease=60, fence_ttl=30)
    with pytest.raises(ValueError, match=r"0\.01"):
        Settings(lease=0.001)
    with pytest.raises(TypeError):
        Settings(max_wait=True)
    with pytest.raises(ValueError):
        Settings(max_wait=float("nan"))


# Any sequence of replies and errors: the plan only ever asks for a known op,
# a wait never exceeds the lease slice or the deadline, and once past the
# deadline it never asks Redis for anything again.
_reply = st.one_of(
    st.tuples(st.just("acquire"), st.sampled_from([[0, b"x"], [1, 3], [2, b"T", 800], [2, None]])),
    st.tuples(st.just("read"), st.sampled_from([[], [[b"s", [(b"1", {b"s": b"o", b"v": b""})]]]])),
    st.tuples(st.just("error"), st.booleans()),
    st.tuples(st.just("bad"), st.none()),
)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(st.tuples(_reply, st.floats(0, 0.5)), max_size=30),
    policy=st.sampled_from(["open", "closed"]),
)
def test_plan_invariants(steps: list[tuple[tuple[str, Any], float]], policy: str) -> None:
    now = 0.0
    p = Plan(Settings(lease=1.0, max_wait=2.0, on_redis_error=policy), KEYS, Breaker(3, 1.0), now)
    final = {proto.HIT, proto.REMOTE_ERROR, proto.LEAD, proto.LOCAL, proto.FAIL}
    for (kind, reply), elapsed in steps:
        if p.op in final:
            break
        now += elapsed
        if p.op == proto.SLEEP:
            op = p.resume(now)
        elif kind == "error":
            op = p.failed(ConnectionError(), reply, now)
        elif kind == "bad" and p.op == proto.ACQUIRE:
            op = p.bad_payload(now)
        elif p.op == proto.ACQUIRE:
            op = p.acquired(reply if kind == "acquire" else [2, None], now)
        else:
            op = p.read(reply if kind == "read" else [], now)
        assert op == p.op
        assert op in final | {proto.ACQUIRE, proto.READ, proto.SLEEP}
        if op == proto.READ:
            assert 1 <= p.block_ms <= 1020
            assert now + p.block_ms / 1000 <= p.deadline + 0.001
        if op in (proto.ACQUIRE, proto.READ):
            assert now < p.deadline
        if op in (proto.LOCAL, proto.FAIL):
            assert (op == proto.LOCAL) == (policy == "open")
            assert p.reason in (proto.REASON_TIMEOUT, proto.REASON_UNAVAILABLE, "circuit open")


def test_a_fleet_entry_is_stored_for_what_is_left_of_its_freshness() -> None:
    # Counted when the leader's load ended, stored when its completion reaches Redis:
    # the time between is taken off, so the shared entry expires with the leader's copy
    # (it outlived it by the completion's delay, ~11 ms on a loaded machine).
    entry = FleetEntry(4000, 500, 0, 50, VALUE_ENTRY, counted_at=100.0)
    assert entry.px(100.0) == 4500
    assert entry.px(100.2504) == 4250  # whole ms passed: 250
    assert entry.px(110.0) == 500  # freshness gone: the stale window is left
    assert FleetEntry(0, 0, 0, 0, VALUE_ENTRY, counted_at=100.0).px(101.0) == 1
    assert FleetEntry(4000, 0, 0, 0, VALUE_ENTRY).px(1e9) == 4000  # read back: as read
