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

* An observable counter or gauge per row of :data:`singleflight.metrics.SERIES`
  (``singleflight.calls``, ``singleflight.cache.hits``, ``singleflight.redis.hits``,
  ...; ``singleflight.wait_time`` for the seconds joiners waited), read from
  ``stats()`` at each collection, with the attribute ``singleflight.group`` or
  ``singleflight.cache``, and the gauge ``singleflight.redis.breaker_state`` (1 for
  the breaker's state now, 0 for the others, with ``singleflight.redis.breaker``).
  Objects are held weakly.
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

from .. import events as ev
from .._options import missing
from ..errors import safe_repr
from . import BREAKER_HELP, BREAKER_STATES, LABEL, SERIES, Series, Watchlist, kinds

try:
    from opentelemetry import metrics, trace
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
    from opentelemetry.trace import Link, Span, Status, StatusCode, TracerProvider
except ImportError as exc:
    raise missing("metrics.otel", "otel", "opentelemetry-api") from exc

__all__ = ["OtelHook", "instrument"]

_SCOPE = "singleflight"
_KEY_CHARS = 256
_RENAMED = {"singleflight.wait_seconds": "singleflight.wait_time"}
_OUTCOMES = {ev.FlightFinished: "ok", ev.FlightFailed: "error", ev.FlightAborted: "aborted"}
Callback = Callable[[CallbackOptions], Iterable[Observation]]


def _name(series: Series) -> str:
    name = ".".join(("singleflight", *series.parts()))
    return _RENAMED.get(name, name)


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
        then: ev.EventHook | None = None,
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

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.FlightStarted | ev.Joined):
            attributes = {
                "singleflight.group": event.group,
                "singleflight.key": safe_repr(event.key, _KEY_CHARS),
            }
            if isinstance(event, ev.FlightStarted):
                span = self._tracer.start_span("singleflight.flight", attributes=attributes)
                with self._lock:
                    self._spans[event.group, event.flight] = span
            else:
                with self._lock:
                    leader = self._spans.get((event.group, event.flight))
                # The flight may have ended between the join and this event: no link then.
                links = [] if leader is None else [Link(leader.get_span_context())]
                self._tracer.start_span(
                    "singleflight.join", links=links, attributes=attributes
                ).end()
        elif isinstance(event, ev.FlightFinished | ev.FlightFailed | ev.FlightAborted):
            self._ended(event)
        if self._then is not None:
            ev.emit(self._then, event)

    def _ended(self, event: ev.FlightFinished | ev.FlightFailed | ev.FlightAborted) -> None:
        outcome = _OUTCOMES[type(event)]
        self._durations.record(
            event.duration, {"singleflight.group": event.group, "singleflight.outcome": outcome}
        )
        with self._lock:
            span = self._spans.pop((event.group, event.flight), None)
        if span is None:
            return  # started before this hook saw it
        span.set_attribute("singleflight.outcome", outcome)
        span.set_attribute("singleflight.callers", event.callers)
        if isinstance(event, ev.FlightFailed):
            span.record_exception(event.error)
            span.set_status(Status(StatusCode.ERROR, f"{type(event.error).__name__}"))
        elif isinstance(event, ev.FlightAborted):
            if event.cause is not None:
                span.record_exception(event.cause)
            span.set_status(Status(StatusCode.ERROR, "aborted"))
        span.end()


class _Observer(Watchlist):
    """The observable instruments of one meter provider and the objects they read.

    Shared by every :class:`OtelHook` of that provider, so that names are
    unique per provider whichever hook observed the object.
    """

    def __init__(self, meter: metrics.Meter) -> None:
        super().__init__()
        for series in SERIES:
            make = (
                meter.create_observable_counter if series.counter else meter.create_observable_gauge
            )
            make(
                _name(series),
                [self._callback(series.kind, series.field)],
                unit=series.unit,
                description=series.help,
            )
        meter.create_observable_gauge(
            "singleflight.redis.breaker_state",
            [self._callback("redis", "breaker", BREAKER_STATES)],
            unit="1",
            description=BREAKER_HELP,
        )

    def _callback(self, kind: str, field: str, states: tuple[str, ...] = ()) -> Callback:
        """Observations of ``field``; with ``states``, 1 or 0 for each state it may be in."""
        attribute = f"singleflight.{LABEL[kind]}"

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            found = [
                (name, getattr(stats, field)) for name, stats in self.read() if kind in kinds(stats)
            ]
            if not states:
                return [Observation(value, {attribute: name}) for name, value in found]
            return [
                Observation(
                    int(value == state), {attribute: name, "singleflight.redis.breaker": state}
                )
                for name, value in found
                for state in states
            ]

        return observe


_observers: weakref.WeakKeyDictionary[MeterProvider, _Observer] = weakref.WeakKeyDictionary()
_observers_lock = threading.Lock()


def instrument(
    *objects: Any,
    meter_provider: MeterProvider | None = None,
    tracer_provider: TracerProvider | None = None,
    then: ev.EventHook | None = None,
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
