"""The Prometheus collector, read back through prometheus_client's own text format."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from singleflight import Group, LoadingCache
from singleflight.metrics.prometheus import SingleflightCollector, register, unregister
from singleflight.stats import GroupStats

from ._drive import drive

pytestmark = pytest.mark.timeout(30)

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
CACHE_FIELDS = {
    "singleflight_cache_hits_total": "hits",
    "singleflight_cache_misses_total": "misses",
    "singleflight_cache_loads_total": "loads",
    "singleflight_cache_load_failures_total": "load_failures",
    "singleflight_cache_stale_served_total": "stale_served",
    "singleflight_cache_refreshes_total": "refreshes",
    "singleflight_cache_early_refreshes_total": "early_refreshes",
    "singleflight_cache_evictions_total": "evictions",
    "singleflight_cache_size": "size",
    "singleflight_cache_l2_hits_total": "l2_hits",
    "singleflight_cache_l2_misses_total": "l2_misses",
    "singleflight_cache_fleet_refreshes_total": "fleet_refreshes",
    "singleflight_cache_invalidations_sent_total": "invalidations_sent",
    "singleflight_cache_invalidations_received_total": "invalidations_received",
    "singleflight_cache_l1_drops_total": "l1_drops",
}


def scrape(registry: CollectorRegistry) -> dict[tuple[str, str, str], float]:
    """(sample name, label name, label value) -> value, parsed from the exposition text."""
    text = generate_latest(registry).decode()
    samples: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            ((label, value),) = sample.labels.items()
            key = (sample.name, label, value)
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def test_group_series_equal_stats_after_real_threads() -> None:
    registry = CollectorRegistry()
    group: Group[str, str] = Group(name="users", max_flights=1)
    register(group, registry=registry)
    drive(group)
    stats = group.stats()
    assert stats.joins == 7 and stats.rejected == 1 and stats.errors == 1  # the drive worked
    samples = scrape(registry)
    for name, field in GROUP_FIELDS.items():
        assert samples[name, "group", "users"] == pytest.approx(getattr(stats, field)), name
    assert samples["singleflight_wait_seconds_total", "group", "users"] > 0


def test_in_flight_is_read_at_scrape_time() -> None:
    registry = CollectorRegistry()
    group: Group[str, int] = Group(name="live")
    register(group, registry=registry)
    entered, release = threading.Event(), threading.Event()

    def load() -> int:
        entered.set()
        assert release.wait(10)
        return 1

    worker = threading.Thread(target=group.do, args=("k", load))
    worker.start()
    try:
        assert entered.wait(10)
        assert scrape(registry)["singleflight_in_flight", "group", "live"] == 1
    finally:
        release.set()
        worker.join(10)
    assert scrape(registry)["singleflight_in_flight", "group", "live"] == 0


def test_cache_series_equal_stats() -> None:
    registry = CollectorRegistry()
    cache: LoadingCache[int, int] = LoadingCache(lambda k: k * 2, ttl=60.0)
    try:
        register(cache, name="doubles", registry=registry)
        for key in [1, 2, 1, 1, 3]:
            assert cache.get(key) == key * 2
        stats = cache.stats()
        assert stats.hits == 2 and stats.misses == 3
        samples = scrape(registry)
        for name, field in CACHE_FIELDS.items():
            assert samples[name, "cache", "doubles"] == getattr(stats, field), name
    finally:
        cache.close()


def test_groups_and_caches_side_by_side_with_their_own_labels() -> None:
    registry = CollectorRegistry()
    a: Group[str, int] = Group(name="a")
    b: Group[str, int] = Group(name="b")
    register(a, registry=registry)
    collector = register(b, registry=registry)
    assert register(a, registry=registry) is collector  # one collector per registry
    a.do("x", lambda: 1)
    for _ in range(3):
        b.do("y", lambda: 2)
    samples = scrape(registry)
    assert samples["singleflight_calls_total", "group", "a"] == 1
    assert samples["singleflight_calls_total", "group", "b"] == 3


def test_groups_are_held_weakly() -> None:
    registry = CollectorRegistry()
    group: Group[str, int] = Group(name="temporary")
    register(group, registry=registry)
    assert ("singleflight_calls_total", "group", "temporary") in scrape(registry)
    del group
    gc.collect()
    assert ("singleflight_calls_total", "group", "temporary") not in scrape(registry)
    # The name is free again.
    register(Group(name="temporary"), registry=registry)


def test_unregister() -> None:
    registry = CollectorRegistry()
    group: Group[str, int] = Group(name="g")
    register(group, registry=registry)
    assert unregister(group, registry=registry)
    assert not unregister(group, registry=registry)
    assert ("singleflight_calls_total", "group", "g") not in scrape(registry)


def test_bad_registrations_say_what_to_do() -> None:
    registry = CollectorRegistry()
    group: Group[str, int] = Group(name="dup")
    register(group, registry=registry)
    register(group, registry=registry)  # the same object again: harmless
    with pytest.raises(ValueError, match="already registered"):
        register(Group(name="dup"), registry=registry)
    with pytest.raises(ValueError, match="already registered as group 'dup'"):
        register(group, name="other", registry=registry)
    with pytest.raises(TypeError, match="stats"):
        register(object(), registry=registry)
    cache: LoadingCache[int, int] = LoadingCache(lambda k: k)
    cache.name = None  # type: ignore[assignment]  # an object without a usable name
    try:
        with pytest.raises(TypeError, match="pass name="):
            register(cache, registry=registry)
    finally:
        cache.close()
    with pytest.raises(TypeError, match="non-empty str"):
        register(Group(), name="", registry=registry)
    # Nothing half-registered: the only series are those of the one good group.
    labels = {label for _, _, label in scrape(registry)}
    assert labels == {"dup"}


def test_a_collector_of_your_own() -> None:
    registry = CollectorRegistry()
    collector = SingleflightCollector()
    registry.register(collector)
    group: Group[str, int] = Group(name="mine")
    collector.add(group)
    group.do("k", lambda: 1)
    assert scrape(registry)["singleflight_flights_total", "group", "mine"] == 1


def test_empty_families_are_still_described() -> None:
    text = generate_latest(_registry_with_empty_collector()).decode()
    assert "# TYPE singleflight_calls counter" in text or "# TYPE singleflight_calls_total" in text
    assert 'group="' not in text


def _registry_with_empty_collector() -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(SingleflightCollector())
    return registry


def test_stats_field_list_is_complete() -> None:
    # A new GroupStats counter must get a series.
    assert set(GROUP_FIELDS.values()) == set(GroupStats.__dataclass_fields__)


def test_missing_client_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "try:\n    import singleflight.metrics.prometheus\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True
    ).stdout
    assert "pip install 'pysingleflight[prometheus]'" in out
