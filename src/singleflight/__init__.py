"""Request coalescing for Python: Go's singleflight for threads and asyncio.

Concurrent calls that share a key share one execution of the loader::

    users: Group[str, User] = Group()
    user = users.do("user:42", load_user, 42)

    ausers: AsyncGroup[str, User] = AsyncGroup()
    user = await ausers.do("user:42", fetch_user, 42)
"""

from ._asyncio import AsyncGroup
from ._result import AbortedError, Result
from ._threads import Group

__all__ = ["AbortedError", "AsyncGroup", "Group", "Result"]
__version__ = "0.1.0"
