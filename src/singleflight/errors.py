"""Every exception the library raises for its own reasons, under one base.

``except SingleflightError`` catches them all; each also derives from the
builtin a caller would expect (``TimeoutError``, ``RuntimeError``,
``ConnectionError``, ``ValueError``), so code that knows nothing of this
library still handles them.  What a *loader* raises is never wrapped: callers
get the loader's own exception (or, in another process, a :class:`RemoteError`).

Every exception here survives ``pickle`` and ``copy`` with its attributes, so
it can cross to another process (multiprocessing, a logging ``QueueHandler``,
Celery).  Messages never fail to format: a key whose ``repr`` raises is shown
by its type.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AbortedError",
    "RemoteError",
    "ReentryError",
    "SingleflightError",
    "TooManyFlightsError",
    "WaitTimeoutError",
    "safe_repr",
    "type_name",
]


def safe_repr(value: object, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters; never raises.

    Keys are user objects (an ORM row with a closed session, say) whose
    ``repr`` may raise; a message about a key must not be what stops a flight
    from ending.
    """
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__} object (repr failed)>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


class SingleflightError(Exception):
    """Base of every exception this library raises for its own reasons."""

    # The arguments the instance was made with: pickle and copy make it again
    # from these (Exception's own reduce would pass only the message).
    _made_with: tuple[Any, ...] = ()

    def __reduce__(self) -> tuple[Any, ...]:
        state = {k: v for k, v in self.__dict__.items() if k != "_made_with"}
        return (type(self), self._made_with or self.args, state or None)


class AbortedError(SingleflightError):
    """The flight a caller waited on ended without a value or an :class:`Exception`.

    Raised in every *waiting* caller when the loader was stopped by a
    :class:`BaseException` that is not an :class:`Exception` (``KeyboardInterrupt``,
    ``SystemExit``, a cancelled loader task).  The original is ``__cause__`` when
    there is one.  The flight's entry is gone, so the next call of the key starts
    afresh.
    """

    def __init__(self, key: object, reason: str) -> None:
        super().__init__(f"the flight for key {safe_repr(key)} ended without a result: {reason}")
        self._made_with = (key, reason)
        self.key = key
        self.reason = reason


class TooManyFlightsError(SingleflightError):
    """A call for a new key found ``max_flights`` flights open (``on_limit="raise"``).

    Joining a flight in progress is never refused; only starting one is.  Nothing
    ran and nothing was registered: the caller may retry, or shed the request.
    """

    def __init__(self, key: object, limit: int) -> None:
        super().__init__(
            f"cannot start a flight for key {safe_repr(key)}: {limit} flights are already in "
            f"progress (max_flights={limit}); joins of those are still accepted"
        )
        self._made_with = (key, limit)
        self.key = key
        self.limit = limit


class WaitTimeoutError(SingleflightError, TimeoutError):
    """This caller's deadline passed; the flight goes on for the others.

    Raised wherever a caller stops waiting at its own deadline: a group's
    ``timeout=``, a Redis group's ``max_wait``.  ``option`` names the setting
    that set the deadline and ``seconds`` its value.  A ``TimeoutError``, so
    ``except TimeoutError`` catches it; a flight that failed by
    ``loader_timeout`` raises a plain ``TimeoutError`` in every caller instead.
    """

    def __init__(self, key: object, seconds: float | None, option: str = "timeout") -> None:
        super().__init__(
            f"gave up waiting for key {safe_repr(key)} after {option}={seconds}s; "
            "its flight goes on for the other callers"
        )
        self._made_with = (key, seconds, option)
        self.key = key
        self.seconds = seconds
        self.option = option


class ReentryError(SingleflightError, RuntimeError):
    """A loader called ``do`` on its own key from the thread or task that runs it, or
    on a key whose flight waits, through other loaders, on its own.

    It would wait for itself forever (Go deadlocks here), so the call fails at
    once instead.  ``key`` is the key called; ``cycle`` the keys of the flights
    that would wait on each other, from the caller's own flight back to it
    (``("a", "b", "a")``: the loader of ``"a"`` waits on ``"b"``, whose loader
    called ``do("a")``); ``(key, key)`` for a loader calling its own key.
    """

    def __init__(self, key: object, cycle: tuple[object, ...] = ()) -> None:
        cycle = tuple(cycle) or (key, key)
        if len(cycle) <= 2:
            message = (
                f"the loader of key {safe_repr(key)} called do() on its own key from the "
                "thread or task that runs it; it would wait for itself forever "
                "(Go deadlocks here)"
            )
        else:
            path = " -> ".join(safe_repr(k) for k in cycle)
            message = (
                f"the loader of key {safe_repr(cycle[0])} called do({safe_repr(key)}), whose "
                f"flight waits on its own: the loaders would wait for each other forever "
                f"({path})"
            )
        super().__init__(message)
        self._made_with = (key, cycle)
        self.key = key
        self.cycle = cycle


class RemoteError(SingleflightError):
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
