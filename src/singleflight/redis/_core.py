"""What RedisGroup and AsyncRedisGroup share besides the protocol: options, keys, payloads.

Everything here is plain code: no sockets, threads or event loops.  The two
drivers hold one :class:`GroupCore` each and differ only in how they wait.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextvars import ContextVar
from time import monotonic as _monotonic
from typing import Any, Generic, TypeVar

from .._result import Result
from ._errors import LoaderError, RedisUnavailableError, WaitTimeoutError, is_transient
from ._protocol import (
    HIT,
    LOST,
    REASON_CIRCUIT_OPEN,
    REASON_TIMEOUT,
    RESURRECTED,
    Breaker,
    Completion,
    Counters,
    Held,
    Keys,
    Plan,
    RetryBudget,
    Settings,
    check_namespace,
)
from .codecs import Codec, CodecError, JsonCodec, PayloadTooLargeError

__all__ = [
    "RETRY",
    "FlightInfo",
    "GroupCore",
    "check_callable",
    "current_flight",
    "describe",
    "log",
    "note_waiters",
    "with_shared",
]

K = TypeVar("K")
V = TypeVar("V")

# What GroupCore.received returns when the payload did not decode and the plan
# has moved on: the driver goes round its loop again.
RETRY: Any = object()

log = logging.getLogger("singleflight.redis")

_MESSAGE_LIMIT = 2000


class FlightInfo:
    """The Redis flight the current loader leads; see :func:`current_flight`.

    ``epoch`` is the key's fencing epoch: it grows by one with every new
    leader of the key (for as long as the key's fence record lives, 10 minutes
    after its last flight), so a store downstream can refuse writes carrying
    an epoch older than one it has seen.  ``lost`` turns true once the
    watchdog learns that the lease is gone (another process took over, or the
    key was forgotten): the loader may stop early, since its value will not
    be stored (a completion after a takeover is fenced and reaches only this
    process's callers; after a forget, only the flight's own waiters).
    """

    __slots__ = ("_held", "key")

    def __init__(self, key: object, held: Held) -> None:
        self.key = key
        self._held = held

    @property
    def epoch(self) -> int:
        return self._held.epoch

    @property
    def lost(self) -> bool:
        return self._held.lost

    def __repr__(self) -> str:
        return f"<FlightInfo key={self.key!r} epoch={self.epoch} lost={self.lost}>"


_CURRENT: ContextVar[FlightInfo | None] = ContextVar("singleflight_redis_flight", default=None)


def current_flight() -> FlightInfo | None:
    """The Redis flight led by the loader calling this, or None.

    None outside a loader, and in a loader run locally without Redis (under
    ``on_redis_error="open"``).  Works from the loader's own thread or task.
    """
    return _CURRENT.get()


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
        f"got {kind.__name__} {key!r}. Pass key=<function returning a str> to map other keys "
        "to Redis keys"
    )


def _no_json(value: object) -> object:
    raise TypeError(type(value).__name__)


def describe(error: BaseException | None) -> str:
    """``Type: message`` (redis-py's exception reprs are terse)."""
    if error is None:
        return ""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


class GroupCore(Generic[K]):
    """A group's options and the pure parts of its work."""

    __slots__ = ("breaker", "codec", "counters", "namespace", "settings", "to_str")

    def __init__(
        self,
        *,
        namespace: str,
        codec: Codec | None,
        key: Callable[[K], str] | None,
        settings: Settings,
    ) -> None:
        self.namespace = check_namespace(namespace)
        if codec is None:
            codec = JsonCodec()
        elif not isinstance(codec, Codec):
            raise TypeError(
                f"codec must have encode(key, value) and decode(key, data) methods; got {codec!r}"
            )
        self.codec = codec
        if key is not None and not callable(key):
            raise TypeError(f"key must be a function returning a str; got {key!r}")
        self.to_str: Callable[[Any], str] = key if key is not None else _default_key
        self.settings = settings
        self.breaker = Breaker(settings.breaker_threshold, settings.breaker_cooldown)
        self.counters = Counters()

    # -- keys --

    def checked(self, key: K, fn: object) -> str:
        """The caller's key as a str, with ``fn`` checked callable: a call's checks."""
        text = self.redis_key(key)
        check_callable(fn)
        return text

    def redis_key(self, key: K) -> str:
        """The caller's key as a str, checked before anything runs."""
        text = self.to_str(key)
        if not isinstance(text, str):
            raise TypeError(
                f"the key function returned {type(text).__name__}, not str, for {key!r}"
            )
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

    def error_payload(self, keys: Keys, exc: BaseException) -> bytes:
        """An error record: type name and message, through the codec (so signed if it signs)."""
        message = str(exc)
        if len(message) > _MESSAGE_LIMIT:
            message = message[:_MESSAGE_LIMIT] + "..."
        record = [_type_name(exc), message]
        try:
            return self.codec.encode(_error_context(keys), record)
        except CodecError:  # a codec that cannot carry two strings: send the type alone
            return self.codec.encode(_error_context(keys), [record[0], ""])

    def remote_error(self, key: object, keys: Keys, payload: Any) -> LoaderError:
        """The LoaderError an error record stands for.  CodecError: treat it as a miss."""
        if not isinstance(payload, bytes):
            raise CodecError("error record is not bytes")
        record = self.codec.decode(_error_context(keys), payload)
        if (
            not isinstance(record, (list, tuple))
            or len(record) != 2
            or not all(isinstance(part, str) for part in record)
        ):
            raise CodecError("malformed error record")
        return LoaderError(key, record[0], record[1])

    def untrusted(self, keys: Keys, error: CodecError) -> None:
        self.counters.add("untrusted_payloads")
        log.warning("payload of %s read as a miss: %s", keys.base, error)

    # -- the drivers' steps that do no I/O (each driver awaits or blocks around them) --

    def redis_error(self, plan: Plan, error: BaseException) -> None:
        """ACQUIRE or READ failed: count it and let the plan choose its next op."""
        self.counters.add("redis_errors")
        plan.failed(error, is_transient(error), _monotonic())

    def received(self, key: object, plan: Plan, cell: list[bool] | None) -> Any:
        """HIT / REMOTE_ERROR: the value the plan's payload holds, or raise the
        :class:`LoaderError` it records; counted, and ``cell`` marked shared.

        RETRY when the payload does not decode: it is logged as untrusted and
        the plan has moved on (it asks again, as on a miss).
        """
        keys = plan.keys
        hit = plan.op == HIT
        try:
            outcome = (
                self.decode(keys, plan.payload)
                if hit
                else self.remote_error(key, keys, plan.payload)
            )
        except CodecError as error:
            self.untrusted(keys, error)
            plan.bad_payload(_monotonic())
            return RETRY
        self.counters.add("hits" if hit else "remote_errors")
        if cell is not None:
            cell[0] = True
        if hit:
            return outcome
        raise outcome

    def lead(self, plan: Plan) -> Held:
        """LEAD: count it (a takeover if the plan waited first); the lease to hold."""
        self.counters.add("leads")
        if plan.waited:
            self.counters.add("takeovers")
        return Held(plan.keys, plan.token, plan.epoch)

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

    def failure(self, key: object, plan: Plan) -> Exception:
        """The exception a FAIL plan raises (policy "closed")."""
        counters = self.counters
        if plan.reason == REASON_TIMEOUT:
            counters.add("timeouts")
            return WaitTimeoutError(
                f"waited max_wait={self.settings.max_wait}s for key {key!r} "
                "without a result from the process loading it"
            )
        counters.add("unavailable")
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

    def local_run(self, key: object, plan: Plan) -> None:
        """Account for a LOCAL plan (policy "open")."""
        self.counters.add("local_runs")
        if plan.reason == REASON_TIMEOUT:
            self.counters.add("timeouts")
        log.debug("running the loader of %r locally: %s %s", key, plan.reason, describe(plan.error))

    def redis_failed(self, what: str, keys: Keys, error: BaseException) -> None:
        log.warning("%s of %s failed: %s", what, keys.base, describe(error))

    def stats(self) -> dict[str, int | str]:
        stats: dict[str, int | str] = dict(self.counters.snapshot())
        stats["breaker_opens"] = self.breaker.opens
        stats["breaker"] = self.breaker.state
        return stats


def check_callable(fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable; got {type(fn).__name__} {fn!r}")


def note_waiters(cell: list[bool] | None, completion: Completion | None) -> None:
    """Mark ``cell`` shared when other processes waited for the completed flight."""
    if cell is not None and completion is not None and completion.waiters:
        cell[0] = True


def with_shared(result: Result[V], cell: list[bool]) -> Result[V]:
    """``result``, marked shared when the flight's value also went through Redis."""
    if cell[0] and not result.shared:
        return Result(result.value, result.error, True)
    return result


def _error_context(keys: Keys) -> bytes:
    # Distinct from any flight's base key (which ends with "}"), so a signed
    # value can never pass for an error record or the other way round.
    return (keys.base + ":error").encode()
