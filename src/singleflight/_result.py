"""What a call of a group hands back: a value, an error, and whether it was shared."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, TypeVar

__all__ = [
    "AbortedError",
    "RemoteError",
    "Result",
    "TooManyFlights",
    "WaitTimeout",
    "type_name",
]

V_co = TypeVar("V_co", covariant=True)


@dataclass(frozen=True, slots=True)
class Result(Generic[V_co]):
    """The outcome of one call, as Go's ``singleflight.Result``.

    ``value`` is the loader's return value (``None`` when it failed), ``error`` the
    :class:`Exception` it raised (``None`` when it succeeded; an :class:`AbortedError`
    when the flight ended without a result), and ``shared`` is true when the flight
    had two or more callers, the leader included.
    """

    value: V_co | None
    error: Exception | None
    shared: bool
    # error's traceback when the Result was made: unwrap() raises with it, so
    # an error shared by many results does not gain frames each time.
    _tb: TracebackType | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.error is not None:
            object.__setattr__(self, "_tb", self.error.__traceback__)

    def unwrap(self) -> V_co:
        """Return ``value``, or raise ``error`` if the call failed."""
        if self.error is not None:
            raise self.error.with_traceback(self._tb)
        return self.value  # type: ignore[return-value]


class AbortedError(Exception):
    """The flight a caller waited on ended without a value or an :class:`Exception`.

    Raised in every *waiting* caller when the loader was stopped by a
    :class:`BaseException` that is not an :class:`Exception` (``KeyboardInterrupt``,
    ``SystemExit``, a cancelled loader task).  The original is ``__cause__`` when
    there is one.  The flight's entry is gone, so the next call of the key starts
    afresh.
    """

    def __init__(self, key: object, reason: str) -> None:
        super().__init__(f"the flight for key {key!r} ended without a result: {reason}")
        self.key = key


class TooManyFlights(Exception):
    """A call for a new key found ``max_flights`` flights open (``on_limit="raise"``).

    Joining a flight in progress is never refused; only starting one is.  Nothing
    ran and nothing was registered: the caller may retry, or shed the request.
    """

    def __init__(self, key: object, limit: int) -> None:
        super().__init__(
            f"cannot start a flight for key {key!r}: {limit} flights are already in progress "
            f"(max_flights={limit}); joins of those are still accepted"
        )
        self.key = key
        self.limit = limit


class WaitTimeout(TimeoutError):
    """This caller stopped waiting at its ``timeout``; the flight goes on for the others.

    A ``TimeoutError``, so ``except TimeoutError`` catches it; a flight that
    failed by ``loader_timeout`` raises a plain ``TimeoutError`` instead.
    """

    def __init__(self, key: object, timeout: float | None) -> None:
        super().__init__(
            f"gave up waiting for key {key!r} after timeout={timeout}s; "
            "its flight goes on for the other callers"
        )
        self.key = key


class RemoteError(Exception):
    """A loader raised in another process; what crossed over is its type's name and message.

    The base of the errors a group sharing flights across processes raises in
    the processes that waited (:class:`singleflight.redis.LoaderError`), so
    that code in front of any such group (a loading cache's ``negative=``,
    its ``get_many``) can recognise the original error by name without
    importing the group.  ``type_name`` is as :func:`type_name` makes it.
    """

    type_name: str


def type_name(cls: type) -> str:
    """The name a :class:`RemoteError` carries for an exception of class ``cls``:
    the bare qualified name for builtins (``"KeyError"``), else
    ``"module.QualName"`` (``"myapp.errors.NotFound"``)."""
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
