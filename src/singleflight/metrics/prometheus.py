"""Prometheus metrics of groups and caches, read from their ``stats()`` at scrape time.

``pip install 'pysingleflight[prometheus]'``, then::

    from prometheus_client import start_http_server
    from singleflight.metrics.prometheus import register

    users = Group(name="users")
    register(users)                       # into prometheus_client.REGISTRY
    register(user_cache)                  # labelled by the cache's name=
    start_http_server(9100)

Nothing is counted on the call path: the collector asks each registered object
for ``stats()`` when Prometheus scrapes.  Objects are held weakly; a group or
cache that is garbage collected drops out of the output.

Series (label ``group`` or ``cache``, the object's name):

``singleflight_calls_total``, ``singleflight_flights_total``,
``singleflight_joins_total``, ``singleflight_shared_flights_total``,
``singleflight_errors_total``, ``singleflight_aborted_total``,
``singleflight_timeouts_total``, ``singleflight_rejected_total``,
``singleflight_wait_seconds_total`` (counters), ``singleflight_in_flight`` (gauge);
``singleflight_cache_hits_total``, ``_misses_total``, ``_loads_total``,
``_load_failures_total``, ``_stale_served_total``, ``_refreshes_total``,
``_early_refreshes_total``, ``_evictions_total`` (counters, all prefixed
``singleflight_cache``) and ``singleflight_cache_size`` (gauge).

A Redis group (:class:`singleflight.redis.RedisGroup`, ``AsyncRedisGroup``)
has the group series, counted in this process, and its own counters
``singleflight_redis_hits_total``, ``_leads_total``, ``_takeovers_total``,
``_waits_total``, ``_fenced_total``, ``_lost_leases_total``,
``_resurrections_total``, ``_remote_errors_total``, ``_local_runs_total``,
``_unavailable_total``, ``_errors_total`` (failed Redis operations),
``_untrusted_payloads_total``, ``_breaker_opens_total`` (all prefixed
``singleflight_redis``), and the gauge
``singleflight_redis_breaker_state{group, state}``: 1 for the breaker's
state now (``closed``, ``open`` or ``half-open``), 0 for the others.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable

from ..stats import CacheStats, GroupStats, RedisGroupStats
from . import Watchlist, missing, read

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:
    raise missing("prometheus-client", "prometheus") from exc

__all__ = ["SingleflightCollector", "register", "unregister"]

# (metric name without _total, GroupStats field, help, is a counter)
_GROUP_SERIES: tuple[tuple[str, str, str, bool], ...] = (
    ("singleflight_calls", "calls", "Calls made to the group (flights + joins).", True),
    ("singleflight_flights", "flights", "Flights started: loader runs.", True),
    ("singleflight_joins", "joins", "Calls that joined a flight in progress.", True),
    ("singleflight_shared_flights", "shared", "Flights that had at least one joiner.", True),
    ("singleflight_errors", "errors", "Flights whose loader raised an Exception.", True),
    ("singleflight_aborted", "aborted", "Flights that ended without a result.", True),
    ("singleflight_timeouts", "timeouts", "Callers that stopped waiting at the timeout.", True),
    ("singleflight_rejected", "rejected", "Calls refused by max_flights.", True),
    ("singleflight_wait_seconds", "wait_seconds", "Seconds joiners spent waiting, summed.", True),
    ("singleflight_in_flight", "in_flight", "Keys in flight now.", False),
)
_CACHE_SERIES: tuple[tuple[str, str, str, bool], ...] = (
    ("singleflight_cache_hits", "hits", "Reads answered from the cache (stale included).", True),
    ("singleflight_cache_misses", "misses", "Reads that waited for a load.", True),
    ("singleflight_cache_loads", "loads", "Loads whose outcome callers got.", True),
    ("singleflight_cache_load_failures", "load_failures", "Loads that raised.", True),
    ("singleflight_cache_stale_served", "stale_served", "Reads answered with a stale value.", True),
    ("singleflight_cache_refreshes", "refreshes", "Refreshes of stale entries.", True),
    ("singleflight_cache_early_refreshes", "early_refreshes", "Early refreshes.", True),
    ("singleflight_cache_evictions", "evictions", "Entries dropped (size or expiry).", True),
    ("singleflight_cache_size", "size", "Entries held now.", False),
)

# Redis groups only (RedisGroupStats fields), besides the group series.
_REDIS_SERIES: tuple[tuple[str, str, str, bool], ...] = (
    ("singleflight_redis_hits", "hits", "Values taken from another process's flight.", True),
    ("singleflight_redis_leads", "leads", "Loader runs here holding the Redis lease.", True),
    ("singleflight_redis_takeovers", "takeovers", "Leads after a vanished leader.", True),
    ("singleflight_redis_waits", "waits", "Blocking reads on another process's flight.", True),
    ("singleflight_redis_fenced", "fenced", "Completions refused after a takeover.", True),
    ("singleflight_redis_lost_leases", "lost_leases", "Leases lost while loading.", True),
    ("singleflight_redis_resurrections", "resurrections", "Lapsed leases renewed.", True),
    ("singleflight_redis_remote_errors", "remote_errors", "Errors of remote loaders.", True),
    ("singleflight_redis_local_runs", "local_runs", "Loader runs without Redis.", True),
    ("singleflight_redis_unavailable", "unavailable", "Calls failed for Redis.", True),
    ("singleflight_redis_errors", "redis_errors", "Failed Redis operations.", True),
    (
        "singleflight_redis_untrusted_payloads",
        "untrusted_payloads",
        "Payloads read as misses.",
        True,
    ),
    ("singleflight_redis_breaker_opens", "breaker_opens", "Times the breaker opened.", True),
)
_BREAKER_STATES = ("closed", "open", "half-open")


def _breaker_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "singleflight_redis_breaker_state",
        "The Redis circuit breaker's state: 1 for the current one.",
        labels=["group", "state"],
    )


def _families(
    series: tuple[tuple[str, str, str, bool], ...], label: str
) -> dict[str, CounterMetricFamily | GaugeMetricFamily]:
    return {
        field: (CounterMetricFamily if counter else GaugeMetricFamily)(name, doc, labels=[label])
        for name, field, doc, counter in series
    }


class SingleflightCollector(Collector):
    """A Prometheus collector of the ``stats()`` of the groups and caches added to it.

    Use :func:`register` for the usual case; make one yourself to register it
    in a registry of your own with ``registry.register(collector)``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched = Watchlist()

    def add(self, obj: object, *, name: str | None = None) -> None:
        """Export the ``stats()`` of a group or cache, labelled ``name``.

        ``name`` defaults to the object's own ``name`` (groups and caches take
        ``name=``).  ``TypeError`` for an object without ``stats()`` or
        without a name; ``ValueError`` when another live object of its kind is
        already exported under that name (their series would collide).  Adding
        the same object again under the same name does nothing.
        """
        with self._lock:
            self._watched.add(obj, name)

    def remove(self, obj: object) -> bool:
        """Stop exporting ``obj``; False if it was not exported."""
        with self._lock:
            return self._watched.remove(obj)

    def describe(self) -> Iterable[Metric]:
        # The families without samples: lets a registry check name clashes
        # without reading any stats.
        yield from _families(_GROUP_SERIES, "group").values()
        yield from _families(_CACHE_SERIES, "cache").values()
        yield from _families(_REDIS_SERIES, "group").values()
        yield _breaker_family()

    def collect(self) -> Iterable[Metric]:
        groups = _families(_GROUP_SERIES, "group")
        caches = _families(_CACHE_SERIES, "cache")
        redis = _families(_REDIS_SERIES, "group")
        breaker = _breaker_family()
        with self._lock:
            self._watched.prune()
            live = self._watched.live()
        # stats() takes the object's own lock: never while holding ours.
        snapshots = read(live)
        for item, stats in snapshots:
            if isinstance(stats, CacheStats):  # a GroupStats too: test it first
                families = caches
            else:
                assert isinstance(stats, GroupStats)
                families = groups
            for field, family in families.items():
                family.add_metric([item.name], getattr(stats, field))
            if isinstance(stats, RedisGroupStats):
                for field, family in redis.items():
                    family.add_metric([item.name], getattr(stats, field))
                for state in _BREAKER_STATES:
                    breaker.add_metric([item.name, state], float(stats.breaker == state))
        yield from groups.values()
        yield from caches.values()
        if breaker.samples:  # only with a Redis group: others need none of these
            yield from redis.values()
            yield breaker


# One collector per registry, made and registered on first use.
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, SingleflightCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def register(
    obj: object, *, name: str | None = None, registry: CollectorRegistry = REGISTRY
) -> SingleflightCollector:
    """Export the ``stats()`` of a group or cache to ``registry``; returns the collector.

    The first call for a registry registers a :class:`SingleflightCollector`
    in it; later calls add to that one.  Errors as for
    :meth:`SingleflightCollector.add`; nothing is registered when it raises.
    """
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = SingleflightCollector()
            collector.add(obj, name=name)
            registry.register(collector)
            _collectors[registry] = collector
            return collector
    collector.add(obj, name=name)
    return collector


def unregister(obj: object, *, registry: CollectorRegistry = REGISTRY) -> bool:
    """Stop exporting ``obj`` to ``registry``; False if it was not exported there."""
    with _collectors_lock:
        collector = _collectors.get(registry)
    return collector is not None and collector.remove(obj)
