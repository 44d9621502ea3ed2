"""OpenTelemetry metrics and traces of groups and caches.

``pip install 'pysingleflight[otel]'`` (the API only; configure an SDK as usual).
A group's ``on_event`` is fixed when it is made, so the hook comes first::

    from singleflight import Group
    from singleflight.metrics.otel import instrument

    otel = instrument()                          # global meter and tracer providers
    users = Group(name="users", on_event=otel)
    otel.observe(users)                          # counters read from users.stats()

    otel.observe(user_cache)                     # labelled by the cache's name=

    # keeping a hook of your own as well:
    orders = Group(name="orders", on_event=instrument(then=my_hook))

What it records:

* Observable counters read from ``stats()`` at each collection (nothing is
  counted on the call path): ``singleflight.calls``, ``.flights``, ``.joins``,
  ``.shared_flights``, ``.errors``, ``.aborted``, ``.timeouts``, ``.rejected``,
  ``.wait_time`` (seconds) and the gauge ``singleflight.in_flight``, with the
  attribute ``singleflight.group``; for caches ``singleflight.cache.hits``,
  ``.misses``, ``.loads``, ``.load_failures``, ``.stale_served``,
  ``.refreshes``, ``.early_refreshes``, ``.evictions`` and the gauge
  ``singleflight.cache.size``, with ``singleflight.cache``.  Objects are held weakly.
  A Redis group (``singleflight.redis``) adds its own counters
  ``singleflight.redis.hits``, ``.leads``, ``.takeovers``, ``.waits``,
  ``.fenced``, ``.lost_leases``, ``.resurrections``, ``.remote_errors``,
  ``.local_runs``, ``.unavailable``, ``.errors`` (failed Redis operations),
  ``.untrusted_payloads``, ``.breaker_opens`` and the gauge
  ``singleflight.redis.breaker_state`` (1 for the breaker's state now, 0 for
  the others, with the attribute ``singleflight.redis.breaker``).
* The histogram ``singleflight.flight.duration`` (seconds), with the group and
  ``singleflight.outcome`` (``ok``, ``error`` or ``aborted``), from the events.
* A span ``singleflight.flight`` per flight, from ``FlightStarted`` (a child of
  the leader's current span) to the flight's final event, with attributes
  ``singleflight.group``, ``singleflight.key`` (its repr, cut at 256
  characters), ``singleflight.outcome`` and ``singleflight.callers``; status
  ERROR, with the exception recorded, for a failed or aborted flight.  Each
  ``Joined`` makes a short ``singleflight.join`` span, a child of the joiner's
  current span, linked to its leader's flight span.

The flight span is not made current while the loader runs (the hook sees
events, it does not wrap the loader): spans the loader makes are children of
the leader's span, siblings of the flight span.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from ..events import (
    Event,
    EventHook,
    FlightAborted,
    FlightFailed,
    FlightFinished,
    FlightStarted,
    Joined,
    emit,
)
from ..stats import RedisGroupStats
from . import Watchlist, missing, read

try:
    from opentelemetry import metrics, trace
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
    from opentelemetry.trace import Link, Span, Status, StatusCode, TracerProvider
except ImportError as exc:
    raise missing("opentelemetry-api", "otel") from exc

__all__ = ["OtelHook", "instrument"]

_SCOPE = "singleflight"
_KEY_CHARS = 256

# (instrument name, stats field, unit, description)
_GROUP_COUNTERS = (
    ("singleflight.calls", "calls", "{call}", "Calls made to the group (flights + joins)."),
    ("singleflight.flights", "flights", "{flight}", "Flights started: loader runs."),
    ("singleflight.joins", "joins", "{call}", "Calls that joined a flight in progress."),
    ("singleflight.shared_flights", "shared", "{flight}", "Flights with at least one joiner."),
    ("singleflight.errors", "errors", "{flight}", "Flights whose loader raised an Exception."),
    ("singleflight.aborted", "aborted", "{flight}", "Flights that ended without a result."),
    ("singleflight.timeouts", "timeouts", "{call}", "Callers that stopped waiting."),
    ("singleflight.rejected", "rejected", "{call}", "Calls refused by max_flights."),
    ("singleflight.wait_time", "wait_seconds", "s", "Time joiners spent waiting, summed."),
)
_CACHE_COUNTERS = (
    ("singleflight.cache.hits", "hits", "{read}", "Reads answered from the cache."),
    ("singleflight.cache.misses", "misses", "{read}", "Reads that waited for a load."),
    ("singleflight.cache.loads", "loads", "{load}", "Loads whose outcome callers got."),
    ("singleflight.cache.load_failures", "load_failures", "{load}", "Loads that raised."),
    ("singleflight.cache.stale_served", "stale_served", "{read}", "Reads given a stale value."),
    ("singleflight.cache.refreshes", "refreshes", "{load}", "Refreshes of stale entries."),
    ("singleflight.cache.early_refreshes", "early_refreshes", "{load}", "Early refreshes."),
    ("singleflight.cache.evictions", "evictions", "{entry}", "Entries dropped."),
)

# Redis groups only (RedisGroupStats fields), besides the group counters.
_REDIS_COUNTERS = (
    ("singleflight.redis.hits", "hits", "{call}", "Values taken from another process's flight."),
    ("singleflight.redis.leads", "leads", "{flight}", "Loader runs holding the Redis lease."),
    ("singleflight.redis.takeovers", "takeovers", "{flight}", "Leads after a vanished leader."),
    ("singleflight.redis.waits", "waits", "{read}", "Blocking reads on another's flight."),
    ("singleflight.redis.fenced", "fenced", "{flight}", "Completions refused after a takeover."),
    ("singleflight.redis.lost_leases", "lost_leases", "{flight}", "Leases lost while loading."),
    ("singleflight.redis.resurrections", "resurrections", "{flight}", "Lapsed leases renewed."),
    ("singleflight.redis.remote_errors", "remote_errors", "{call}", "Errors of remote loaders."),
    ("singleflight.redis.local_runs", "local_runs", "{call}", "Loader runs without Redis."),
    ("singleflight.redis.unavailable", "unavailable", "{call}", "Calls failed for Redis."),
    ("singleflight.redis.errors", "redis_errors", "{operation}", "Failed Redis operations."),
    ("singleflight.redis.untrusted_payloads", "untrusted_payloads", "{payload}", "Read as misses."),
    ("singleflight.redis.breaker_opens", "breaker_opens", "{event}", "Times the breaker opened."),
)
_BREAKER_STATES = ("closed", "open", "half-open")


def _key_repr(key: object) -> str:
    try:
        text = repr(key)
    except Exception:
        text = f"<unrepresentable {type(key).__name__}>"
    return text if len(text) <= _KEY_CHARS else text[: _KEY_CHARS - 3] + "..."


class OtelHook:
    """An ``on_event`` hook recording OpenTelemetry metrics and spans (see the module).

    Call it with events (pass it as a group's ``on_event``); :meth:`observe`
    adds groups and caches whose ``stats()`` feed the observable counters.
    ``then``, if given, gets every event afterwards (to keep a hook of your own).
    """

    def __init__(
        self,
        *,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        then: EventHook | None = None,
    ) -> None:
        if then is not None and not callable(then):
            raise TypeError(f"then must be an on_event hook (callable); got {then!r}")
        from .. import __version__

        self._then = then
        self._lock = threading.Lock()
        # (group name, flight id) -> the open flight span.  An id is unique while
        # its flight is alive, and every event of a flight is emitted while it is.
        self._spans: dict[tuple[str, int], Span] = {}
        meter = metrics.get_meter(_SCOPE, __version__, meter_provider)
        self._tracer = trace.get_tracer(_SCOPE, __version__, tracer_provider)
        # A histogram asked for twice is the same one; observable instruments are
        # not (the second one's callbacks would be dropped): one set per provider.
        self._durations = meter.create_histogram(
            "singleflight.flight.duration", unit="s", description="How long flights ran."
        )
        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        with _observers_lock:
            observer = _observers.get(provider)
            if observer is None:
                observer = _observers[provider] = _Observer(meter)
        self._observer = observer

    def observe(self, obj: object, *, name: str | None = None) -> OtelHook:
        """Report the ``stats()`` of a group or cache, labelled ``name``; returns self.

        ``name`` defaults to the group's ``name`` (required for caches).
        ``TypeError`` for an object without ``stats()`` or a name; ``ValueError``
        when another live object of its kind is observed under that name.
        """
        self._observer.add(obj, name)
        return self

    def forget(self, obj: object) -> bool:
        """Stop reporting ``obj``'s stats; False if it was not observed."""
        return self._observer.remove(obj)

    def __call__(self, event: Event) -> None:
        if isinstance(event, FlightStarted):
            span = self._tracer.start_span(
                "singleflight.flight",
                attributes={
                    "singleflight.group": event.group,
                    "singleflight.key": _key_repr(event.key),
                },
            )
            with self._lock:
                self._spans[event.group, event.flight] = span
        elif isinstance(event, Joined):
            with self._lock:
                leader = self._spans.get((event.group, event.flight))
            # The flight may have ended between the join and this event: no link then.
            links = [] if leader is None else [Link(leader.get_span_context())]
            self._tracer.start_span(
                "singleflight.join",
                links=links,
                attributes={
                    "singleflight.group": event.group,
                    "singleflight.key": _key_repr(event.key),
                },
            ).end()
        elif isinstance(event, FlightFinished | FlightFailed | FlightAborted):
            self._ended(event)
        if self._then is not None:
            emit(self._then, event)

    def _ended(self, event: FlightFinished | FlightFailed | FlightAborted) -> None:
        if isinstance(event, FlightFinished):
            outcome = "ok"
        elif isinstance(event, FlightFailed):
            outcome = "error"
        else:
            outcome = "aborted"
        self._durations.record(
            event.duration, {"singleflight.group": event.group, "singleflight.outcome": outcome}
        )
        with self._lock:
            span = self._spans.pop((event.group, event.flight), None)
        if span is None:
            return  # started before this hook saw it
        span.set_attribute("singleflight.outcome", outcome)
        span.set_attribute("singleflight.callers", event.callers)
        if isinstance(event, FlightFailed):
            span.record_exception(event.error)
            span.set_status(Status(StatusCode.ERROR, f"{type(event.error).__name__}"))
        elif isinstance(event, FlightAborted):
            if event.cause is not None:
                span.record_exception(event.cause)
            span.set_status(Status(StatusCode.ERROR, "aborted"))
        span.end()


class _Observer:
    """The observable instruments of one meter provider and the objects they read.

    Shared by every :class:`OtelHook` of that provider, so that names are
    unique per provider whichever hook observed the object.
    """

    def __init__(self, meter: metrics.Meter) -> None:
        self._lock = threading.Lock()
        self._watched = Watchlist()
        for name, field, unit, doc in _GROUP_COUNTERS:
            meter.create_observable_counter(
                name, [self._callback("group", field)], unit=unit, description=doc
            )
        meter.create_observable_gauge(
            "singleflight.in_flight",
            [self._callback("group", "in_flight")],
            unit="{key}",
            description="Keys in flight now.",
        )
        for name, field, unit, doc in _REDIS_COUNTERS:
            meter.create_observable_counter(
                name, [self._redis_callback(field)], unit=unit, description=doc
            )
        meter.create_observable_gauge(
            "singleflight.redis.breaker_state",
            [self._breaker_callback],
            unit="1",
            description="The Redis circuit breaker's state: 1 for the current one.",
        )
        for name, field, unit, doc in _CACHE_COUNTERS:
            meter.create_observable_counter(
                name, [self._callback("cache", field)], unit=unit, description=doc
            )
        meter.create_observable_gauge(
            "singleflight.cache.size",
            [self._callback("cache", "size")],
            unit="{entry}",
            description="Entries held now.",
        )

    def add(self, obj: object, name: str | None) -> None:
        with self._lock:
            self._watched.add(obj, name)

    def remove(self, obj: object) -> bool:
        with self._lock:
            return self._watched.remove(obj)

    def _callback(
        self, kind: str, field: str
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        attribute = f"singleflight.{kind}"

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                live = self._watched.live()
            # stats() takes the object's own lock: never while holding ours.
            return [
                Observation(getattr(stats, field), {attribute: item.name})
                for item, stats in read(live)
                if item.kind == kind
            ]

        return observe

    def _redis_stats(self) -> list[tuple[str, RedisGroupStats]]:
        with self._lock:
            live = self._watched.live()
        # stats() takes the object's own lock: never while holding ours.
        return [
            (item.name, stats) for item, stats in read(live) if isinstance(stats, RedisGroupStats)
        ]

    def _redis_callback(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(getattr(stats, field), {"singleflight.group": name})
                for name, stats in self._redis_stats()
            ]

        return observe

    def _breaker_callback(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(
                int(stats.breaker == state),
                {"singleflight.group": name, "singleflight.redis.breaker": state},
            )
            for name, stats in self._redis_stats()
            for state in _BREAKER_STATES
        ]


_observers: weakref.WeakKeyDictionary[MeterProvider, _Observer] = weakref.WeakKeyDictionary()
_observers_lock = threading.Lock()


def instrument(
    *objects: Any,
    meter_provider: MeterProvider | None = None,
    tracer_provider: TracerProvider | None = None,
    then: EventHook | None = None,
) -> OtelHook:
    """Make an :class:`OtelHook` and observe each group or cache in ``objects``.

    Pass the result as ``on_event=`` of the groups it should trace, and call its
    :meth:`~OtelHook.observe` for groups made afterwards.  The providers default
    to OpenTelemetry's global ones.  ``then`` gets every event afterwards.
    """
    hook = OtelHook(meter_provider=meter_provider, tracer_provider=tracer_provider, then=then)
    for obj in objects:
        hook.observe(obj)
    return hook
