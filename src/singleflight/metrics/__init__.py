"""Exporters of what groups and caches report, each behind an extra.

* :mod:`singleflight.metrics.prometheus` (``pip install 'pysingleflight[prometheus]'``):
  a collector that reads ``stats()`` of registered groups and caches at scrape time.
* :mod:`singleflight.metrics.otel` (``pip install 'pysingleflight[otel]'``):
  an ``on_event`` hook recording OpenTelemetry metrics and a span per flight.

Nothing here is imported by ``import singleflight``; the exporters import their
client library only when their module is imported, and say which extra is
missing when it is not installed.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Literal, NamedTuple

from ..events import Event, EventHook, emit
from ..stats import CacheStats, GroupStats, RedisGroupStats

__all__ = ["chain"]


class Series(NamedTuple):
    """One series both exporters export: ``field`` of the ``stats()`` of a ``kind`` of object.

    Named ``singleflight.<kind>.<name>`` (OpenTelemetry) and
    ``singleflight_<kind>_<name>[_total]`` (Prometheus), without ``<kind>`` for
    ``"group"``; ``name`` defaults to ``field``.
    """

    kind: str  # "group", "cache" or "redis" (a Redis group's own counters)
    field: str
    unit: str
    help: str
    counter: bool = True
    name: str = ""

    def parts(self) -> tuple[str, ...]:
        """The name's parts after ``singleflight``."""
        return (*((self.kind,) if self.kind != "group" else ()), self.name or self.field)


SERIES = (
    Series("group", "calls", "{call}", "Calls made to the group (flights + joins)."),
    Series("group", "flights", "{flight}", "Flights started: loader runs."),
    Series("group", "joins", "{call}", "Calls that joined a flight in progress."),
    Series(
        "group", "shared", "{flight}", "Flights with at least one joiner.", name="shared_flights"
    ),
    Series("group", "errors", "{flight}", "Flights whose loader raised an Exception."),
    Series("group", "aborted", "{flight}", "Flights that ended without a result."),
    Series("group", "timeouts", "{call}", "Callers that stopped waiting at the timeout."),
    Series("group", "rejected", "{call}", "Calls refused by max_flights."),
    Series("group", "wait_seconds", "s", "Seconds joiners spent waiting, summed."),
    Series("group", "in_flight", "{key}", "Keys in flight now.", counter=False),
    Series("cache", "hits", "{read}", "Reads answered from the cache (stale included)."),
    Series("cache", "misses", "{read}", "Reads that waited for a load."),
    Series("cache", "loads", "{load}", "Loads whose outcome callers got."),
    Series("cache", "load_failures", "{load}", "Loads that raised."),
    Series("cache", "stale_served", "{read}", "Reads answered with a stale value."),
    Series("cache", "refreshes", "{load}", "Refreshes of stale entries."),
    Series("cache", "early_refreshes", "{load}", "Early refreshes."),
    Series("cache", "evictions", "{entry}", "Entries dropped (size or expiry)."),
    Series("cache", "size", "{entry}", "Entries held now.", counter=False),
    Series("cache", "l2_hits", "{read}", "Fleet cache misses answered by the entry in Redis."),
    Series("cache", "l2_misses", "{load}", "Loads this process led for the fleet."),
    Series("cache", "fleet_refreshes", "{load}", "Background refreshes led for the fleet."),
    Series("cache", "invalidations_sent", "{message}", "Invalidations this process sent."),
    Series(
        "cache",
        "invalidations_received",
        "{message}",
        "Invalidations other processes sent that reached this one.",
    ),
    Series("cache", "l1_drops", "{event}", "Times the channel was lost and the L1 dropped."),
    Series("redis", "hits", "{call}", "Values taken from another process's flight."),
    Series("redis", "leads", "{flight}", "Loader runs here holding the Redis lease."),
    Series("redis", "takeovers", "{flight}", "Leads after a vanished leader."),
    Series("redis", "waits", "{read}", "Blocking reads on another process's flight."),
    Series("redis", "fenced", "{flight}", "Completions refused after a takeover."),
    Series("redis", "lost_leases", "{flight}", "Leases lost while loading."),
    Series("redis", "resurrections", "{flight}", "Lapsed leases renewed."),
    Series("redis", "remote_errors", "{call}", "Errors of remote loaders."),
    Series("redis", "local_runs", "{call}", "Loader runs without Redis."),
    Series("redis", "unavailable", "{call}", "Calls failed for Redis."),
    Series("redis", "redis_errors", "{operation}", "Failed Redis operations.", name="errors"),
    Series("redis", "untrusted_payloads", "{payload}", "Payloads read as misses."),
    Series("redis", "breaker_opens", "{event}", "Times the breaker opened."),
)
KINDS = ("group", "cache", "redis")
# The label (attribute) naming the object a series is of.
LABEL = {"group": "group", "cache": "cache", "redis": "group"}
# The gauge breaker_state{group, state} of Redis groups: 1 for the state now, 0 for the others.
BREAKER_STATES = ("closed", "open", "half-open")
BREAKER_HELP = "The Redis circuit breaker's state: 1 for the current one."


def kinds(stats: GroupStats) -> tuple[str, ...]:
    """The kinds of series a ``stats()`` snapshot feeds."""
    if isinstance(stats, CacheStats):  # a GroupStats too: test it first
        return ("cache",)
    return ("group", "redis") if isinstance(stats, RedisGroupStats) else ("group",)


def chain(*hooks: EventHook | None) -> EventHook:
    """One ``on_event`` hook that hands each event to every hook given, in order.

    ``None`` entries are skipped, so ``chain(existing, exporter)`` works whether
    or not there was an existing hook.  A hook that raises is logged and the
    next one still gets the event.
    """
    active = tuple(hook for hook in hooks if hook is not None)
    for each in active:
        if not callable(each):
            raise TypeError(f"on_event hooks must be callable; got {type(each).__name__} {each!r}")

    def chained(event: Event) -> None:
        for each in active:
            emit(each, event)

    return chained


class Watched(NamedTuple):
    """A group or cache an exporter reads, held weakly so that watching it never keeps it alive."""

    ref: Callable[[], object | None]
    kind: Literal["group", "cache"]
    name: str


class Watchlist:
    """The groups and caches an exporter reads at collection time (shared by both exporters).

    Each is held by a weak reference: one that is garbage collected drops out.
    Two live objects of one kind may not share a name, since their series
    would be indistinguishable.  Thread-safe.
    """

    __slots__ = ("_items", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Watched] = []

    def add(self, obj: object, name: str | None) -> None:
        """Watch ``obj`` under ``name`` (default: its own); TypeError or ValueError if it cannot."""
        stats = getattr(obj, "stats", None)
        if not callable(stats):
            raise TypeError(
                f"expected a singleflight group or cache (an object with stats()); "
                f"got {type(obj).__name__} {obj!r}"
            )
        snapshot = stats()
        if not isinstance(snapshot, GroupStats):
            raise TypeError(
                f"{obj!r}.stats() returned {type(snapshot).__name__}, not GroupStats or CacheStats"
            )
        kind: Literal["group", "cache"] = "cache" if isinstance(snapshot, CacheStats) else "group"
        if name is None:
            name = getattr(obj, "name", None)
            if not isinstance(name, str):
                raise TypeError(
                    f"{type(obj).__name__} has no name: pass name= to label its metrics"
                )
        elif not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str; got {name!r}")
        try:
            ref: Callable[[], object | None] = weakref.ref(obj)
        except TypeError:
            raise TypeError(f"{type(obj).__name__} cannot be held weakly") from None
        with self._lock:
            self._prune()
            for item in self._items:
                if item.ref() is obj:
                    if item.name == name:
                        return  # registering an object twice is harmless
                    raise ValueError(f"{obj!r} is already registered as {item.kind} {item.name!r}")
                if item.kind == kind and item.name == name:
                    raise ValueError(
                        f"a {kind} named {name!r} is already registered; give this one "
                        "another name (name= on the group, or name= here)"
                    )
            self._items.append(Watched(ref, kind, name))

    def remove(self, obj: object) -> bool:
        """Stop watching ``obj``; False if it was not watched."""
        with self._lock:
            before = len(self._items)
            self._items = [item for item in self._items if item.ref() is not obj]
            self._prune()
            return len(self._items) != before

    def _prune(self) -> None:
        self._items = [item for item in self._items if item.ref() is not None]

    def read(self) -> list[tuple[str, GroupStats]]:
        """``(name, stats())`` of each object still alive."""
        with self._lock:
            self._prune()
            live = [(item.name, obj) for item in self._items if (obj := item.ref()) is not None]
        # stats() takes the object's own lock: never while holding ours.
        return [(name, obj.stats()) for name, obj in live]  # type: ignore[attr-defined]
