"""What code in front of a group (a loading cache, ``@cached``) needs of it: the ``do`` method.

:class:`~singleflight.Group`, :class:`~singleflight.redis.RedisGroup` and
anything else with the same ``do`` is a :class:`GroupLike`;
:class:`~singleflight.AsyncGroup` and :class:`~singleflight.redis.AsyncRedisGroup`
are :class:`AsyncGroupLike`.  Besides ``do``, a loading cache uses what a
group has of these, read with ``getattr``:

``forget(key)``
    Called by ``invalidate``/``put``/``clear``/``refresh`` so callers after
    them start a new flight rather than join one that began before.
``stats()``
    A :class:`~singleflight.stats.GroupStats`, folded into ``CacheStats``.
``crosses_processes``
    True when ``do`` may hand back an outcome produced by another process,
    without calling ``fn`` here: a value loaded elsewhere, or a
    :class:`~singleflight.RemoteError`.  The cache then writes such outcomes
    back itself.  Such a group must have ``forget``.

And, from inside ``fn``, :data:`REMOTE_FLIGHT`: a group that crosses
processes sets it, while ``fn`` runs as the leader of a flight shared with
other processes, to an object with ``when_settled(callback)``.  The group calls
``callback(kept)`` once the flight's outcome is settled, before ``do`` returns
it to anyone: ``kept`` is False when the outcome was refused (the leader was
fenced, lost its lease, or the flight was forgotten meanwhile).  A cache
writes what ``fn`` loaded only when it is kept.  A fleet group's flight also
has ``store_as(fresh_ms, stale_ms, error_ms, delta_ms, error)``: the lifetimes
the cache gives the outcome, for the entry the group stores for every process;
its ``do`` answers with a :class:`SharedEntry` what it read from that store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar

# The type variables the modules share: a key, a value, a loader's parameters.
K = TypeVar("K")
K_contra = TypeVar("K_contra", contravariant=True)
V = TypeVar("V")
P = ParamSpec("P")
# A loader call as the drivers pass it on: fn(*args, **kwargs).
Args = tuple[Any, ...]
Kwargs = dict[str, Any]
AsyncFn = Callable[..., Awaitable[Any]]


class GroupLike(Protocol[K_contra, V]):
    """A thread group: ``do(key, fn, *args, **kwargs)`` runs ``fn`` once per key in flight."""

    def do(self, key: K_contra, fn: Callable[P, V], /, *args: P.args, **kwargs: P.kwargs) -> V: ...


class AsyncGroupLike(Protocol[K_contra, V]):
    """An asyncio group: ``await do(key, fn, *args, **kwargs)`` with ``fn`` async."""

    async def do(
        self, key: K_contra, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> V: ...


def crosses_processes(group: object) -> bool:
    """Whether ``group`` says its ``do`` may return outcomes produced in another process."""
    return getattr(group, "crosses_processes", False) is True


def check_coalesces_only(group: object, who: str) -> None:
    """``ValueError`` for a group that keeps a flight's outcome after it ended.

    A Redis group with ``result_ttl`` above 0 hands a flight's result to the
    callers that come within ``result_ttl`` after it: for ``who`` (which shares a
    response only among the requests that arrive while it is produced) that
    would be a cache nobody asked for.
    """
    ttl = getattr(group, "result_ttl", 0)
    if crosses_processes(group) and ttl:
        raise ValueError(
            f"{who} shares a response only with the requests that arrive while it is "
            f"produced, but {group!r} keeps each flight's result for result_ttl={ttl} s "
            "after it ended, which would serve it to later requests as a cache: make "
            "the group with result_ttl=0"
        )


class Settling(Protocol):
    """What :data:`REMOTE_FLIGHT` holds: a flight whose outcome may yet be refused."""

    def when_settled(self, callback: Callable[[bool], None]) -> None: ...


# The flight shared with other processes that the running loader leads, if any.
REMOTE_FLIGHT: ContextVar[Settling | None] = ContextVar("singleflight_remote_flight", default=None)


@dataclass(slots=True, eq=False)
class SharedEntry:
    """An entry a fleet group read from the store its processes share, handed to the
    cache in front (in place of a bare value) by ``do`` of such a group.

    ``value`` or ``error`` (a :class:`~singleflight.RemoteError` for a stored
    not-found result), and what remains of its lifetimes, in seconds, as the
    store's clock counted them when it was read: ``fresh`` (negative once
    expired), then the ``stale`` and ``stale_if_error`` windows after expiry;
    ``delta`` is how long its load took.  ``read_at`` is ``time.monotonic()``
    when the read was sent: the entry is at least that old.
    """

    value: object
    error: BaseException | None
    fresh: float
    stale: float
    stale_if_error: float
    delta: float
    read_at: float

    def __repr__(self) -> str:
        what = f"error={self.error!r}" if self.error is not None else f"value={self.value!r}"
        return f"<SharedEntry {what} fresh={self.fresh:.3f}s>"
