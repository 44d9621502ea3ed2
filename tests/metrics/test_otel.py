"""The OpenTelemetry hook against the real SDK: in-memory metric reader and span exporter."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from singleflight import Group, LoadingCache
from singleflight.events import Event
from singleflight.metrics.otel import OtelHook, instrument

from .._support import Stop
from ._drive import drive

pytestmark = pytest.mark.timeout(30)


class Otel:
    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.spans = InMemorySpanExporter()
        self.tracers = TracerProvider()
        self.tracers.add_span_processor(SimpleSpanProcessor(self.spans))

    def hook(self, *objects: Any, **options: Any) -> OtelHook:
        return instrument(
            *objects, meter_provider=self.meters, tracer_provider=self.tracers, **options
        )

    def points(self) -> dict[tuple[str, tuple[tuple[str, Any], ...]], Any]:
        """(instrument, attributes) -> data point, from one collection."""
        data = self.reader.get_metrics_data()
        found: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}
        if data is None:  # nothing recorded at all
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                assert scope.scope.name == "singleflight"
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        found[metric.name, tuple(sorted(point.attributes.items()))] = point
        return found


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = Otel()
    yield o
    o.meters.shutdown()
    o.tracers.shutdown()


COUNTERS = {
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
}


def test_metric_values_equal_stats(otel: Otel) -> None:
    hook = otel.hook()
    group: Group[str, str] = Group(name="users", on_event=hook, max_flights=1)
    hook.observe(group)
    drive(group)
    stats = group.stats()
    assert stats.joins == 7 and stats.rejected == 1 and stats.errors == 1
    points = otel.points()
    attrs = (("singleflight.group", "users"),)
    for name, field in COUNTERS.items():
        assert points[name, attrs].value == pytest.approx(getattr(stats, field)), name
    ok = points["singleflight.flight.duration", (*attrs, ("singleflight.outcome", "ok"))]
    error = points["singleflight.flight.duration", (*attrs, ("singleflight.outcome", "error"))]
    assert ok.count == stats.flights - stats.errors and error.count == stats.errors


def test_joiners_are_linked_to_the_leaders_span(otel: Otel) -> None:
    group: Group[str, str] = Group(name="users", on_event=otel.hook())
    drive(group, callers=5)
    spans = otel.spans.get_finished_spans()
    flights = [s for s in spans if s.name == "singleflight.flight"]
    joins = [s for s in spans if s.name == "singleflight.join"]
    by_key = {s.attributes["singleflight.key"]: s for s in flights}
    assert set(by_key) == {"'shared'", "'other'", "'bad'", "'alone'"}
    shared = by_key["'shared'"]
    assert shared.attributes["singleflight.group"] == "users"
    assert shared.attributes["singleflight.outcome"] == "ok"
    assert shared.attributes["singleflight.callers"] == 5
    assert len(joins) == 4
    for join in joins:
        assert [link.context.span_id for link in join.links] == [shared.context.span_id]
        assert join.attributes["singleflight.key"] == "'shared'"
    bad = by_key["'bad'"]
    assert bad.status.status_code is StatusCode.ERROR
    assert bad.attributes["singleflight.outcome"] == "error"
    assert [e.name for e in bad.events] == ["exception"]
    assert by_key["'alone'"].attributes["singleflight.callers"] == 1


def test_flight_span_is_a_child_of_the_leaders_span(otel: Otel) -> None:
    group: Group[str, int] = Group(name="g", on_event=otel.hook())
    tracer = otel.tracers.get_tracer("test")
    with tracer.start_as_current_span("request") as request:
        group.do("k", lambda: 1)
    (flight,) = [s for s in otel.spans.get_finished_spans() if s.name == "singleflight.flight"]
    assert flight.parent is not None
    assert flight.parent.span_id == request.get_span_context().span_id


def test_aborted_flight_ends_its_span_with_error(otel: Otel) -> None:
    group: Group[str, int] = Group(name="g", on_event=otel.hook())

    def interrupted() -> int:
        raise Stop

    with pytest.raises(Stop):
        group.do("k", interrupted)
    (flight,) = otel.spans.get_finished_spans()
    assert flight.attributes["singleflight.outcome"] == "aborted"
    assert flight.status.status_code is StatusCode.ERROR
    attrs = (("singleflight.group", "g"), ("singleflight.outcome", "aborted"))
    assert otel.points()["singleflight.flight.duration", attrs].count == 1


def test_cache_counters_equal_stats(otel: Otel) -> None:
    hook = otel.hook()
    cache: LoadingCache[int, int] = LoadingCache(lambda k: k + 1, ttl=60.0)
    try:
        hook.observe(cache, name="plus")
        for key in [1, 1, 2, 1]:
            cache.get(key)
        stats = cache.stats()
        points = otel.points()
        attrs = (("singleflight.cache", "plus"),)
        assert points["singleflight.cache.hits", attrs].value == stats.hits == 2
        assert points["singleflight.cache.misses", attrs].value == stats.misses == 2
        assert points["singleflight.cache.loads", attrs].value == stats.loads
        assert points["singleflight.cache.size", attrs].value == stats.size == 2
    finally:
        cache.close()


def test_two_hooks_of_one_provider_share_names_and_both_report(otel: Otel) -> None:
    first, second = otel.hook(), otel.hook()
    a: Group[str, int] = Group(name="a", on_event=first)
    b: Group[str, int] = Group(name="b", on_event=second)
    first.observe(a)
    second.observe(b)
    with pytest.raises(ValueError, match="already registered"):
        second.observe(Group(name="a"))
    a.do("k", lambda: 1)
    b.do("k", lambda: 1)
    b.do("k", lambda: 1)
    points = otel.points()
    assert points["singleflight.calls", (("singleflight.group", "a"),)].value == 1
    assert points["singleflight.calls", (("singleflight.group", "b"),)].value == 2


def test_then_gets_every_event_even_when_it_raises_for_some(otel: Otel) -> None:
    seen: list[Event] = []
    lock = threading.Lock()

    def mine(event: Event) -> None:
        with lock:
            seen.append(event)

    group: Group[str, int] = Group(name="g", on_event=otel.hook(then=mine))
    group.do("k", lambda: 1)
    assert [type(e).__name__ for e in seen] == ["FlightStarted", "FlightFinished"]
    assert len(otel.spans.get_finished_spans()) == 1


def test_unobserved_group_still_traces_and_bad_options_fail(otel: Otel) -> None:
    with pytest.raises(TypeError, match="then must be"):
        otel.hook(then=42)
    hook = otel.hook()
    with pytest.raises(TypeError, match="pass name="):
        cache: LoadingCache[int, int] = LoadingCache(lambda k: k)
        cache.name = None  # type: ignore[assignment]  # an object without a usable name
        try:
            hook.observe(cache)
        finally:
            cache.close()
    group: Group[str, int] = Group(name="g")
    hook.observe(group)
    assert hook.forget(group)
    assert not hook.forget(group)
    assert not any(name == "singleflight.calls" for name, _ in otel.points())


def test_missing_api_names_the_extra_and_core_imports_neither() -> None:
    code = (
        "import sys\n"
        "import singleflight\n"
        "assert 'opentelemetry' not in sys.modules and 'prometheus_client' not in sys.modules\n"
        "sys.modules['opentelemetry'] = None\n"
        "try:\n    import singleflight.metrics.otel\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True
    ).stdout
    assert "pip install 'pysingleflight[otel]'" in out


def test_chain_hands_every_event_to_each_hook_even_after_one_raises() -> None:
    from singleflight.metrics import chain

    seen: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("exporter down")

    def mine(event: Event) -> None:
        seen.append(type(event).__name__)

    group: Group[str, int] = Group(on_event=chain(None, broken, mine))
    assert group.do("k", lambda: 1) == 1
    assert seen == ["FlightStarted", "FlightFinished"]
    with pytest.raises(TypeError, match="must be callable"):
        chain(mine, 3)  # type: ignore[arg-type]
