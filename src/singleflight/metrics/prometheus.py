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

One series per row of :data:`singleflight.metrics.SERIES` (``singleflight_calls_total``,
``singleflight_cache_hits_total``, ``singleflight_redis_hits_total``, ...; the gauges
without ``_total``), labelled ``group`` or ``cache`` (the object's name), and for
Redis groups the gauge ``singleflight_redis_breaker_state{group, state}``: 1 for the
breaker's state now (``closed``, ``open`` or ``half-open``), 0 for the others.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable

from .._options import missing
from ..stats import RedisGroupStats
from . import BREAKER_HELP, BREAKER_STATES, KINDS, LABEL, SERIES, Watchlist, kinds

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:
    raise missing("metrics.prometheus", "prometheus", "prometheus-client") from exc

__all__ = ["SingleflightCollector", "register", "unregister"]

Family = CounterMetricFamily | GaugeMetricFamily


def _families() -> dict[str, dict[str, Family]]:
    """Empty families of every series: ``{kind: {stats field: family}}``."""
    families: dict[str, dict[str, Family]] = {kind: {} for kind in KINDS}
    for series in SERIES:
        kind = CounterMetricFamily if series.counter else GaugeMetricFamily
        name = "_".join(("singleflight", *series.parts()))
        families[series.kind][series.field] = kind(name, series.help, labels=[LABEL[series.kind]])
    return families


def _breaker_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "singleflight_redis_breaker_state", BREAKER_HELP, labels=["group", "state"]
    )


class SingleflightCollector(Collector):
    """A Prometheus collector of the ``stats()`` of the groups and caches added to it.

    Use :func:`register` for the usual case; make one yourself to register it
    in a registry of your own with ``registry.register(collector)``.
    """

    def __init__(self) -> None:
        self._watched = Watchlist()

    def add(self, obj: object, *, name: str | None = None) -> None:
        """Export the ``stats()`` of a group or cache, labelled ``name``.

        ``name`` defaults to the object's own ``name`` (groups and caches take
        ``name=``).  ``TypeError`` for an object without ``stats()`` or
        without a name; ``ValueError`` when another live object of its kind is
        already exported under that name (their series would collide).  Adding
        the same object again under the same name does nothing.
        """
        self._watched.add(obj, name)

    def remove(self, obj: object) -> bool:
        """Stop exporting ``obj``; False if it was not exported."""
        return self._watched.remove(obj)

    def describe(self) -> Iterable[Metric]:
        # The families without samples: lets a registry check name clashes
        # without reading any stats.
        for families in _families().values():
            yield from families.values()
        yield _breaker_family()

    def collect(self) -> Iterable[Metric]:
        families = _families()
        breaker = _breaker_family()
        for name, stats in self._watched.read():
            for kind in kinds(stats):
                for field, family in families[kind].items():
                    family.add_metric([name], getattr(stats, field))
            if isinstance(stats, RedisGroupStats):
                for state in BREAKER_STATES:
                    breaker.add_metric([name, state], float(stats.breaker == state))
        yield from families["group"].values()
        yield from families["cache"].values()
        if breaker.samples:  # only with a Redis group: others need none of these
            yield from families["redis"].values()
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
