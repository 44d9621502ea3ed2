"""What a call of a group hands back: a value, an error, and whether it was shared."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, TypeVar

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
