"""Read-through loading caches with request coalescing, for threads and asyncio.

:class:`LoadingCache` and :class:`AsyncLoadingCache` share one policy
(``_policy``) and one store (``_store``); ``_sync`` and ``_async`` only wait.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..stats import CacheStats
from ._sync import LoadingCache

if TYPE_CHECKING:
    from ._async import AsyncLoadingCache

__all__ = ["AsyncLoadingCache", "CacheStats", "LoadingCache"]


def __getattr__(name: str) -> Any:
    # AsyncLoadingCache is imported on first use: the thread cache never needs asyncio.
    if name == "AsyncLoadingCache":
        from ._async import AsyncLoadingCache

        globals()[name] = AsyncLoadingCache
        return AsyncLoadingCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
