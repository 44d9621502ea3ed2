"""Request coalescing for Python: Go's singleflight for threads and asyncio.

Concurrent calls that share a key share one execution of the loader::

    users: Group[str, User] = Group()
    user = users.do("user:42", load_user, 42)

    ausers: AsyncGroup[str, User] = AsyncGroup()
    user = await ausers.do("user:42", fetch_user, 42)

In front of a group, a read-through cache (TTL with jitter, stale-while-revalidate,
stale-if-error, probabilistic early refresh, negative caching, bulk loads)::

    users = LoadingCache(load_user, ttl=30.0, stale=60.0)
    user = users.get(42)

    @cached(ttl=30.0)
    async def fetch_profile(user_id: int) -> Profile: ...

and :func:`coalesce`, which shares in-flight calls of a function without caching.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._protocols import AsyncGroupLike, GroupLike
from ._result import Result
from ._threads import Group
from .cache._sync import LoadingCache
from .errors import (
    AbortedError,
    ReentryError,
    RemoteError,
    SingleflightError,
    TooManyFlightsError,
    WaitTimeoutError,
)
from .stats import CacheStats, GroupStats

if TYPE_CHECKING:
    from ._asyncio import AsyncGroup
    from .cache._async import AsyncLoadingCache
    from .func import CachedFunction, CacheInfo, CoalescedFunction, cached, coalesce

# Imported on first use, so that code using threads only never imports asyncio
# (``cached`` and ``coalesce`` serve both, so their module needs it).
_LAZY = {
    "AsyncGroup": "._asyncio",
    "AsyncLoadingCache": ".cache._async",
    "CacheInfo": ".func",
    "CachedFunction": ".func",
    "CoalescedFunction": ".func",
    "cached": ".func",
    "coalesce": ".func",
}

__all__ = [
    "AbortedError",
    "AsyncGroup",
    "AsyncGroupLike",
    "AsyncLoadingCache",
    "CacheInfo",
    "CacheStats",
    "CachedFunction",
    "CoalescedFunction",
    "Group",
    "GroupLike",
    "GroupStats",
    "LoadingCache",
    "ReentryError",
    "RemoteError",
    "Result",
    "SingleflightError",
    "TooManyFlightsError",
    "WaitTimeoutError",
    "cached",
    "coalesce",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
