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

import weakref
from collections.abc import Callable
from typing import Literal, NamedTuple

from ..events import Event, EventHook, emit
from ..stats import CacheStats, GroupStats

__all__ = ["chain"]


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


def missing(package: str, extra: str) -> ImportError:
    """The error an exporter raises when the library it needs is not installed."""
    return ImportError(
        f"singleflight.metrics.{extra} needs the {package!r} package, which is not "
        f"installed: pip install 'pysingleflight[{extra}]'"
    )


class Watched(NamedTuple):
    """A group or cache an exporter reads, held weakly so that watching it never keeps it alive."""

    ref: Callable[[], object | None]
    kind: Literal["group", "cache"]
    name: str


class Watchlist:
    """The groups and caches an exporter reads at collection time (shared by both exporters).

    Each is held by a weak reference: one that is garbage collected drops out.
    Two live objects of one kind may not share a name, since their series
    would be indistinguishable.  Not thread-safe by itself: callers hold a lock.
    """

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: list[Watched] = []

    def add(self, obj: object, name: str | None) -> Watched:
        stats = getattr(obj, "stats", None)
        if not callable(stats):
            raise TypeError(
                f"expected a singleflight group or cache (an object with stats()); "
                f"got {type(obj).__name__} {obj!r}"
            )
        snapshot = stats()
        kind: Literal["group", "cache"]
        if isinstance(snapshot, CacheStats):  # a GroupStats too: test it first
            kind = "cache"
        elif isinstance(snapshot, GroupStats):
            kind = "group"
        else:
            raise TypeError(
                f"{obj!r}.stats() returned {type(snapshot).__name__}, not GroupStats or CacheStats"
            )
        if name is None:
            name = getattr(obj, "name", None)
            if not isinstance(name, str):
                raise TypeError(
                    f"{type(obj).__name__} has no name: pass name= to label its metrics"
                )
        elif not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str; got {name!r}")
        self.prune()
        for item in self._items:
            if item.ref() is obj:
                if item.name == name:
                    return item  # registering an object twice is harmless
                raise ValueError(f"{obj!r} is already registered as {item.kind} {item.name!r}")
            if item.kind == kind and item.name == name:
                raise ValueError(
                    f"a {kind} named {name!r} is already registered; give this one "
                    "another name (name= on the group, or name= here)"
                )
        try:
            ref: Callable[[], object | None] = weakref.ref(obj)
        except TypeError:
            raise TypeError(f"{type(obj).__name__} cannot be held weakly") from None
        item = Watched(ref, kind, name)
        self._items.append(item)
        return item

    def remove(self, obj: object) -> bool:
        before = len(self._items)
        self._items = [item for item in self._items if item.ref() is not obj]
        self.prune()
        return len(self._items) != before

    def prune(self) -> None:
        self._items = [item for item in self._items if item.ref() is not None]

    def live(self) -> list[tuple[Watched, object]]:
        """Each object still alive, with its entry (call its stats() without the lock held)."""
        pairs = []
        for item in self._items:
            obj = item.ref()
            if obj is not None:
                pairs.append((item, obj))
        return pairs


def read(pairs: list[tuple[Watched, object]]) -> list[tuple[Watched, GroupStats | CacheStats]]:
    """The current stats() of each watched object."""
    return [(item, obj.stats()) for item, obj in pairs]  # type: ignore[attr-defined]
