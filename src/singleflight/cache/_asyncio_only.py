"""What only the async cache has: batch loads as tasks, background work as tasks
(asyncio's, or trio's system tasks under trio, waited for through AnyIO), and the
default group.

The generated ``_sync.py`` gets the same names from ``_threads_only.py``.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from asyncio import Task, current_task, get_running_loop
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from functools import partial
from typing import Any

from .._auto import AutoGroup, running_asyncio
from ..errors import AbortedError
from ._base import BatchBase, logger


def default_group() -> AutoGroup[Any, Any]:
    """The group of a cache made without ``group=``: asyncio's or AnyIO's, as the caller runs."""
    return AutoGroup()


class TrioTask:
    """A batch's task under trio: a system task (detached from every caller's cancel
    scope, as an asyncio task is) in a cancel scope the cache's ``aclose`` cancels.

    It answers what :class:`Batch` asks of an asyncio task; its waiters wait on an
    :class:`anyio.Event`, so a waiter's cancellation never reaches the batch.
    """

    __slots__ = ("_callbacks", "_cancelled", "_error", "_event", "task")

    def __init__(self) -> None:
        import anyio

        self._event = anyio.Event()
        self._callbacks: list[Callable[[TrioTask], object]] = []
        self._cancelled = False
        self._error: BaseException | None = None
        self.task: object = None  # the trio task

    def done(self) -> bool:
        return self._event.is_set()

    def cancelled(self) -> bool:
        return self._cancelled

    def exception(self) -> BaseException | None:
        return self._error

    def add_done_callback(self, fn: Callable[[TrioTask], object]) -> None:
        self._callbacks.append(fn)

    def is_current(self) -> bool:
        import trio

        return trio.lowlevel.current_task() is self.task

    async def wait(self) -> None:
        await self._event.wait()

    def finish(self, cancelled: bool, error: BaseException | None) -> None:
        """The task ended: its done callbacks run, then its waiters wake."""
        self._cancelled, self._error = cancelled, error
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)
        self._event.set()


class Batch(BatchBase):
    """A batch load in flight: its task, set right after it is made, and its outcome."""

    __slots__ = ("task",)

    task: Task[None] | TrioTask

    def loaded(self, values: Mapping[Any, Any]) -> None:
        self.values = values

    def failed(self, keys: list[Any], error: BaseException) -> None:
        """Keep the loader's error (a cancellation is told by the task)."""
        if isinstance(error, Exception):
            self.error = error
            self.tb = error.__traceback__

    async def wait(self, key: object) -> None:
        """Wait for the batch to end; never cancels it, even if the waiter is cancelled.

        ``RuntimeError`` if the waiter is the batch's own task (``load_many``
        asking for ``key``, one of its own keys), which would wait for itself.
        """
        task = self.task
        if isinstance(task, TrioTask):
            if task.is_current():
                raise self.reentry(key)
            await task.wait()
            return
        if task is current_task():
            raise self.reentry(key)
        if not task.done():
            await asyncio.wait((task,))

    def outcome(self, key: object) -> Any:
        """``key``'s value from the finished batch; raises its error, AbortedError or KeyError."""
        if self.task.cancelled():
            raise AbortedError(key, "its batch load was cancelled")
        return super().outcome(key)


class Broadcast:
    """What :class:`~singleflight.AsyncLoadingCache`'s ``invalidate``, ``put``,
    ``clear`` and ``invalidate_tags`` return: the change is made in this process
    already; awaiting it waits for Redis to have it too (so every process is
    told), off the event loop.

    ``await`` returns ``None`` at once for a cache without ``fleet=``.  With
    ``fleet=``, it raises :class:`~singleflight.redis.RedisUnavailableError`
    when Redis could not be told (the change stands here all the same; not
    awaited, that failure is logged).  Cancelling the waiter does not cancel
    the round trip.  :meth:`done` tells whether it has ended.
    """

    __slots__ = ("_future",)

    def __init__(self, future: Future[None] | None) -> None:
        self._future = future

    def done(self) -> bool:
        """Whether the round trip to Redis has ended (always, without ``fleet=``)."""
        return self._future is None or self._future.done()

    def __await__(self) -> Generator[Any, None, None]:
        return self._wait().__await__()

    async def _wait(self) -> None:
        if self._future is not None:
            await asyncio.shield(asyncio.wrap_future(self._future))

    def __repr__(self) -> str:
        return f"<Broadcast {'done' if self.done() else 'pending'}>"


class Background:
    """The cache's background tasks: refreshes, batches and the loads refreshes started.

    Under asyncio they are tasks of the running loop; under trio, refreshes and
    batches are system tasks (``trio.lowlevel.spawn_system_task``: AnyIO cannot
    start a detached task) in cancel scopes of their own, made before the task
    starts so that ``close`` reaches a task that has not run yet.
    """

    __slots__ = ("closed", "idle", "loads", "scopes", "tasks")

    def __init__(self) -> None:
        self.closed = False
        self.tasks: set[Task[Any]] = set()
        self.loads: set[Task[Any]] = set()
        self.scopes: set[Any] = set()  # trio.CancelScope of each trio refresh
        self.idle: Any = None  # a trio.Event set when the last of them ends

    def spawn(self, coro: Callable[[], Coroutine[Any, Any, Any]]) -> Task[Any] | TrioTask:
        """``coro()`` in a task of the running asyncio loop, or a trio system task.

        Raises:
          - ``RuntimeError`` under neither (see :meth:`check_batches`).
        """
        if not running_asyncio():
            handle = TrioTask()
            handle.task = self._spawn_trio(coro, (), handle)
            return handle
        loop = get_running_loop()  # before the coroutine exists: none is left un-awaited
        task = loop.create_task(coro())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def after_fork(self) -> None:
        """In a forked child: the tasks belong to loops that are not running there."""
        self.tasks.clear()
        self.loads.clear()
        self.scopes.clear()

    @staticmethod
    def check_batches() -> None:
        """``RuntimeError`` unless batch loads can run here: under asyncio, or under trio
        with AnyIO installed."""
        if running_asyncio():
            return
        try:
            import anyio  # noqa: F401
            import trio
        except ImportError as exc:
            raise RuntimeError(
                "AsyncLoadingCache.get_many runs load_many in a task of its own; outside "
                "asyncio that needs AnyIO: pip install 'pysingleflight[anyio]'"
            ) from exc
        trio.lowlevel.current_task()  # RuntimeError outside trio

    def start(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> bool:
        """Run ``fn(*args)`` in a task of the running library; False once closed (or
        under a library other than asyncio and trio)."""
        if self.closed:
            return False
        if running_asyncio():
            self.spawn(partial(fn, *args))
            return True
        try:
            import trio
        except ImportError:
            return False
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            return False
        self._spawn_trio(fn, args, None)
        return True

    def _spawn_trio(
        self, fn: Callable[..., Coroutine[Any, Any, Any]], args: Any, handle: TrioTask | None
    ) -> object:
        """``fn(*args)`` in a trio system task, in a cancel scope ``close`` cancels; with
        the caller's context, as asyncio's ``create_task`` gives it."""
        import trio

        scope = trio.CancelScope()
        self.scopes.add(scope)
        return trio.lowlevel.spawn_system_task(
            self._run_trio, scope, fn, args, handle, context=contextvars.copy_context()
        )

    async def _run_trio(
        self,
        scope: Any,
        fn: Callable[..., Coroutine[Any, Any, Any]],
        args: Any,
        handle: TrioTask | None,
    ) -> None:
        import trio

        error: BaseException | None = None
        try:
            with scope:
                await trio.lowlevel.checkpoint()  # cancelled before it ran: fn never runs
                await fn(*args)
        except Exception as exc:  # a system task must not raise; fn logs its own failures
            error = exc
            logger.debug("background work %r failed", fn, exc_info=True)
        except BaseException as exc:  # an interrupt: the run ends with it
            error = exc
            raise
        finally:
            self.scopes.discard(scope)
            if handle is not None:
                handle.finish(scope.cancelled_caught, error)
            if not self.scopes and self.idle is not None:
                self.idle.set()

    @contextmanager
    def loading(self, background: bool) -> Iterator[None]:
        """Around a load: one a background refresh started is cancelled by close()."""
        task = current_task() if background and running_asyncio() else None
        if task is None:
            yield
            return
        self.loads.add(task)
        try:
            yield
        finally:
            self.loads.discard(task)

    async def close(self) -> None:
        """Cancel the running library's background tasks and wait until they have ended."""
        self.closed = True
        if not running_asyncio():
            if self.scopes:
                import trio

                if self.idle is None or self.idle.is_set():  # else: another aclose waits on it
                    self.idle = trio.Event()
                for scope in list(self.scopes):
                    scope.cancel()
                await self.idle.wait()
            return
        loop = get_running_loop()
        tasks = [
            task
            for task in (*self.tasks, *self.loads)
            if task.get_loop() is loop and not task.done()
        ]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


def check_loaders(load: object, load_many: object, group: object) -> None:
    """``TypeError`` for a group that is not async (loaders are checked when they return)."""
    if group is not None and not inspect.iscoroutinefunction(getattr(group, "do", None)):
        raise TypeError(
            f"group={group!r} is not an async group; AsyncLoadingCache needs an AsyncGroup"
        )


def not_awaitable(fn: object, returned: object) -> TypeError:
    return TypeError(
        f"AsyncLoadingCache needs an async loader; {fn!r} returned "
        f"{type(returned).__name__}, which cannot be awaited (use LoadingCache for sync loaders)"
    )


async def outcomes_of(loads: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run ``loads`` concurrently (under asyncio; else one after another): their values,
    or the :class:`Exception` they raised, in order."""
    if running_asyncio():
        return await asyncio.gather(*(load() for load in loads), return_exceptions=True)
    outcomes: list[Any] = []
    for load in loads:
        try:
            outcomes.append(await load())
        except Exception as exc:
            outcomes.append(exc)
    return outcomes
