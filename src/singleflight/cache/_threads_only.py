"""What only the thread cache has: batch loads run by the calling thread, and a
refresh pool.

The asyncio cache gets the same names from ``_asyncio_only.py``.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from threading import get_ident
from typing import Any

from .._flight import waiter_error
from .._threads import Group
from ._base import BatchBase


def default_group() -> Group[Any, Any]:
    """The group of a cache made without ``group=``."""
    return Group()


class Batch(BatchBase):
    """A batch load in flight; callers that need one of its keys wait on ``done``.

    ``owner`` is the thread running ``load_many``: if it asks for a key of its
    own batch it is told so, rather than waiting for itself.
    """

    __slots__ = ("done", "owner")

    def __init__(self) -> None:
        super().__init__()
        self.done = threading.Event()
        self.owner = get_ident()

    def loaded(self, values: Mapping[Any, Any]) -> None:
        self.values = values
        self.done.set()

    def failed(self, keys: list[Any], error: BaseException) -> None:
        """Keep the error callers raise (an interrupt becomes ``AbortedError``)."""
        exc = waiter_error(keys, error)
        self.error = exc
        self.tb = exc.__traceback__
        self.done.set()

    def wait(self, key: object) -> None:
        if not self.done.is_set() and self.owner == get_ident():
            raise self.reentry(key)
        self.done.wait()


_NOTHING: AbstractContextManager[None] = nullcontext()


class Background:
    """The refresh pool: ``workers`` threads, started with the first refresh."""

    __slots__ = ("_closed", "_executor", "_lock", "_workers")

    def __init__(self, workers: int) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise TypeError(f"refresh_workers must be an int; got {workers!r}")
        if workers < 1:
            raise ValueError(f"refresh_workers must be at least 1; got {workers!r}")
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def start(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on the pool; False once closed."""
        with self._lock:
            executor = self._executor
            if executor is None and not self._closed:
                executor = self._executor = ThreadPoolExecutor(
                    self._workers, thread_name_prefix="singleflight-refresh"
                )
        if executor is None:
            return False
        try:
            executor.submit(fn, *args)
        except RuntimeError:  # closed meanwhile
            return False
        return True

    def loading(self, background: bool) -> AbstractContextManager[None]:
        """Around a load: nothing to do (a thread cannot be cancelled)."""
        return _NOTHING

    def after_fork(self) -> None:
        """In a forked child: the pool's threads are not there; a new pool starts on demand."""
        self._executor = None
        self._lock = threading.Lock()

    def close(self) -> None:
        """Drop the queued refreshes and wait for the running ones."""
        with self._lock:
            self._closed = True
            executor = self._executor
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def check_loaders(load: object, load_many: object, group: object) -> None:
    """``TypeError`` for async loaders or an async group."""
    for option, fn in (("load", load), ("load_many", load_many)):
        if inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"{option}={fn!r} is an async function; LoadingCache calls it from threads. "
                "Use AsyncLoadingCache for async loaders."
            )
    if group is not None and inspect.iscoroutinefunction(getattr(group, "do", None)):
        raise TypeError(f"group={group!r} is an async group; LoadingCache needs a thread Group")


def outcomes_of(loads: list[Callable[[], Any]]) -> list[Any]:
    """Run ``loads`` one after another: their values, or the :class:`Exception` they
    raised, in order (anything else, ``KeyboardInterrupt``, goes up at once)."""
    outcomes: list[Any] = []
    for load in loads:
        try:
            outcomes.append(load())
        except Exception as exc:
            outcomes.append(exc)
    return outcomes
