"""What Redis groups report: stats() as RedisGroupStats, typed events with durations,
and the Prometheus and OpenTelemetry exporters fed by them.

Every test runs for RedisGroup and AsyncRedisGroup (the ``sides`` fixture) on a
private redis-server; two sides on one namespace stand for two processes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from _redis_server import RedisServer, free_port
from _redis_sides import Loader

from singleflight import AbortedError, GroupStats, TooManyFlightsError, WaitTimeoutError
from singleflight.events import (
    Event,
    FlightAborted,
    FlightFailed,
    FlightFinished,
    FlightStarted,
    Joined,
    RanLocally,
    RedisUnavailable,
    Rejected,
    TimedOut,
)
from singleflight.redis import (
    AsyncRedisGroup,
    LoaderError,
    RedisGroup,
    RedisGroupStats,
    RedisUnavailableError,
)
from tests._support import Stop, wait_for

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """An on_event hook keeping every event (list.append is atomic)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.events]

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


_wait_for = functools.partial(wait_for, timeout=10.0)


def _accounted(stats: RedisGroupStats) -> None:
    """What holds for every RedisGroupStats once nothing is in flight."""
    assert isinstance(stats, GroupStats)
    assert stats.flights == stats.leads
    assert stats.rejected == 0 and stats.in_flight == 0


# -- stats() and events --------------------------------------------------------------------


def test_a_flight_shared_by_two_groups_and_local_joiners(sides: Any, server: RedisServer) -> None:
    ea, eb = Recorder(), Recorder()
    a = sides(server.port, name="a", on_event=ea)
    b = sides(server.port, name="b", on_event=eb)
    gate = threading.Event()
    slow = Loader("v", seconds=0.2, gate=gate)
    leader = a.submit("k", slow)
    _wait_for(lambda: slow.runs == 1)
    local_joiner = a.submit("k", slow)
    remote_waiter = b.submit("k", slow)
    _wait_for(lambda: b.stats().waits >= 1)
    remote_joiner = b.submit("k", slow)  # joins b's local flight, which waits on a's
    _wait_for(lambda: a.stats().joins == 1 and b.stats().joins == 1)
    gate.set()
    outcomes = [f.result(10) for f in (leader, local_joiner, remote_waiter, remote_joiner)]
    assert [(o.value, o.error) for o in outcomes] == [("v", None)] * 4
    assert slow.runs == 1

    sa, sb = a.stats(), b.stats()
    assert type(sa) is RedisGroupStats
    _accounted(sa)
    _accounted(sb)
    expect_a = {"calls": 2, "flights": 1, "leads": 1, "joins": 1, "shared": 1, "hits": 0}
    assert {f: getattr(sa, f) for f in expect_a} == expect_a
    assert (sa.errors, sa.aborted, sa.timeouts, sa.waits) == (0, 0, 0, 0)
    # b led nothing: its local leader took a's value from Redis, its other caller joined it.
    expect_b = {"calls": 2, "flights": 0, "leads": 0, "joins": 2, "shared": 0, "hits": 1}
    assert {f: getattr(sb, f) for f in expect_b} == expect_b
    assert sb.calls == sb.flights + sb.joins and sa.calls == sa.flights + sa.joins
    assert sa.coalesced_ratio == 0.5 and sb.coalesced_ratio == 1.0
    # Both joiners of a, and both callers of b, waited at least the loader's 0.2 s.
    assert 0.2 <= sa.wait_seconds < 20
    assert 0.4 <= sb.wait_seconds < 40
    assert sa.breaker == sb.breaker == "closed"

    # a: the flight, its local joiner, its end with every caller (here and in b).
    assert ea.kinds() == ["FlightStarted", "Joined", "FlightFinished"]
    started, joined, finished = ea.events
    assert isinstance(started, FlightStarted) and isinstance(finished, FlightFinished)
    assert (started.group, started.key) == ("a", "k")
    assert started.flight == joined.flight == finished.flight
    assert finished.callers == 3  # two callers in a, one Redis waiter in b
    assert 0.2 <= finished.duration < 20
    # b: joins only (one waiting on Redis, one on b's own flight), of one local flight.
    assert eb.kinds() == ["Joined", "Joined"]
    assert {e.group for e in eb.events} == {"b"} and {e.key for e in eb.events} == {"k"}
    assert len({e.flight for e in eb.events}) == 1


def test_a_failing_loader_counts_an_error_here_and_a_join_there(
    sides: Any, server: RedisServer
) -> None:
    ea, eb = Recorder(), Recorder()
    a = sides(server.port, on_event=ea)
    b = sides(server.port, on_event=eb)
    gate = threading.Event()
    failing = Loader(error=ValueError("boom"), gate=gate)
    leader = a.submit("k", failing)
    _wait_for(lambda: failing.runs == 1)
    waiter = b.submit("k", failing)
    _wait_for(lambda: b.stats().waits >= 1)
    gate.set()
    assert isinstance(leader.result(10).error, ValueError)
    assert isinstance(waiter.result(10).error, LoaderError)

    sa, sb = a.stats(), b.stats()
    assert (sa.calls, sa.flights, sa.errors, sa.shared, sa.aborted) == (1, 1, 1, 1, 0)
    assert (sb.calls, sb.flights, sb.joins, sb.remote_errors, sb.errors) == (1, 0, 1, 1, 0)
    assert ea.kinds() == ["FlightStarted", "FlightFailed"]
    failed = ea.events[1]
    assert isinstance(failed, FlightFailed)
    assert isinstance(failed.error, ValueError) and failed.callers == 2
    assert eb.kinds() == ["Joined"]
    assert a.group.name == b.group.name == "test"  # the name defaults to the namespace


def test_a_loader_stopped_by_a_base_exception_is_aborted(sides: Any, server: RedisServer) -> None:
    events = Recorder()
    a = sides(server.port, on_event=events)

    def stop_sync() -> str:
        raise Stop

    async def stop_async() -> str:
        raise Stop

    if a.mode == "sync":
        with pytest.raises(Stop):
            a.group.do("k", stop_sync)
    else:
        with pytest.raises(AbortedError):  # the loader task's BaseException, for its caller
            a.run(a.group.do("k", stop_async))
    stats = a.stats()
    assert (stats.calls, stats.flights, stats.aborted, stats.errors) == (1, 1, 1, 0)
    assert events.kinds() == ["FlightStarted", "FlightAborted"]
    aborted = events.events[1]
    assert isinstance(aborted, FlightAborted) and isinstance(aborted.cause, Stop)
    assert aborted.callers == 1 and 0 <= aborted.duration < 20


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_max_wait_times_out_with_its_events(sides: Any, server: RedisServer, policy: str) -> None:
    a = sides(server.port)
    events = Recorder()
    b = sides(server.port, max_wait=0.3, on_redis_error=policy, on_event=events)
    gate = threading.Event()
    slow = Loader("slow", gate=gate)
    leader = a.submit("k", slow)
    _wait_for(lambda: slow.runs == 1)
    mine = Loader("mine")
    outcome = b.call("k", mine)
    gate.set()
    assert leader.result(10).value == "slow"

    stats = b.stats()
    assert (stats.calls, stats.flights, stats.joins, stats.timeouts) == (1, 0, 0, 1)
    assert 0.2 <= stats.wait_seconds < 20
    joined, timed_out = events.events[:2]
    assert isinstance(joined, Joined) and isinstance(timed_out, TimedOut)
    assert (timed_out.group, timed_out.key) == ("test", "k")
    assert 0.25 <= timed_out.waited < 20
    if policy == "open":
        assert (outcome.value, stats.local_runs) == ("mine", 1)
        assert events.kinds() == ["Joined", "TimedOut", "RanLocally"]
        ran = events.events[2]
        assert isinstance(ran, RanLocally) and (ran.reason, ran.error) == ("timeout", None)
    else:
        assert isinstance(outcome.error, WaitTimeoutError)
        assert (stats.local_runs, stats.unavailable) == (0, 0)
        assert events.kinds() == ["Joined", "TimedOut"]


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_redis_down_is_told_and_counted(sides: Any, policy: str) -> None:
    events = Recorder()
    port = free_port()  # nothing listens here
    a = sides(port, on_redis_error=policy, retry_budget=0.1, breaker_threshold=1, on_event=events)
    loader = Loader("local")
    first, second = a.call("k", loader), a.call("k", loader)
    stats = a.stats()
    assert stats.breaker == "open" and stats.breaker_opens == 1 and stats.redis_errors >= 1
    assert (stats.calls, stats.flights, stats.joins) == (2, 0, 0)
    if policy == "open":
        assert (first.value, second.value) == ("local", "local")
        assert (stats.local_runs, stats.unavailable) == (2, 0)
        kind: type = RanLocally
    else:
        assert isinstance(first.error, RedisUnavailableError)
        assert isinstance(second.error, RedisUnavailableError)
        assert (stats.local_runs, stats.unavailable) == (0, 2)
        kind = RedisUnavailable
    assert events.kinds() == [kind.__name__] * 2
    # The first call met the failure that opened the breaker; the second, the open breaker.
    assert [(e.key, e.reason) for e in events.events] == [
        ("k", "unavailable"),
        ("k", "circuit open"),
    ]
    assert isinstance(events.events[0].error, redis.ConnectionError)
    assert events.events[1].error is None


def test_a_hook_that_raises_is_logged_and_ignored(
    sides: Any, server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("exporter down")

    a = sides(server.port, on_event=broken)
    b = sides(server.port, on_event=broken)
    with caplog.at_level(logging.ERROR, logger="singleflight"):
        assert a.call("k", Loader("v")).value == "v"  # FlightStarted, FlightFinished
        assert b.call("k", Loader("other")).value == "v"  # Joined (a stored result)
    assert (a.stats().flights, b.stats().joins, b.stats().hits) == (1, 1, 1)
    told = [r for r in caplog.records if "on_event hook raised" in r.getMessage()]
    assert len(told) == 3
    assert all(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in told)


@pytest.mark.parametrize("cls", [RedisGroup, AsyncRedisGroup])
def test_bad_name_and_hook_are_refused(cls: Any) -> None:
    client = redis.Redis() if cls is RedisGroup else redis.asyncio.Redis()
    with pytest.raises(ValueError, match="name must be a non-empty str"):
        cls(client, namespace="users", name="")
    with pytest.raises(TypeError, match="name must be a str; got 3"):
        cls(client, namespace="users", name=3)
    with pytest.raises(TypeError, match="on_event must be a callable"):
        cls(client, namespace="users", on_event="print")
    assert cls(client, namespace="users").name == "users"
    assert cls(client, namespace="users", name="profiles").name == "profiles"


# -- across processes ------------------------------------------------------------------------


@pytest.mark.parametrize("worker_mode", ["sync", "async"])
def test_four_processes_count_one_flight_and_every_other_call_a_join(
    server: RedisServer, tmp_path: Any, worker_mode: str
) -> None:
    """Four processes of ten callers each; their stats() come back as dataclasses.asdict."""
    from _redis_fleet import Fleet

    config = {"mode": worker_mode, "port": server.port, "key": "cold", "callers": 10}
    config |= {"loader_seconds": 0.2, "lease": 3.0}
    with Fleet(4, config, tmp_path / "loads") as fleet:
        fleet.start(timeout=60)
        reports = fleet.reports(timeout=30)
    stats = [r["stats"] for r in reports]
    assert set(stats[0]) == {f.name for f in dataclasses.fields(RedisGroupStats)}
    assert sum(s["calls"] for s in stats) == 40
    assert sum(s["flights"] for s in stats) == 1
    assert sum(s["joins"] for s in stats) == 39
    assert sum(s["shared"] for s in stats) == 1


# -- exporters ---------------------------------------------------------------------------------


def _drive_two(a: Any, b: Any) -> None:
    """a leads one flight that b waits on; then a fails alone."""
    gate = threading.Event()
    slow = Loader("v", gate=gate)
    leader = a.submit("k", slow)
    _wait_for(lambda: slow.runs == 1)
    waiter = b.submit("k", slow)
    _wait_for(lambda: b.stats().waits >= 1)
    gate.set()
    assert leader.result(10).value == waiter.result(10).value == "v"
    assert isinstance(a.call("bad", Loader(error=ValueError("boom"))).error, ValueError)


GROUP_FIELDS = {
    "singleflight_calls_total": "calls",
    "singleflight_flights_total": "flights",
    "singleflight_joins_total": "joins",
    "singleflight_shared_flights_total": "shared",
    "singleflight_errors_total": "errors",
    "singleflight_aborted_total": "aborted",
    "singleflight_timeouts_total": "timeouts",
    "singleflight_rejected_total": "rejected",
    "singleflight_wait_seconds_total": "wait_seconds",
    "singleflight_in_flight": "in_flight",
}
REDIS_FIELDS = {
    "singleflight_redis_hits_total": "hits",
    "singleflight_redis_leads_total": "leads",
    "singleflight_redis_takeovers_total": "takeovers",
    "singleflight_redis_waits_total": "waits",
    "singleflight_redis_fenced_total": "fenced",
    "singleflight_redis_lost_leases_total": "lost_leases",
    "singleflight_redis_resurrections_total": "resurrections",
    "singleflight_redis_remote_errors_total": "remote_errors",
    "singleflight_redis_local_runs_total": "local_runs",
    "singleflight_redis_unavailable_total": "unavailable",
    "singleflight_redis_errors_total": "redis_errors",
    "singleflight_redis_untrusted_payloads_total": "untrusted_payloads",
    "singleflight_redis_breaker_opens_total": "breaker_opens",
}


def _scrape(registry: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, parsed back from the exposition text."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def test_prometheus_exports_a_redis_group_like_a_group_plus_its_own_series(
    sides: Any, server: RedisServer
) -> None:
    from prometheus_client import CollectorRegistry

    from singleflight import Group
    from singleflight.metrics.prometheus import register

    registry = CollectorRegistry()
    a = sides(server.port, name="profiles")
    b = sides(server.port, name="profiles-b")
    down = sides(free_port(), name="down", retry_budget=0.1, breaker_threshold=1)
    local: Group[str, int] = Group(name="local")
    for group in (a.group, b.group, down.group, local):
        register(group, registry=registry)
    _drive_two(a, b)
    assert down.call("k", Loader("x")).value == "x"  # Redis down: the breaker opens
    local.do("k", lambda: 1)

    samples = _scrape(registry)
    for side in (a, b, down):
        stats = side.stats()
        labels = (("group", side.group.name),)
        for name, field in (GROUP_FIELDS | REDIS_FIELDS).items():
            assert samples[name, labels] == pytest.approx(getattr(stats, field)), name
        for state in ("closed", "open", "half-open"):
            value = samples["singleflight_redis_breaker_state", (*labels, ("state", state))]
            assert value == (1.0 if stats.breaker == state else 0.0)
    assert samples["singleflight_flights_total", (("group", "profiles"),)] == 2  # k and bad
    assert samples["singleflight_errors_total", (("group", "profiles"),)] == 1
    assert samples["singleflight_redis_hits_total", (("group", "profiles-b"),)] == 1
    assert samples["singleflight_redis_breaker_state", (("group", "down"), ("state", "open"))] == 1
    # A local group has the group series and none of Redis's.
    assert samples["singleflight_calls_total", (("group", "local"),)] == 1
    assert not [k for k in samples if k[0].startswith("singleflight_redis") and "local" in k[1][0]]


OTEL_COUNTERS = {
    "singleflight.calls": "calls",
    "singleflight.flights": "flights",
    "singleflight.joins": "joins",
    "singleflight.shared_flights": "shared",
    "singleflight.errors": "errors",
    "singleflight.aborted": "aborted",
    "singleflight.timeouts": "timeouts",
    "singleflight.rejected": "rejected",
    "singleflight.wait_time": "wait_seconds",
    "singleflight.in_flight": "in_flight",
    "singleflight.redis.hits": "hits",
    "singleflight.redis.leads": "leads",
    "singleflight.redis.takeovers": "takeovers",
    "singleflight.redis.waits": "waits",
    "singleflight.redis.remote_errors": "remote_errors",
    "singleflight.redis.local_runs": "local_runs",
    "singleflight.redis.errors": "redis_errors",
    "singleflight.redis.untrusted_payloads": "untrusted_payloads",
    "singleflight.redis.breaker_opens": "breaker_opens",
}


@pytest.fixture
def otel() -> Iterator[Any]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from singleflight.metrics.otel import instrument

    class Otel:
        reader = InMemoryMetricReader()
        meters = MeterProvider(metric_readers=[reader])
        spans = InMemorySpanExporter()
        tracers = TracerProvider()

        def hook(self) -> Any:
            return instrument(meter_provider=self.meters, tracer_provider=self.tracers)

        def points(self) -> dict[tuple[str, tuple[tuple[str, Any], ...]], Any]:
            found: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}
            data = self.reader.get_metrics_data()
            for resource in data.resource_metrics:
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        for point in metric.data.data_points:
                            found[metric.name, tuple(sorted(point.attributes.items()))] = point
            return found

    o = Otel()
    o.tracers.add_span_processor(SimpleSpanProcessor(o.spans))
    yield o
    o.meters.shutdown()
    o.tracers.shutdown()


def test_otel_observes_a_redis_group_and_traces_its_flights(
    sides: Any, server: RedisServer, otel: Any
) -> None:
    hook = otel.hook()
    a = sides(server.port, name="profiles", on_event=hook)
    b = sides(server.port, name="profiles-b", on_event=hook)
    hook.observe(a.group).observe(b.group)
    _drive_two(a, b)

    points = otel.points()
    for side in (a, b):
        stats = side.stats()
        attrs = (("singleflight.group", side.group.name),)
        for name, field in OTEL_COUNTERS.items():
            assert points[name, attrs].value == pytest.approx(getattr(stats, field)), name
        for state in ("closed", "open", "half-open"):
            key = (*attrs, ("singleflight.redis.breaker", state))
            assert points["singleflight.redis.breaker_state", key].value == (state == "closed")
    ok = points[
        "singleflight.flight.duration",
        (("singleflight.group", "profiles"), ("singleflight.outcome", "ok")),
    ]
    assert ok.count == 1

    spans = otel.spans.get_finished_spans()
    flights = {
        s.attributes["singleflight.key"]: s for s in spans if s.name == "singleflight.flight"
    }
    assert set(flights) == {"'k'", "'bad'"}
    assert flights["'k'"].attributes["singleflight.callers"] == 2  # a's caller and b's waiter
    assert flights["'k'"].attributes["singleflight.group"] == "profiles"
    assert flights["'bad'"].attributes["singleflight.outcome"] == "error"
    joins = [s for s in spans if s.name == "singleflight.join"]
    assert [j.attributes["singleflight.group"] for j in joins] == ["profiles-b"]


# -- max_flights, on_limit and timeout, applied in this process ---------------------------


def test_max_flights_refuses_a_new_key_but_never_a_join(sides: Any, server: RedisServer) -> None:
    events = Recorder()
    a = sides(server.port, max_flights=1, on_event=events)
    gate = threading.Event()
    slow = Loader("v", gate=gate)
    leader = a.submit("k1", slow)
    _wait_for(lambda: slow.runs == 1)
    refused = a.call("k2", Loader("w"))
    assert isinstance(refused.error, TooManyFlightsError), refused
    assert "max_flights=1" in str(refused.error)
    joiner = a.submit("k1", slow)  # a join of the open flight is never refused
    _wait_for(lambda: a.stats().joins == 1)
    gate.set()
    assert [f.result(10).value for f in (leader, joiner)] == ["v", "v"]
    assert slow.runs == 1
    stats = a.stats()
    assert (stats.rejected, stats.flights, stats.joins, stats.in_flight) == (1, 1, 1, 0)
    assert a.call("k2", Loader("w")).value == "w"  # the slot is free again
    rejected = events.of(Rejected)
    assert len(rejected) == 1 and rejected[0].key == "k2"


def test_on_limit_wait_takes_the_slot_when_the_flight_ends(sides: Any, server: RedisServer) -> None:
    a = sides(server.port, max_flights=1, on_limit="wait")
    gate = threading.Event()
    slow = Loader("v", gate=gate)
    leader = a.submit("k1", slow)
    _wait_for(lambda: slow.runs == 1)
    second = Loader("w")
    waiter = a.submit("k2", second)
    time.sleep(0.1)
    assert second.runs == 0 and not waiter.done()  # waits for the slot
    gate.set()
    assert (leader.result(10).value, waiter.result(10).value) == ("v", "w")
    stats = a.stats()
    assert (stats.rejected, stats.flights, stats.in_flight) == (0, 2, 0)


def test_timeout_lets_a_caller_leave_while_the_flight_goes_on(
    sides: Any, server: RedisServer
) -> None:
    events = Recorder()
    a = sides(server.port, timeout=0.2, on_event=events)
    b = sides(server.port)
    gate = threading.Event()
    slow = Loader("v", gate=gate)
    left = a.call("k", slow)  # the leader's caller leaves at 0.2 s...
    assert isinstance(left.error, WaitTimeoutError) and isinstance(left.error, TimeoutError), left
    assert 0.15 <= left.elapsed < 10
    assert slow.runs == 1
    remote = b.submit("k", slow)  # ...the flight still holds the lease in Redis
    _wait_for(lambda: b.stats().waits == 1)
    gate.set()
    assert remote.result(10).value == "v"
    assert slow.runs == 1
    _wait_for(lambda: a.stats().in_flight == 0)
    stats = a.stats()
    assert (stats.timeouts, stats.flights) == (1, 1)
    timed_out = events.of(TimedOut)
    assert len(timed_out) == 1 and timed_out[0].key == "k"


@pytest.mark.parametrize("group_class", [RedisGroup, AsyncRedisGroup])
def test_bad_limit_options_are_refused(group_class: Any, server: RedisServer) -> None:
    client = (redis.Redis if group_class is RedisGroup else redis.asyncio.Redis)(port=server.port)
    for options, message in [
        ({"max_flights": 0}, "max_flights"),
        ({"on_limit": "queue"}, "on_limit"),
        ({"timeout": -1}, "timeout"),
    ]:
        with pytest.raises((ValueError, TypeError), match=message):
            group_class(client, namespace="bad", **options)


def test_do_future_waiting_for_a_slot_is_told_and_counted_as_one_flight(
    server: RedisServer,
) -> None:
    """The thread a do_future() waits for a slot on acts in its caller's context: the
    flight it leads has one id from start to end, and its failure is counted."""
    events = Recorder()
    client = redis.Redis(port=server.port)
    group: RedisGroup[str, str] = RedisGroup(
        client, namespace="slot-future", max_flights=1, on_limit="wait", on_event=events
    )
    gate = threading.Event()

    def hold() -> str:
        assert gate.wait(10)
        return "a"

    def fail() -> str:
        raise ValueError("b failed")

    try:
        first = group.do_future("a", hold)
        _wait_for(lambda: "a" in group)
        second = group.do_future("b", fail)  # waits for the slot on a thread
        gate.set()
        assert first.result(10) == "a"
        with pytest.raises(ValueError, match="b failed"):
            second.result(10)
        _wait_for(lambda: len(events.of(FlightFailed)) == 1)
        started = {e.key: e.flight for e in events.of(FlightStarted)}
        ended = {e.key: e.flight for e in [*events.of(FlightFinished), *events.of(FlightFailed)]}
        assert started == ended and 0 not in started.values()
        stats = group.stats()
        assert (stats.flights, stats.errors, stats.in_flight) == (2, 1, 0)
    finally:
        gate.set()
        group.close()
        client.close()


FLEET_FIELDS = ("l2_hits", "l2_misses", "invalidations_sent", "invalidations_received", "l1_drops")


def test_a_fleet_cache_tells_invalidations_and_l1_drops_and_exports_its_counters(
    server: RedisServer, otel: Any
) -> None:
    """Two fleet caches on one namespace stand for two processes: one loads, the
    other reads the entry in Redis; an invalidation reaches the other as an
    event; the channel killed drops both L1s.  Both exporters carry the counters."""
    from prometheus_client import CollectorRegistry

    from singleflight import LoadingCache
    from singleflight.events import InvalidationReceived, L1Dropped
    from singleflight.metrics.prometheus import register
    from singleflight.redis import Fleet

    client = redis.Redis(port=server.port)
    recorders = [Recorder(), Recorder()]
    caches = [
        LoadingCache(
            str.upper,
            ttl=30,
            name=f"fleet-{i}",
            on_event=recorders[i],
            fleet=Fleet(client, namespace="observed"),
        )
        for i in range(2)
    ]
    hook = otel.hook()
    registry = CollectorRegistry()
    for cache in caches:
        assert cache._fleet.wait_trusted(10)
        register(cache, registry=registry)
        hook.observe(cache)
    try:
        assert caches[0].get("k") == "K"  # loaded: an L2 miss
        assert caches[1].get("k") == "K"  # the entry in Redis: an L2 hit
        caches[0].invalidate("k")
        wait_for(lambda: any(isinstance(e, InvalidationReceived) for e in recorders[1].events), 10)
        received = [e for e in recorders[1].events if isinstance(e, InvalidationReceived)]
        assert received == [InvalidationReceived("fleet-1", "key", "k")], recorders[1].kinds()
        assert not [e for e in recorders[0].events if isinstance(e, InvalidationReceived)]
        assert caches[1].get("k") == "K"
        killer = redis.Redis(port=server.port)
        try:
            assert killer.client_kill_filter(_type="pubsub") >= 1
        finally:
            killer.close()
        wait_for(lambda: all(c.stats().l1_drops >= 1 for c in caches), 10)
        dropped = [e for e in recorders[1].events if isinstance(e, L1Dropped)]
        assert dropped and dropped[0] == L1Dropped("fleet-1", 1)
        stats = [c.stats() for c in caches]
        assert (stats[0].l2_misses, stats[1].l2_hits) == (1, 1)
        assert (stats[0].invalidations_sent, stats[1].invalidations_received) == (1, 1)
        samples = _scrape(registry)
        points = otel.points()
        for cache, stat in zip(caches, stats, strict=True):
            for field in FLEET_FIELDS:
                value = getattr(stat, field)
                labels = (("cache", cache.name),)
                assert samples[f"singleflight_cache_{field}_total", labels] == value, field
                attrs = (("singleflight.cache", cache.name),)
                assert points[f"singleflight.cache.{field}", attrs].value == value, field
    finally:
        for cache in caches:
            cache.close()
        client.close()
