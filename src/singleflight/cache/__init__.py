"""Read-through loading caches with request coalescing, for threads and asyncio.

:class:`LoadingCache` and :class:`AsyncLoadingCache` share one policy
(``_policy``) and one store (``_store``); ``_sync`` and ``_async`` only wait.
"""

from ..stats import CacheStats
from ._async import AsyncLoadingCache
from ._sync import LoadingCache

__all__ = ["AsyncLoadingCache", "CacheStats", "LoadingCache"]
