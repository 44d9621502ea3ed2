"""The default group of async caches and decorators: asyncio's or AnyIO's, as the caller runs.

Under asyncio calls go to an :class:`~singleflight.AsyncGroup`; under any
other library (trio) to an :class:`~singleflight.anyio.AnyIOGroup`, made on
first use.  AnyIO is imported only then: the core has no runtime dependencies.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any, Generic

from ._asyncio import AsyncGroup
from ._protocols import P
from .cache._base import K, V
from .stats import GroupStats

if TYPE_CHECKING:
    from .anyio import AnyIOGroup


_running_loop = asyncio._get_running_loop
# What inspect.iscoroutinefunction() recognises (3.12+) on a function returning a coroutine.
_coroutine_function: Callable[[Any], Any] = getattr(inspect, "markcoroutinefunction", lambda f: f)


def running_asyncio() -> bool:
    """Whether the calling code runs in an asyncio event loop (else: another library)."""
    return _running_loop() is not None


def anyio_group() -> AnyIOGroup[Any, Any]:
    """A new :class:`~singleflight.anyio.AnyIOGroup`.

    Raises:
      - ``RuntimeError`` saying what to install if AnyIO is not installed.
    """
    try:
        from .anyio import AnyIOGroup
    except ImportError as exc:
        raise RuntimeError(
            "singleflight runs coroutines outside asyncio (trio) through AnyIO, which is "
            "not installed: pip install 'pysingleflight[anyio]'"
        ) from exc
    return AnyIOGroup()


class AutoGroup(Generic[K, V]):
    """A group for async callers: an :class:`~singleflight.AsyncGroup` under asyncio, an
    :class:`~singleflight.anyio.AnyIOGroup` under any other library AnyIO runs.

    Each library's callers coalesce among themselves.
    """

    __slots__ = ("_anyio", "_asyncio")

    def __init__(self) -> None:
        self._asyncio: AsyncGroup[K, V] = AsyncGroup()
        self._anyio: AnyIOGroup[K, V] | None = None

    def _other(self) -> AnyIOGroup[K, V]:
        group = self._anyio
        if group is None:
            group = self._anyio = anyio_group()
        return group

    @_coroutine_function
    def do(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Awaitable[V]:
        """As :meth:`AsyncGroup.do <singleflight.AsyncGroup.do>` (under asyncio) or
        :meth:`AnyIOGroup.do <singleflight.anyio.AnyIOGroup.do>` (otherwise).

        Returns:
          - the loader's value, shared by every caller of one flight.

        Raises:
          - what that group's ``do`` raises; ``RuntimeError`` outside asyncio
            when AnyIO is not installed.

        Cancellation: as for that group.
        """
        # The chosen group's coroutine itself: no frame of this method in the
        # tracebacks of the loader's errors.
        if _running_loop() is not None:
            return self._asyncio.do(key, fn, *args, **kwargs)
        return self._other().do(key, fn, *args, **kwargs)

    def forget(self, key: K) -> None:
        """Forget ``key``'s flight in both groups (see ``AsyncGroup.forget``)."""
        self._asyncio.forget(key)
        if self._anyio is not None:
            self._anyio.forget(key)

    def stats(self) -> GroupStats:
        """The two groups' counters, added up."""
        stats = self._asyncio.stats()
        if self._anyio is None:
            return stats
        other = self._anyio.stats()
        return replace(
            stats,
            **{f.name: getattr(stats, f.name) + getattr(other, f.name) for f in fields(stats)},
        )

    def __len__(self) -> int:
        """Flights in progress, in both groups."""
        return len(self._asyncio) + (0 if self._anyio is None else len(self._anyio))

    def __repr__(self) -> str:
        return f"<AutoGroup asyncio={self._asyncio!r} anyio={self._anyio!r}>"
