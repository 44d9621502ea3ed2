"""What a loading cache decides, free of threads, event loops and locks.

An :class:`Entry` is one loaded outcome and the times that govern it; a
:class:`Policy` holds the options and turns a load's outcome into an entry
(jitter, windows, negative results) and an entry plus "now" into what a read
should do (XFetch included).  Time is whatever the cache's clock says and
randomness comes from an injected source, so every decision here is exact in
tests.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, cast

from ..errors import RemoteError, type_name

# What a read of an entry should do.
FRESH: Final = 0  # serve it
EARLY: Final = 1  # serve it and refresh it in the background (XFetch chose this read)
STALE: Final = 2  # serve it and refresh it in the background (stale-while-revalidate)
MISS: Final = 3  # load; the caller waits

# XFetch draws -ln(u) with u uniform in (0, 1].  u = 1 - random.random() is at
# least 2**-53, so a draw never exceeds this; an entry read earlier than
# MAX_DRAW * delta * beta before its expiry can never be chosen, which is what
# lets the hit path skip the draw with one comparison.
MAX_DRAW: Final = 53 * math.log(2.0)

_INF: Final = math.inf


class Entry:
    """One loaded outcome: a value, or an exception cached as a negative result.

    The times are on the cache's clock.  ``fresh_until`` is the hit path's single
    comparison: before it a read is a plain hit (for an exception entry it is
    ``-inf``, so every read takes the path that raises).  ``expires_at`` ends
    the entry's lifetime, ``stale_until`` the window in which it is served while
    a refresh runs, ``error_until`` the window in which it stands in for a failed
    load, ``keep_until`` the latest of those (after it the entry is dead).
    ``delta`` is how long the load took (XFetch's delta).  ``hits`` counts reads
    served from it and ``mark`` is ``hits`` when the evictor last looked (a
    second chance for entries read since).  ``refreshing`` is set while a
    background refresh of it is in flight.

    ``hits`` is a float holding a whole number (exact up to 2**53): ``hits += 1.0``
    takes its new object from CPython's float free list, while an int past 256 is
    a new allocation on every hit; that made the counter a third of a hit's cost.
    """

    __slots__ = (
        "context",
        "delta",
        "error",
        "error_until",
        "expires_at",
        "fresh_until",
        "hits",
        "keep_until",
        "mark",
        "negative",
        "notes",
        "refreshing",
        "stale_until",
        "tb",
        "value",
    )

    value: Any
    error: BaseException | None
    tb: TracebackType | None
    context: BaseException | None
    notes: list[str] | None
    negative: bool
    fresh_until: float
    expires_at: float
    stale_until: float
    error_until: float
    keep_until: float
    delta: float
    hits: float
    mark: float
    refreshing: bool

    def __init__(
        self,
        value: Any,
        error: BaseException | None,
        negative: bool,
        fresh_until: float,
        expires_at: float,
        stale_until: float,
        error_until: float,
        delta: float,
    ) -> None:
        self.value = value
        self.error = error
        if error is None:
            self.tb = self.context = self.notes = None
        else:
            # As the loader left it: a reader raising it (or adding a note to
            # it) must not change what the next reader sees.
            self.tb = error.__traceback__
            self.context = error.__context__
            notes = getattr(error, "__notes__", None)
            self.notes = list(notes) if isinstance(notes, list) else None
        self.negative = negative
        self.fresh_until = fresh_until
        self.expires_at = expires_at
        self.stale_until = stale_until
        self.error_until = error_until
        self.keep_until = max(stale_until, error_until)
        self.delta = delta
        self.hits = 0.0
        self.mark = 0.0
        self.refreshing = False

    def outcome(self) -> Any:
        """The entry's value, or raise its cached exception with the loader's traceback.

        Each read raises a copy of the cached exception: raising sets the
        exception's ``__context__`` to whatever the reader was handling, which
        must not reach the other readers of the entry.  An exception that cannot
        be copied is raised itself.
        """
        error = self.error
        if error is None:
            return self.value
        raise _copy_of(error, self.context, self.notes).with_traceback(self.tb)

    def __repr__(self) -> str:
        what = f"error={self.error!r}" if self.error is not None else f"value={self.value!r}"
        return f"<Entry {what} expires_at={self.expires_at:.6g} negative={self.negative}>"


def _copy_of(
    error: BaseException, context: BaseException | None, notes: list[str] | None
) -> BaseException:
    """A copy of ``error`` with its cause, ``context`` as its context and ``notes`` as
    its notes; or ``error`` itself if it cannot be copied as an exception of its own type."""
    try:
        copied = copy.copy(error)
    except Exception:
        return error
    if type(copied) is not type(error) or copied is error:
        return error
    copied.__cause__ = error.__cause__
    copied.__context__ = context
    copied.__suppress_context__ = error.__suppress_context__
    if notes is not None:
        copied.__notes__ = list(notes)  # not the list every copy would share
    elif "__notes__" in getattr(copied, "__dict__", ()):
        del copied.__notes__  # added by a reader after the loader raised
    return copied


def _seconds(name: str, value: object, *, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds; got {type(value).__name__} {value!r}")
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound} seconds; got {value!r}")
    return float(value)


class Policy:
    """The options of a loading cache and the decisions that follow from them.

    Raises ``TypeError``/``ValueError`` naming the option for anything it cannot
    use, so a bad option fails where the cache is made rather than at a read.
    The options' defaults are those of the cache's signature.
    """

    __slots__ = (
        "beta",
        "cache_if",
        "is_negative",
        "jitter",
        "negative_errors",
        "negative_ttl",
        "negative_ttl_of",
        "random",
        "stale",
        "stale_if_error",
        "ttl",
        "ttl_of",
    )

    def __init__(
        self,
        *,
        ttl: float | Callable[[Any], float | None] | None,
        jitter: float,
        stale: float,
        stale_if_error: float,
        early_refresh: float | None,
        negative: Callable[[Any], bool]
        | type[BaseException]
        | tuple[type[BaseException], ...]
        | None,
        negative_ttl: float | Callable[[Any], float] | None,
        cache_if: Callable[[Any], bool] | None,
        random: Callable[[], float],
    ) -> None:
        # ttl= and negative_ttl= may be functions of the outcome (per-entry lifetimes).
        self.ttl_of: Callable[[Any], float | None] | None = None
        if callable(ttl):
            self.ttl_of = ttl
            self.ttl: float | None = _INF
        else:
            self.ttl = None if ttl is None else _seconds("ttl", ttl, allow_zero=False)
        if cache_if is not None and not callable(cache_if):
            raise TypeError(
                f"cache_if must be a predicate on loaded values; got {type(cache_if).__name__} "
                f"{cache_if!r}"
            )
        self.cache_if: Callable[[Any], bool] | None = cache_if
        jitter = _seconds("jitter", jitter)
        if jitter >= 1:
            raise ValueError(
                "jitter is a fraction of the lifetime in [0, 1), e.g. 0.1 for +-10%; "
                f"got {jitter!r}"
            )
        self.jitter = jitter
        self.stale = _seconds("stale", stale)
        self.stale_if_error = _seconds("stale_if_error", stale_if_error)
        beta = 0.0 if early_refresh is None else _seconds("early_refresh", early_refresh)
        self.beta = beta
        if self.ttl is None:
            for name, given in (
                ("stale", self.stale),
                ("stale_if_error", self.stale_if_error),
                ("early_refresh", beta),
            ):
                if given:
                    raise ValueError(
                        f"{name}= only applies to entries that expire: give ttl= as well"
                    )
        self.negative_ttl_of: Callable[[Any], float] | None = None
        if callable(negative_ttl):
            self.negative_ttl_of = negative_ttl
            self.negative_ttl: float | None = _INF
        else:
            self.negative_ttl = (
                None
                if negative_ttl is None
                else _seconds("negative_ttl", negative_ttl, allow_zero=False)
            )
        self.is_negative: Callable[[Any], bool] | None = None
        self.negative_errors: tuple[type[BaseException], ...] = ()
        if negative is not None:
            if self.negative_ttl is None:
                raise ValueError(
                    "negative= says what to cache as not-found; give negative_ttl= too"
                )
            if isinstance(negative, type) and issubclass(negative, BaseException):
                self.negative_errors = (negative,)
            elif isinstance(negative, tuple):
                if not negative or not all(
                    isinstance(t, type) and issubclass(t, BaseException) for t in negative
                ):
                    raise TypeError(
                        f"negative= as a tuple must hold exception types; got {negative!r}"
                    )
                self.negative_errors = negative
            elif callable(negative):
                self.is_negative = cast(Callable[[Any], bool], negative)
            else:
                raise TypeError(
                    "negative= must be a predicate on loaded values or exception type(s); "
                    f"got {type(negative).__name__} {negative!r}"
                )
        if not callable(random):
            raise TypeError(f"random must be callable; got {type(random).__name__} {random!r}")
        self.random = random

    # -- turning a load's outcome into an entry ----------------------------------------

    def lifetime(self, base: float) -> float:
        """``base`` spread uniformly over +-jitter, so a batch loaded at once expires apart."""
        jitter = self.jitter
        if not jitter:
            return base
        return base * (1.0 + jitter * (2.0 * self.random() - 1.0))

    def value_entry(self, value: Any, now: float, delta: float) -> Entry | None:
        """The entry for a loaded value (a negative one when the predicate says so), or
        None when it is not to be stored (``cache_if`` said no, or ``ttl(value)``
        returned 0).

        ``delta`` is how long the load took; a clock that stepped back during it
        makes it negative, which counts as zero: an entry is never fresher than
        its lifetime.

        Raises:
          - ``TypeError``/``ValueError`` if ``ttl(value)`` returns no number of seconds.
        """
        if delta < 0.0:
            delta = 0.0
        is_negative = self.is_negative
        if is_negative is not None and is_negative(value):
            return self._negative_entry(value, None, now, delta)
        cache_if = self.cache_if
        if cache_if is not None and not cache_if(value):
            return None
        ttl = self.ttl
        if self.ttl_of is not None:
            ttl = self.ttl_of(value)
            if ttl is not None:
                ttl = _seconds("the lifetime ttl(value) returned", ttl)
                if not ttl:
                    return None
        if ttl is None:
            return Entry(value, None, False, _INF, _INF, _INF, _INF, delta)
        return self._valued(value, now + self.lifetime(ttl), self.stale, self.stale_if_error, delta)

    def shared_entry(
        self,
        value: Any,
        error: BaseException | None,
        expires_at: float,
        stale: float,
        stale_if_error: float,
        delta: float,
    ) -> Entry | None:
        """The entry for an outcome read from a store shared by several processes,
        which says when it expires and its windows: it lives no longer than there.
        None for an error that is not a not-found result here."""
        if delta < 0.0:
            delta = 0.0
        if error is not None:
            if not self.negative_errors or not (
                isinstance(error, self.negative_errors)
                or (isinstance(error, RemoteError) and named_as(error, self.negative_errors))
            ):
                return None
            return Entry(None, error, True, -_INF, expires_at, expires_at, expires_at, delta)
        is_negative = self.is_negative
        if is_negative is not None and is_negative(value):
            return Entry(value, None, True, expires_at, expires_at, expires_at, expires_at, delta)
        return self._valued(value, expires_at, stale, stale_if_error, delta)

    def _valued(
        self, value: Any, expires_at: float, stale: float, stale_if_error: float, delta: float
    ) -> Entry:
        """A value's entry: fresh until XFetch may refresh it early, then its windows."""
        fresh_until = expires_at - MAX_DRAW * delta * self.beta if self.beta else expires_at
        return Entry(
            value,
            None,
            False,
            fresh_until,
            expires_at,
            expires_at + stale,
            expires_at + stale_if_error,
            delta,
        )

    def error_entry(self, error: BaseException, now: float, delta: float) -> Entry | None:
        """The entry caching ``error`` as a not-found result, or None if it is not one.

        A :class:`~singleflight.RemoteError` (the loader raised in another
        process) is one when its type name is that of a ``negative=`` type or
        of a subclass of one (see :func:`named_as`).
        """
        negative_errors = self.negative_errors
        if delta < 0.0:
            delta = 0.0
        if negative_errors and (
            isinstance(error, negative_errors)
            or (isinstance(error, RemoteError) and named_as(error, negative_errors))
        ):
            return self._negative_entry(None, error, now, delta)
        return None

    def missing_entry(self, key: object, now: float) -> Entry | None:
        """The entry for a key a batch load left out, when negative caching is on."""
        if self.negative_ttl is None:
            return None
        return self._negative_entry(None, KeyError(key), now, 0.0)

    def _negative_entry(
        self, value: Any, error: BaseException | None, now: float, delta: float
    ) -> Entry | None:
        # A not-found answer has no stale or error window and is never refreshed
        # early: when it expires the key is simply loaded again.
        ttl = self.negative_ttl
        assert ttl is not None
        if self.negative_ttl_of is not None:
            ttl = _seconds(
                "the lifetime negative_ttl() returned",
                self.negative_ttl_of(value if error is None else error),
            )
            if not ttl:
                return None
        expires_at = now + self.lifetime(ttl)
        fresh_until = -_INF if error is not None else expires_at
        return Entry(value, error, True, fresh_until, expires_at, expires_at, expires_at, delta)

    # -- deciding what a read does -------------------------------------------------

    def state(self, entry: Entry, now: float, background: bool) -> int:
        """What a read of ``entry`` at ``now`` should do.

        ``background`` is false once the cache is closed: then nothing is
        refreshed behind the caller's back, an entry past its lifetime is loaded
        by the caller and XFetch draws are skipped.
        """
        if now < entry.fresh_until:
            return FRESH
        if now < entry.expires_at:
            if background and not entry.refreshing and self.xfetch(entry, now):
                return EARLY
            return FRESH
        if background and now < entry.stale_until:
            return STALE
        return MISS

    def xfetch(self, entry: Entry, now: float) -> bool:
        """XFetch: refresh early when ``now - delta * beta * ln(u) >= expiry``, u in (0, 1]."""
        if entry.negative or not self.beta:
            return False
        u = 1.0 - self.random()
        # Capped at MAX_DRAW, which random.random() never exceeds: an injected
        # source returning 1.0 (or something tinier than 2**-53 from 1) cannot
        # reach past the window the hit path checks.
        draw = -math.log(u) if u > 0.0 else MAX_DRAW
        return now + entry.delta * self.beta * min(draw, MAX_DRAW) >= entry.expires_at

    @staticmethod
    def can_stand_in(entry: Entry | None, now: float) -> bool:
        """Whether ``entry`` may be served in place of a failed load (stale-if-error)."""
        return (
            entry is not None
            and entry.error is None
            and not entry.negative
            and now < entry.error_until
        )

    @staticmethod
    def usable(entry: Entry, now: float) -> bool:
        """Whether a read could be answered from ``entry`` without loading (fresh or early)."""
        return now < entry.expires_at

    @staticmethod
    def dead(entry: Entry, now: float) -> bool:
        """Whether nothing can use ``entry`` any more."""
        return now >= entry.keep_until


def named_as(error: RemoteError, types: tuple[type[BaseException], ...]) -> bool:
    """Whether ``error`` stands for an exception of one of ``types``, by name.

    True when its ``type_name`` is the name (:func:`~singleflight.errors.type_name`)
    of one of ``types`` or of a subclass of one defined in this process (the
    remote class itself is never imported): ``isinstance`` by name, as far as
    this process knows the class tree.
    """
    wanted = getattr(error, "type_name", None)
    if not isinstance(wanted, str):
        return False
    stack: list[type] = list(types)
    seen: set[type] = set()
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if type_name(cls) == wanted:
            return True
        stack.extend(cls.__subclasses__())
    return False


def not_found(error: BaseException) -> bool:
    """Whether ``error`` means "no such key" to a bulk read: a ``KeyError``, here or remote."""
    return isinstance(error, KeyError) or (
        isinstance(error, RemoteError) and named_as(error, (KeyError,))
    )
