"""What RedisGroup and AsyncRedisGroup share besides the protocol: options, keys, payloads.

Everything here is plain code: no sockets, threads or event loops.  The two
drivers hold one :class:`GroupCore` each and differ only in how they wait.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import fields
from time import monotonic as _monotonic
from time import perf_counter
from typing import Any, Final, Generic

from .. import events as ev
from .._flight import check_fn
from .._options import check_name
from .._protocols import REMOTE_FLIGHT, K, SharedEntry, V
from .._result import Result
from ..errors import WaitTimeoutError, type_name
from ..events import emit
from ..stats import GroupStats, RedisGroupStats
from ._errors import LoaderError, RedisUnavailableError, is_transient
from ._protocol import (
    ERROR_ENTRY,
    HIT,
    LOST,
    REASON_CIRCUIT_OPEN,
    REASON_TIMEOUT,
    RESURRECTED,
    VALUE_ENTRY,
    Breaker,
    Completion,
    Counters,
    FleetEntry,
    Held,
    Keys,
    Plan,
    RetryBudget,
    Settings,
    check_namespace,
)
from .codecs import Codec, CodecError, JsonCodec, PayloadTooLargeError

# What GroupCore.received returns when the payload did not decode and the plan
# has moved on: the driver goes round its loop again.
RETRY: Any = object()

log = logging.getLogger("singleflight.redis")

_MESSAGE_LIMIT = 2000

# The counters RedisGroupStats adds to GroupStats's (hits, leads...).
_REDIS_COUNTS = {f.name for f in fields(RedisGroupStats)} - {f.name for f in fields(GroupStats)}

# The third field of an error record for a value the leader could not encode.
_CODEC = "codec"
_TOO_LARGE = "too large"


class FlightInfo:
    """The Redis flight the current loader leads; see :func:`current_flight`.

    ``epoch`` is the key's fencing epoch: every new leader of the key gets a
    larger one than the leaders before it, so a store downstream can refuse
    writes carrying an epoch older than one it has seen.  It is the previous
    epoch plus one, or the Redis server's clock in microseconds when that is
    larger, so it still grows after the key's fence record is lost (FLUSHALL,
    a restart without persistence, eviction), unless the server's clock went
    back meanwhile.

    ``lost`` turns true once the watchdog learns that the lease is gone
    (another process took over, or the key was forgotten): the loader may
    stop early, since its value will not be stored (a completion after a
    takeover is fenced and reaches only this process's callers; after a
    forget by another process the flight runs again here).

    ``when_settled(callback)`` calls ``callback(kept)`` once the flight's
    outcome is settled in Redis, before any caller gets it: ``kept`` is False
    when it was refused (fenced, the lease lost, the flight forgotten).  A
    LoadingCache in front uses it to keep only outcomes Redis took.
    """

    __slots__ = ("_held", "epoch", "key")

    def __init__(self, key: object, held: Held) -> None:
        self.key = key
        self.epoch: Final = held.epoch  # a lease's epoch never changes
        self._held = held

    @property
    def lost(self) -> bool:
        return self._held.lost

    def when_settled(self, callback: Callable[[bool], None]) -> None:
        self._held.when_settled(callback)

    def store_as(
        self, fresh_ms: int, stale_ms: int, error_ms: int, delta_ms: int, error: bool
    ) -> None:
        """A fleet cache's lifetimes for the outcome (``error``: a not-found error to
        store as such): the entry this flight stores in Redis.  Without it a
        fleet flight stores nothing."""
        self._held.stored = FleetEntry(
            max(0, fresh_ms),
            max(0, stale_ms),
            max(0, error_ms),
            max(0, delta_ms),
            ERROR_ENTRY if error else VALUE_ENTRY,
            counted_at=_monotonic(),
        )

    def __repr__(self) -> str:
        return f"<FlightInfo key={self.key!r} epoch={self.epoch} lost={self.lost}>"


# The generic variable a LoadingCache reads (it holds a FlightInfo here).
_CURRENT = REMOTE_FLIGHT


def current_flight() -> FlightInfo | None:
    """The Redis flight led by the loader calling this, or None.

    None outside a loader, and in a loader run locally without Redis (under
    ``on_redis_error="open"``).  Works from the loader's own thread or task.
    """
    flight = _CURRENT.get()
    return flight if isinstance(flight, FlightInfo) else None


class Caller:
    """One call of a Redis group, handed to its local flight's loader when it leads locally.

    ``fid`` is that local flight's id in events, learnt from the local
    group's ``FlightStarted`` (told in the leading caller's own context, see
    ``CALLER``); ``shared`` turns true once the flight's outcome also
    went through Redis (to or from another process), for ``Result.shared``.
    """

    __slots__ = ("fid", "shared")

    def __init__(self) -> None:
        self.fid = 0
        self.shared = False


# The call being made in this thread or task, set while it is inside the local
# group: the local FlightStarted is told in the leading caller's context.
CALLER: ContextVar[Caller | None] = ContextVar("singleflight_redis_caller", default=None)


@contextmanager
def calling() -> Iterator[Caller]:
    """A new call's :class:`Caller`, current in ``CALLER`` while the call is inside."""
    caller = Caller()
    token = CALLER.set(caller)
    try:
        yield caller
    finally:
        CALLER.reset(token)


class _Lead:
    """A flight this process leads in Redis, from its lead until its local flight ends."""

    __slots__ = ("held", "key", "started", "waiters")

    def __init__(self, key: object, held: Held) -> None:
        self.key = key
        self.held = held
        self.started = perf_counter()
        self.waiters = 0  # callers in other processes that got its outcome


class Watch:
    """The Redis part of one local flight (a driver's ``_fly``): its wait on
    other processes, and the events and counts of how it ends.

    ``begun`` is when the Redis work started (``max_wait`` runs from there),
    ``since`` when it began to wait on another process's flight, if it has.
    Only the thread or task running the flight touches it.
    """

    __slots__ = ("begun", "caller", "core", "joined", "key", "since")

    def __init__(self, core: GroupCore[Any], key: object, caller: Caller) -> None:
        self.core = core
        self.key = key
        self.caller = caller
        self.begun = perf_counter()
        self.since: float | None = None
        self.joined = False

    def waiting(self) -> None:
        """The flight waits for (or has found) another process's outcome: tell Joined, once."""
        if self.since is None:
            self.since = perf_counter()
        if not self.joined:
            self.joined = True
            core = self.core
            if core.hook is not None:
                emit(core.hook, ev.Joined(core.name, self.key, self.caller.fid))

    def read(self) -> None:
        """A blocking read of another process's completion is about to start."""
        self.core.counters.add("waits")
        self.waiting()

    def stop(self) -> None:
        """The wait is over, however it ended (outcome, lead, fallback, failure,
        interruption): add it to ``wait_seconds``.  Idempotent."""
        since = self.since
        if since is not None:
            self.since = None
            self.core.counters.add_wait(perf_counter() - since)


def _default_key(key: object) -> str:
    """str keys as they are, int keys in decimal, tuples of those (and of float,
    bool, None, tuples) as compact JSON arrays: ``("user", 42)`` -> ``["user",42]``."""
    kind = type(key)
    if kind is str:
        return key  # type: ignore[return-value]
    if kind is int:
        return str(key)
    if kind is tuple:
        try:
            return json.dumps(
                key, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_no_json
            )
        except (TypeError, ValueError):
            pass
    raise TypeError(
        f"Redis groups take str or int keys, or tuples of str, int, float, bool and None; "
        f"got {kind.__name__} {key!r}. Pass key_to_str=<function returning a str> to map "
        "other keys to Redis keys"
    )


def _no_json(value: object) -> object:
    raise TypeError(type(value).__name__)


def command(client: Any, *args: Any) -> Any:
    """``client.execute_command(*args)``: redis-py leaves it untyped; _protocol parses replies."""
    return client.execute_command(*args)


def describe(error: BaseException | None) -> str:
    """``Type: message`` (redis-py's exception reprs are terse)."""
    if error is None:
        return ""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class GroupCore(Generic[K]):
    """A group's options and the pure parts of its work."""

    __slots__ = (
        "_leads",
        "_leads_lock",
        "breaker",
        "codec",
        "counters",
        "hook",
        "name",
        "namespace",
        "settings",
        "to_str",
    )

    def __init__(
        self,
        *,
        namespace: str,
        codec: Codec | None,
        key_to_str: Callable[[K], str] | None,
        settings: Settings,
        name: str | None = None,
        on_event: ev.EventHook | None = None,
    ) -> None:
        self.namespace = check_namespace(namespace)
        if name is None:
            name = self.namespace
        check_name(name)
        self.name = name
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be a callable taking one event; got {on_event!r}")
        self.hook = on_event
        # The flights led here, by their local flight's id, until that flight ends.
        self._leads: dict[int, _Lead] = {}
        self._leads_lock = threading.Lock()
        if codec is None:
            codec = JsonCodec()
        elif not isinstance(codec, Codec):
            raise TypeError(
                f"codec must have encode(key, value) and decode(key, data) methods; got {codec!r}"
            )
        self.codec = codec
        if key_to_str is not None and not callable(key_to_str):
            raise TypeError(f"key_to_str must be a function returning a str; got {key_to_str!r}")
        self.to_str: Callable[[Any], str] = key_to_str if key_to_str is not None else _default_key
        self.settings = settings
        self.breaker = Breaker(settings.breaker_threshold, settings.breaker_cooldown)
        self.counters = Counters()

    # -- keys --

    def checked(self, key: K, fn: object) -> str:
        """The caller's key as a str, with ``fn`` checked callable: a call's checks."""
        text = self.redis_key(key)
        check_fn(fn)
        return text

    def redis_key(self, key: K) -> str:
        """The caller's key as a str, checked before anything runs."""
        text = self.to_str(key)
        if not isinstance(text, str):
            raise TypeError(
                f"the key function returned {type(text).__name__}, not str, for {key!r}"
            )
        if not text.isascii():
            try:
                text.encode()
            except UnicodeEncodeError:
                raise ValueError(
                    f"key {key!r} is not valid Unicode (it holds a lone surrogate) and "
                    "cannot be a Redis key; pass key_to_str=<function returning a valid str>"
                ) from None
        return text

    def keys(self, text: str) -> Keys:
        return Keys(self.namespace, text)

    # -- payloads --

    def encode(self, keys: Keys, value: Any) -> bytes:
        """The value's payload.  CodecError when it cannot be encoded or is too large."""
        payload = self.codec.encode(keys.base.encode(), value)
        if len(payload) > self.settings.max_payload:
            raise PayloadTooLargeError(
                f"the value of {keys.base} encodes to {len(payload)} bytes, more than "
                f"max_payload={self.settings.max_payload}; raise max_payload or return less"
            )
        return payload

    def decode(self, keys: Keys, payload: Any) -> Any:
        """The value of a payload read from Redis.  CodecError: treat it as a miss."""
        if not isinstance(payload, bytes):
            raise CodecError(f"payload of {keys.base} is {type(payload).__name__}, not bytes")
        if len(payload) > self.settings.max_payload:
            raise CodecError(f"payload of {keys.base} is larger than max_payload")
        return self.codec.decode(keys.base.encode(), payload)

    def error_payload(self, keys: Keys, exc: BaseException, *, encoding: bool = False) -> bytes:
        """An error record: type name and message, through the codec (so signed if it signs).

        ``encoding``: ``exc`` is the CodecError of encoding the loader's value; the
        record then says so (a third field, ``"codec"`` or ``"too large"``), and
        other processes raise the same error type as the leader's (see
        :meth:`remote_error`), not a LoaderError."""
        message = str(exc)
        if len(message) > _MESSAGE_LIMIT:
            message = message[:_MESSAGE_LIMIT] + "..."
        record = [type_name(type(exc)), message]
        if encoding:
            record.append(_TOO_LARGE if isinstance(exc, PayloadTooLargeError) else _CODEC)
        try:
            return self.codec.encode(_error_context(keys), record)
        except CodecError:  # a codec that cannot carry two strings: send the type alone
            return self.codec.encode(_error_context(keys), [record[0], "", *record[2:]])

    def remote_error(self, key: object, keys: Keys, payload: Any) -> Exception:
        """The exception an error record stands for: :class:`LoaderError` for the
        loader's, the :class:`CodecError` / :class:`PayloadTooLargeError` of a value
        the leader could not encode.  CodecError: the record is untrusted (a miss)."""
        if not isinstance(payload, bytes):
            raise CodecError("error record is not bytes")
        record = self.codec.decode(_error_context(keys), payload)
        if (
            not isinstance(record, (list, tuple))
            or len(record) not in (2, 3)
            or not all(isinstance(part, str) for part in record)
            or (len(record) == 3 and record[2] not in (_CODEC, _TOO_LARGE))
        ):
            raise CodecError("malformed error record")
        if len(record) == 3:
            error_type = PayloadTooLargeError if record[2] == _TOO_LARGE else CodecError
            return error_type(record[1])
        return LoaderError(key, record[0], record[1])

    def untrusted(self, keys: Keys, error: CodecError, *, loud: bool = True) -> None:
        """Count an untrusted payload; log it as a WARNING when ``loud`` (the first of
        its flight), else at DEBUG."""
        self.counters.add("untrusted_payloads")
        level = logging.WARNING if loud else logging.DEBUG
        log.log(level, "payload of %s read as a miss: %s", keys.base, error)

    # -- the drivers' steps that do no I/O (each driver awaits or blocks around them) --

    def redis_error(self, plan: Plan, error: BaseException) -> None:
        """ACQUIRE or READ failed: count it and let the plan choose its next op."""
        self.counters.add("redis_errors")
        plan.failed(error, is_transient(error), _monotonic())

    def received(self, key: object, plan: Plan, watch: Watch) -> Any:
        """HIT / REMOTE_ERROR: the value the plan's payload holds, or raise the
        error it records (see :meth:`remote_error`); counted (a join), and the caller marked shared.

        RETRY when the payload does not decode: it is logged as untrusted and
        the plan has moved on (it asks again, as on a miss).
        """
        watch.waiting()
        keys = plan.keys
        hit = plan.op == HIT
        try:
            if plan.bad_status is not None:
                raise CodecError(f"completion record of unknown status {plan.bad_status!r}")
            outcome = (
                self.decode(keys, plan.payload)
                if hit
                else self.remote_error(key, keys, plan.payload)
            )
        except CodecError as error:
            plan.bad_payload(_monotonic())
            self.untrusted(keys, error, loud=plan.first_bad)
            return RETRY
        watch.stop()
        self.counters.add("hits" if hit else "remote_errors")
        watch.caller.shared = True
        if hit:
            return outcome
        raise outcome

    def fetched(self, key: object, plan: Plan, watch: Watch) -> Any:
        """HIT of a fleet flight: the :class:`SharedEntry` its stored entry holds
        (counted as :meth:`received` counts a hit); RETRY when it does not decode."""
        watch.waiting()
        keys = plan.keys
        entry = (
            FleetEntry.parse(plan.payload, plan.pttl) if isinstance(plan.payload, bytes) else None
        )
        try:
            if entry is None:
                raise CodecError(f"entry of {keys.base} is malformed")
            value: Any = None
            error: BaseException | None = None
            if entry.kind == VALUE_ENTRY:
                value = self.decode(keys, entry.payload)
            else:
                error = self.remote_error(key, keys, entry.payload)
        except CodecError as exc:
            self.untrusted(keys, exc)
            plan.bad_payload(_monotonic())
            return RETRY
        watch.stop()
        self.counters.add("hits")
        watch.caller.shared = True
        return SharedEntry(
            value,
            error,
            entry.fresh_ms / 1000,
            entry.stale_ms / 1000,
            entry.error_ms / 1000,
            entry.delta_ms / 1000,
            plan.sent,
        )

    def stored_entry(
        self, plan: Plan, held: Held, value: Any, error: BaseException | None
    ) -> bytes | None:
        """A fleet leader's outcome as the entry to store (setting the plan's PX), or
        None when it stores none (not a fleet flight, or no lifetimes given for it).
        CodecError when the value cannot be encoded."""
        entry = held.stored
        if (
            plan.fleet is None
            or entry is None
            or (error is not None) != (entry.kind == ERROR_ENTRY)
        ):
            return None
        keys = plan.keys
        payload = self.encode(keys, value) if error is None else self.error_payload(keys, error)
        plan.result_ms = entry.px(_monotonic())
        return entry.header() + payload

    def lead(self, plan: Plan, watch: Watch) -> Held:
        """LEAD: count it (a takeover if the plan waited first), tell FlightStarted;
        the lease to hold.  The flight's end is told when its local flight ends
        (:meth:`local_event`), when the callers of this process are all known."""
        watch.stop()
        self.counters.add("leads")
        if plan.waited:
            self.counters.add("takeovers")
        fid = watch.caller.fid
        held = Held(plan.keys, plan.token, plan.epoch, plan.leased_until)
        with self._leads_lock:
            self._leads[fid] = _Lead(watch.key, held)
        if self.hook is not None:
            emit(self.hook, ev.FlightStarted(self.name, watch.key, fid))
        return held

    def forgetting(self, text: str) -> None:
        """This process forgets the key: the flights it leads of it are detached by
        their own process (their callers all came before), so they need not run again."""
        base = self.keys(text).base
        with self._leads_lock:
            for lead in self._leads.values():
                if lead.held.keys.base == base:
                    lead.held.forgotten_here = True

    def forget_args(self, only_unshared: bool) -> list[str | int]:
        return ["1" if only_unshared else "0", self.settings.done_ttl_ms]

    def settled(self, held: Held, completion: Completion | None) -> bool:
        """A led flight's completion is known: settle its outcome (kept when Redis took
        it; without a reply, unless the lease was lost).  False when another process
        forgot the key while it ran: callers that came after that forget may have
        joined it here, so it must run again rather than answer them."""
        if completion is None:
            kept = not held.lost
        else:
            kept = completion.code in (Completion.COMPLETED, Completion.ALREADY)
        try:
            held.settle(kept)
        except Exception:  # a callback's bug must not lose the callers' outcome
            log.exception("a settle callback of %s failed", held.keys.base)
        if completion is not None and completion.code == Completion.DETACHED:
            return held.forgotten_here
        return True

    def note_waiters(self, watch: Watch, completion: Completion | None) -> None:
        """A led flight completed: other processes' waiters got its outcome (if any)."""
        if completion is None or not completion.waiters:
            return
        watch.caller.shared = True
        with self._leads_lock:
            lead = self._leads.get(watch.caller.fid)
            if lead is not None:
                lead.waiters += completion.waiters

    def local_event(self, event: ev.Event) -> None:
        """The local group's ``on_event``: what its flights and joins mean for this group.

        ``FlightStarted`` names the local flight the current caller leads
        (told in that caller's context, before the flight's loader runs);
        ``Joined`` is a local join, told as it is; the end of a local flight
        that led in Redis ends that flight: counted, and told with its
        duration since the lead and its callers here and elsewhere.
        """
        if isinstance(event, ev.FlightStarted):
            caller = CALLER.get()
            if caller is not None:
                caller.fid = event.flight
        elif isinstance(event, ev.Joined | ev.Rejected | ev.TimedOut):
            if self.hook is not None:
                emit(self.hook, event)
        elif isinstance(event, ev.FlightFinished | ev.FlightFailed | ev.FlightAborted):
            with self._leads_lock:
                lead = self._leads.pop(event.flight, None)
            if lead is not None:
                self._ended(event, lead)

    def _ended(
        self, event: ev.FlightFinished | ev.FlightFailed | ev.FlightAborted, lead: _Lead
    ) -> None:
        counters = self.counters
        callers = event.callers + lead.waiters
        if callers > 1:
            counters.add("shared")
        if isinstance(event, ev.FlightFailed):
            counters.add("errors")
        elif isinstance(event, ev.FlightAborted):
            counters.add("aborted")
        hook = self.hook
        if hook is None:
            return
        duration = perf_counter() - lead.started
        name, key, fid = self.name, lead.key, event.flight
        if isinstance(event, ev.FlightFinished):
            emit(hook, ev.FlightFinished(name, key, fid, duration, callers))
        elif isinstance(event, ev.FlightFailed):
            emit(hook, ev.FlightFailed(name, key, fid, duration, callers, event.error))
        else:
            emit(hook, ev.FlightAborted(name, key, fid, duration, callers, event.cause))

    def completed(self, plan: Plan, reply: Any) -> Completion:
        """COMPLETE's reply; a fenced completion is counted and logged."""
        completion = Completion(reply)
        if completion.fenced:
            self.counters.add("fenced")
            log.info("completion of %s (epoch %d) fenced", plan.keys.base, plan.epoch)
        return completion

    def retry_delay(
        self, budget: RetryBudget, what: str, keys: Keys, error: BaseException, deadline: float
    ) -> float | None:
        """A budgeted Redis operation failed: how long to wait before trying again,
        or None to give up (the breaker has then counted it, and it is logged)."""
        self.counters.add("redis_errors")
        now = _monotonic()
        delay = None
        if is_transient(error) and not self.breaker.is_open():
            delay = budget.delay(now, deadline)
        if delay is None:
            self.breaker.failure(now)
            self.redis_failed(what, keys, error)
        return delay

    def renewed(self, held: Held, code: int | None) -> None:
        """Count a lease renewal's news: the lease lost, or resurrected."""
        if code == LOST:
            self.counters.add("lost_leases")
            log.info("lost the lease of %s (epoch %d)", held.keys.base, held.epoch)
        elif code == RESURRECTED:
            self.counters.add("resurrections")

    def forget_skipped(self, key: object, *, closed: bool) -> bool:
        """Whether a forget must leave Redis alone (the breaker is open).
        ``closed``: raise :class:`RedisUnavailableError` instead."""
        if self.breaker.allow(_monotonic()):
            return False
        if closed:
            raise RedisUnavailableError(
                f"cannot forget key {key!r} in Redis: the circuit breaker is open"
            )
        return True

    def forget_failed(self, key: object, error: BaseException, *, closed: bool) -> None:
        """A forget's Redis call failed past the budget.  ``closed``: raise
        :class:`RedisUnavailableError` (else the failure has been logged)."""
        if closed:
            raise RedisUnavailableError(
                f"cannot forget key {key!r} in Redis: {describe(error)}"
            ) from error

    # -- outcomes --

    def failure(self, key: object, plan: Plan, watch: Watch) -> Exception:
        """The exception a FAIL plan raises (policy "closed"); counted and told."""
        counters = self.counters
        watch.stop()
        if plan.reason == REASON_TIMEOUT:
            counters.add("timeouts")
            self._timed_out(key, watch)
            return WaitTimeoutError(key, self.settings.max_wait, "max_wait")
        counters.add("unavailable")
        if self.hook is not None:
            emit(self.hook, ev.RedisUnavailable(self.name, key, plan.reason, plan.error))
        if plan.reason == REASON_CIRCUIT_OPEN:
            return RedisUnavailableError(
                f"Redis is unavailable for key {key!r}: the circuit breaker is open after "
                "repeated Redis errors (it lets a probe through every "
                f"{self.settings.breaker_cooldown}s)"
            )
        error = RedisUnavailableError(
            f"Redis is unavailable for key {key!r}: {describe(plan.error)}"
        )
        error.__cause__ = plan.error
        return error

    def local_run(self, key: object, plan: Plan, watch: Watch) -> None:
        """Account for a LOCAL plan (policy "open"): counted and told."""
        watch.stop()
        self.counters.add("local_runs")
        if plan.reason == REASON_TIMEOUT:
            self.counters.add("timeouts")
            self._timed_out(key, watch)
        if self.hook is not None:
            emit(self.hook, ev.RanLocally(self.name, key, plan.reason, plan.error))
        log.debug("running the loader of %r locally: %s %s", key, plan.reason, describe(plan.error))

    def redis_failed(self, what: str, keys: Keys, error: BaseException) -> None:
        log.warning("%s of %s failed: %s", what, keys.base, describe(error))

    def _timed_out(self, key: object, watch: Watch) -> None:
        if self.hook is not None:
            emit(self.hook, ev.TimedOut(self.name, key, perf_counter() - watch.begun))

    def stats(self, local: GroupStats) -> RedisGroupStats:
        """This group's counters, given its local group's (see RedisGroupStats)."""
        c, waited = self.counters.snapshot()
        return RedisGroupStats(
            calls=local.calls,
            flights=c["leads"],
            joins=local.joins + c["hits"] + c["remote_errors"],
            shared=c["shared"],
            errors=c["errors"],
            aborted=c["aborted"],
            timeouts=c["timeouts"] + local.timeouts,
            rejected=local.rejected,
            in_flight=local.in_flight,
            wait_seconds=local.wait_seconds + waited,
            **{name: count for name, count in c.items() if name in _REDIS_COUNTS},
            breaker_opens=self.breaker.opens,
            breaker=self.breaker.state,
        )


def with_shared(result: Result[V], caller: Caller) -> Result[V]:
    """``result``, marked shared when the flight's value also went through Redis."""
    if caller.shared and not result.shared:
        return Result(result.value, result.error, True)
    return result


def _error_context(keys: Keys) -> bytes:
    # Distinct from any flight's base key (which ends with "}"), so a signed
    # value can never pass for an error record or the other way round.
    return (keys.base + ":error").encode()
