"""The asyncio driver: :class:`AsyncGroup`.

Each flight's loader runs in a task of its own, so no caller's cancellation
ever reaches it (unless ``cancel_orphaned`` asks for that once every caller has
left).  Callers wait on a future of their own, which is what lets one of them be
cancelled without disturbing the rest.  On Python 3.12+ the loader task starts
eagerly: a loader that finishes without suspending is done before ``do``
returns, and then there is no flight record and no future at all.

State is kept per event loop, so a group may be shared by several loops (in
threads, or one ``asyncio.run`` after another) whose calls never join each other.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from asyncio import (
    AbstractEventLoop,
    CancelledError,
    Future,
    InvalidStateError,
    Task,
    current_task,
    get_running_loop,
)
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from inspect import isawaitable
from time import perf_counter
from typing import Any, Generic

from ._flight import (
    Flight,
    Full,
    Table,
    bad_key,
    check_fn,
    cycle_error,
    loader_timed_out,
    not_awaitable,
    waiter_error,
)
from ._loops import LoopGroup, LoopState, asyncio_call_soon
from ._protocols import Args, AsyncFn, K, Kwargs, P, V
from ._result import Result
from .errors import AbortedError, WaitTimeoutError
from .events import Event, emit

# Loader tasks share one name: a "Task-N" name per flight costs memory and a
# string format.  Eager start (3.12+) runs the loader until it first suspends.
_TASK_NAME = "singleflight loader"
_new = Task.__new__
_init: Callable[..., None]
if sys.version_info >= (3, 12):
    _init = Task.__init__
else:  # pragma: no cover - exercised on 3.11 only

    def _init(task: Task[Any], coro: Any, *, loop: Any, eager_start: bool, name: str) -> None:
        Task.__init__(task, coro, loop=loop, name=name)


def _retrieved(task: Task[Any]) -> None:
    """A loader task made in two steps (``_new``, ``_init``) whose eager first step
    raised a ``BaseException`` out of the constructor (``KeyboardInterrupt``,
    ``SystemExit``): the caller raises it, so the task's copy is marked retrieved
    and the loop logs no "exception was never retrieved" for it."""
    if task.done() and not task.cancelled():
        task.exception()


def _new_task(coro: Coroutine[Any, Any, Any], loop: AbstractEventLoop) -> Task[Any]:
    """A loader task (started eagerly on 3.12+), as _enter() makes it inline."""
    task: Task[Any] = _new(Task)
    try:
        _init(task, coro, loop=loop, eager_start=True, name=_TASK_NAME)
    except BaseException:
        _retrieved(task)
        raise
    return task


# Waiter futures are made with Future(loop=...) rather than loop.create_future():
# the latter is a Python-level method call on asyncio's loops, a tenth of the
# cost of joining a flight.


class _LoopState(LoopState):
    """One event loop's flights of a group; only that loop's thread touches it."""

    __slots__ = ("context", "slot_waiters", "starting")

    def __init__(self, table: Table[_AsyncFlight], loop: AbstractEventLoop) -> None:
        super().__init__(table, asyncio_call_soon(loop))
        # The context the group's own done callbacks run in: they need no context
        # variables, and one empty context per loop saves a copy_context() per
        # flight.  Never one for every loop: a context cannot be entered by two
        # threads at once.
        self.context = contextvars.Context()
        # The flight whose task is being constructed (started eagerly), if any:
        # a _Starting list; nested eager starts link to the outer one.
        self.starting: list[Any] | None = None
        # Callers waiting for a slot under max_flights with on_limit="wait".
        self.slot_waiters: list[asyncio.Future[None]] = []

    def free_slot(self) -> None:
        """A flight left the table: let the first caller waiting for a slot retry."""
        while self.slot_waiters:
            waiter = self.slot_waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return

    def wake_slot_waiters(self) -> None:
        """A flight started: callers of its key waiting for a slot may join it now; the
        others look again and wait on."""
        waiting, self.slot_waiters = self.slot_waiters, []
        for slot in waiting:
            if not slot.done():
                slot.set_result(None)


class _AsyncFlight(Flight):
    """A flight whose loader task is running, and the futures of its callers.

    ``waiters`` is the first caller's future, or a list once anybody joined
    (most flights have one caller); the leader's comes first.  The record is in
    the table before its task starts, and ``task`` is None until the task's
    constructor returns: a caller finding it then (a hook told of its start, a
    task the loader spawned eagerly) joins it.  While the task is being
    constructed its loader is known by its coroutine (the state's
    ``starting`` chain); once the task suspends, by the task
    (``Table.loaders``).  The flight is its task's done callback: a bound method
    would cost an object per flight.
    """

    __slots__ = ("state", "task", "waiters")

    def __init__(self, state: _LoopState, key: object, task: Task[Any] | None) -> None:
        self.key = key
        self.dups = 0
        self.awaits = None
        self.state = state
        self.task = task
        self.waiters: asyncio.Future[Any] | list[asyncio.Future[Any]] | None = None

    def add_leader(self, loop: AbstractEventLoop) -> asyncio.Future[Any]:
        """The leader's future, first of the waiters (callers may have joined while the
        task started)."""
        future: Future[Any] = Future(loop=loop)
        waiters = self.waiters
        if waiters is None:
            self.waiters = future
        elif isinstance(waiters, list):
            waiters.insert(0, future)
        else:
            self.waiters = [future, waiters]
        return future

    def __call__(self, task: asyncio.Future[Any]) -> None:
        """The loader task is done: settle the flight, then hand its outcome to every waiter."""
        self.state.table.loaders.pop(task, None)
        if task.cancelled():
            self.end(None, None, True)
        else:
            exc = task.exception()
            self.end(None if exc is not None else task.result(), exc, False)

    def end(self, value: Any, exc: BaseException | None, cancelled: bool) -> None:
        state = self.state
        table = state.table
        failure, told = table.settle(self, exc, cancelled)
        if state.slot_waiters:
            state.free_slot()
        if told is not None:
            emit(table.hook, told)  # type: ignore[arg-type]
        waiters = self.waiters
        if waiters is None:
            return
        if not isinstance(waiters, list):
            waiters = [waiters]
        if failure is None:
            for future in waiters:
                try:
                    future.set_result(value)
                except InvalidStateError:
                    pass  # a caller that left cancelled its own future
        else:
            # The first waiter is the caller that started the flight: it gets the
            # loader's exception; every other caller an equal copy of its own.
            error: Exception | None = None
            for future in waiters:
                if future.done():
                    continue  # a caller that left cancelled its own future
                error = failure.own() if error is None else failure.copy()
                try:
                    future.set_exception(error)
                except InvalidStateError:
                    continue
                # Like Go's DoChan channel, a future its caller dropped (or was
                # cancelled just after this) is no error to log.
                future._log_traceback = False


# A flight whose task is being constructed: [key, coroutine, outer, record]; while
# fn itself runs, the task calling it stands in the coroutine's place.  The record
# is made only when somebody needs it during the start (a caller joins, the loader
# calls the group): most flights of a fast path never need one.  A list, not an
# object: it is made on the hot path.
_KEY, _CORO, _OUTER, _RECORD = 0, 1, 2, 3

# In a table while a new flight's task is being constructed and nobody has
# needed its record yet (see _Starting).
_STARTING: Any = object()


def _record_of(state: _LoopState, starting: list[Any]) -> _AsyncFlight:
    """The record of a flight being started, made now if nobody needed it before."""
    record: _AsyncFlight | None = starting[_RECORD]
    if record is None:
        key = starting[_KEY]
        record = starting[_RECORD] = _AsyncFlight(state, key, None)
        calls = state.table.calls
        if calls.get(key) is _STARTING:
            calls[key] = record
    return record


def _starting_of(state: _LoopState, key: object) -> _AsyncFlight:
    """The record of the flight of ``key`` being started (its table entry is _STARTING)."""
    starting = state.starting
    while starting is not None:
        if starting[_KEY] == key:
            return _record_of(state, starting)
        starting = starting[_OUTER]
    raise AssertionError("a key marked as starting has no flight starting")  # pragma: no cover


def _own_flight(state: _LoopState, task: Task[Any] | None) -> _AsyncFlight | None:
    """The flight of ``state`` whose loader ``task`` runs, if any.

    A flight the task is starting (its fn runs in the task, or the task is its
    eager first step) comes first: it is nested in any flight the task is the
    loader of, and a call on its key waits for the task itself.
    """
    if task is None:
        return None
    starting = state.starting
    if starting is not None:
        coro = task.get_coro()  # task is running: get_coro() is safe
        while starting is not None:
            if starting[_CORO] is coro or starting[_CORO] is task:
                return _record_of(state, starting)
            starting = starting[_OUTER]
    return state.table.loaders.get(task)


def _stop_awaiting(own: _AsyncFlight, flight: _AsyncFlight, future: object) -> None:
    """A loader's wait on ``flight`` ended (its future is done)."""
    if own.awaits is flight:
        own.awaits = None


# What fn "returned" while it has not returned yet (None is a possible return).
_NOTHING: Any = object()


async def _await(awaitable: Awaitable[V]) -> V:
    return await awaitable


class AsyncGroup(LoopGroup[K, _LoopState], Generic[K, V]):
    """Coalesces concurrent calls that share a key into one execution, for asyncio.

    Options as :class:`~singleflight.Group` (``name``, ``on_event``,
    ``max_flights`` and ``on_limit`` per event loop, ``timeout``), plus:

    * ``cancel_orphaned``: cancel a loader once its last caller left (default
      ``False``, as in Go: it runs on).
    * ``loader_timeout``: seconds a loader may run; then it is cancelled and
      the flight fails for everyone with ``TimeoutError``.

    ``fn`` returns an awaitable, run in a task of its own.  Calls from
    different event loops never join each other.
    """

    __slots__ = ()
    _make_state = staticmethod(_LoopState)

    async def do(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> V:
        """Run ``fn(*args, **kwargs)`` as the flight of ``key``, or join the one in flight.

        Returns:
          * the loader's value, the same object for every caller.

        Raises (see the contract):
          * the loader's :class:`Exception`: itself in the first caller, an equal
            copy in every other;
          * :class:`AbortedError` when the loader task ended cancelled or by
            another ``BaseException``;
          * the usage errors, :class:`TooManyFlightsError` and
            :class:`WaitTimeoutError` as :meth:`Group.do <singleflight.Group.do>`.

        Cancellation: a cancelled caller alone raises ``CancelledError``; the
        loader runs on unless ``cancel_orphaned`` and every caller has left.
        """
        if self._slow:
            deadline = self._deadline()
            flight, future, joined = await self._admit(key, fn, args, kwargs, deadline)
            return await self._wait(key, flight, future, joined, deadline)  # type: ignore[no-any-return]
        flight, future, joined = self._enter(key, fn, args, kwargs)
        del args, kwargs  # the loader has them; a parked caller need not keep them
        if flight is None:
            return _outcome(key, future)  # type: ignore[no-any-return]
        try:
            return await future  # type: ignore[no-any-return]
        except CancelledError:
            self._leave(flight, joined, future)
            raise

    async def do_result(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Result[V]:
        """Like :meth:`do`, but the loader's error is returned in the :class:`Result`.

        Raises: as :meth:`do`, for everything but the loader's error;
        cancellation as for :meth:`do`.
        """
        deadline = self._deadline()
        flight, future, joined = await self._admit(key, fn, args, kwargs, deadline)
        try:
            value = await self._wait(key, flight, future, joined, deadline)
        except Exception as exc:
            if isinstance(exc, WaitTimeoutError) and not (future.done() and not future.cancelled()):
                raise  # this caller's own timeout, not the loader's error
            return Result(None, exc, flight is not None and flight.dups > 0)
        return Result(value, None, flight is not None and flight.dups > 0)

    def do_future(
        self, key: K, fn: Callable[P, Awaitable[V]], /, *args: P.args, **kwargs: P.kwargs
    ) -> asyncio.Future[V]:
        """Start or join the flight of ``key``; return at once with a future of its outcome.

        Go's ``DoChan``; call it with the loop running.  Each caller's future
        holds what :meth:`do` returns or raises; the usage errors are raised here.

        Cancellation: cancelling a future affects nobody else (the last one, with
        ``cancel_orphaned``, cancels the loader).
        """
        try:
            flight, future, joined = self._enter(key, fn, args, kwargs)
        except Full as full:
            if not full.wait:
                raise self._refuse(full) from None
            # Waiting for a slot must not block: the call runs in a task of its
            # own, which is this caller's future (cancelling it is leaving).
            call = get_running_loop().create_task(self.do(key, fn, *args, **kwargs))
            call.add_done_callback(_mark_retrieved, context=self._state_here().context)
            return call
        if flight is None:
            # Finished while starting: the caller still gets a future of its own.
            task = future
            future = task.get_loop().create_future()
            try:
                future.set_result(_outcome(key, task))
            except Exception as exc:
                future.set_exception(exc)
                future._log_traceback = False  # as for every waiter: see _AsyncFlight.end
        else:
            future.add_done_callback(
                partial(self._leave, flight, joined), context=flight.state.context
            )
        return future

    # -- the mechanism -------------------------------------------------------------

    def _enter(
        self, key: K, fn: AsyncFn, args: Args, kwargs: Kwargs
    ) -> tuple[_AsyncFlight | None, asyncio.Future[Any], float | None]:
        """Lead or join the flight of ``key``: the bookkeeping of every entry point.

        Returns the flight, the future this caller waits on and its join time
        (None for the leader); or, when the loader finished while it was being
        started, no flight and the finished loader task (its entry already
        gone).  Being a plain function, its frame is gone once it returns: the
        coroutines that call it stay small while they wait.  Raises
        :class:`Full` when ``max_flights`` is reached.
        """
        if not callable(fn):
            check_fn(fn)
        loop = get_running_loop()
        # Registry.state_of() and Table.enter()/join() written out below: this is
        # the hot path (see the module docstring).
        current = self._loops.current
        state: _LoopState = current[1] if current[0]() is loop else self._loops.state_of(loop)  # type: ignore[assignment]
        table = state.table
        calls = table.calls
        try:
            flight = calls.get(key)
        except TypeError:
            raise bad_key(key) from None
        loaders = table.loaders
        # The flight whose loader this task runs, if any (see _AsyncFlight).
        if state.starting is None:
            own = loaders.get(current_task(loop)) if loaders else None
        else:
            own = _own_flight(state, current_task(loop))
        if flight is not None:
            if flight is _STARTING:
                # A flight being started: a hook told of its start, or a task its
                # loader spawned eagerly, joins it (its record is made now).
                flight = _starting_of(state, key)
            joined = perf_counter()
            future: Future[Any] = Future(loop=loop)
            if own is not None:
                error = cycle_error(flight, own)
                if error is not None:
                    raise error
                self._awaits(own, flight, future)
            if table.hook is None and flight.dups:
                # Table.join() for a second or later joiner, written out: with many
                # callers on one key this is the hot path.  ``waiters`` is a list
                # once anybody joined.
                flight.dups += 1
                table.joins += 1.0
                flight.joined += joined
                flight.waiters.append(future)  # type: ignore[union-attr]
            else:
                told: Event | None = table.join(flight, joined)
                waiters = flight.waiters
                if waiters is None:
                    flight.waiters = [future]
                elif isinstance(waiters, list):
                    waiters.append(future)
                else:
                    flight.waiters = [waiters, future]
                if told is not None:
                    emit(table.hook, told)  # type: ignore[arg-type]
            return flight, future, joined
        # A new flight.  It is in the table before anything runs: a caller of the
        # key from a hook told of its start, or from a task the loader spawns
        # eagerly, joins it.  Its record is made up front on the general path and
        # when this caller is a loader (its wait may close a cycle); otherwise
        # only if somebody needs it while the task is constructed.
        outer = state.starting
        starting: list[Any] = [key, None, outer, None]
        returned: Any = _NOTHING
        try:
            if self._slow:
                table.enter(key)  # raises Full
                record = starting[_RECORD] = _AsyncFlight(state, key, None)
                told = table.lead(record)
                if state.slot_waiters:
                    state.wake_slot_waiters()  # callers of this key may join it now
                if told is not None:
                    emit(table.hook, told)  # type: ignore[arg-type]
            else:
                table.flights += 1
                calls[key] = _STARTING
                if own is not None:
                    _record_of(state, starting)
            # Marked as starting from here.  While fn itself runs, this task is
            # the loader (its call of the group on the key is re-entry); then
            # the coroutine fn returned is.
            starting[_CORO] = current_task(loop)
            state.starting = starting
            if own is not None:
                # Before fn runs: fn, or the loader's first step, may close a cycle.
                own.awaits = starting[_RECORD]
            try:
                returned = fn(*args, **kwargs)
                if self._loader_timeout is not None:
                    returned = _with_deadline(returned, fn, self._loader_timeout, key)
                starting[_CORO] = returned
                # Task(returned, ...) in two steps, the task at hand if its first step
                # raises a BaseException out of the constructor: see _retrieved().
                task = _new(Task)
                try:
                    _init(task, returned, loop=loop, eager_start=True, name=_TASK_NAME)
                except BaseException:
                    _retrieved(task)
                    raise
            finally:
                state.starting = outer
        except Full:
            raise
        except BaseException as exc:
            if own is not None:
                own.awaits = None
            try:
                task = _launch_failed(calls, key, loop, fn, returned, exc)  # type: ignore[assignment]
            except BaseException as raised:
                # A usage error or an interrupt: the flight ends with it.  This
                # caller raises it; a placeholder takes the leader's place among the
                # waiters, so those that joined get copies of their own.
                ended = starting[_RECORD] or _AsyncFlight(state, key, None)
                ended.add_leader(loop)
                ended.end(None, raised, False)
                raise
        record = starting[_RECORD]
        if task.done():
            # Finished without suspending: its outcome is this caller's at once.
            if own is not None:
                own.awaits = None
            if record is None:
                # Nobody needed the record: no waiter, no event.  Release the key
                # unless the loader forgot it.
                if calls.get(key) is _STARTING:
                    del calls[key]
                if task.cancelled() or task.exception() is not None:
                    _AsyncFlight(state, key, task)(task)  # counted as the record would be
            else:
                record.task = task
                # This caller gets the task's outcome itself; a placeholder takes
                # the leader's place among the waiters, so those that joined while
                # it started get copies of their own.
                record.add_leader(loop)
                record(task)
            return None, task, None
        if record is None:
            record = _AsyncFlight(state, key, task)
            if calls.get(key) is _STARTING:
                calls[key] = record
            # else the loader forgot its key while starting; the flight runs unlisted.
        else:
            record.task = task
        loaders[task] = record
        task.add_done_callback(record, context=state.context)
        future = record.add_leader(loop)
        if own is not None:
            self._awaits(own, record, future)
        return record, future, None

    @staticmethod
    def _awaits(own: _AsyncFlight, flight: _AsyncFlight, future: asyncio.Future[Any]) -> None:
        """The loader of ``own`` waits on ``flight`` until ``future`` is done."""
        own.awaits = flight
        future.add_done_callback(partial(_stop_awaiting, own, flight), context=own.state.context)

    def _deadline(self) -> float | None:
        """When a caller starting now stops waiting: one deadline for the slot and the result."""
        return None if self._timeout is None else get_running_loop().time() + self._timeout

    async def _admit(
        self, key: K, fn: AsyncFn, args: Args, kwargs: Kwargs, deadline: float | None
    ) -> tuple[_AsyncFlight | None, asyncio.Future[Any], float | None]:
        """_enter(), waiting for a slot while max_flights is reached (on_limit="wait").

        Raises WaitTimeoutError if no slot frees before ``deadline``.
        """
        while True:
            try:
                return self._enter(key, fn, args, kwargs)
            except Full as full:
                if not full.wait:
                    raise self._refuse(full) from None
            state = self._state_here()
            slot: asyncio.Future[None] = Future(loop=get_running_loop())
            state.slot_waiters.append(slot)
            try:
                async with asyncio.timeout_at(deadline):
                    await slot
            except BaseException as exc:
                if slot.done() and not slot.cancelled():
                    # Woken for a slot in the very step it left: pass it on.
                    state.free_slot()
                else:
                    slot.cancel()
                if isinstance(exc, TimeoutError):
                    self._timed_out(key, self._timeout or 0.0)
                raise

    async def _wait(
        self,
        key: K,
        flight: _AsyncFlight | None,
        future: asyncio.Future[Any],
        joined: float | None,
        deadline: float | None,
    ) -> Any:
        """Wait for this caller's outcome, until ``deadline`` (the call's, slot wait included)."""
        if flight is None:
            return _outcome(key, future)
        try:
            async with asyncio.timeout_at(deadline):
                return await future
        except CancelledError:
            self._leave(flight, joined, future)
            raise
        except TimeoutError:
            if future.done() and not future.cancelled():
                # The outcome arrived in the same loop step as the timeout (or
                # it is the loader's own TimeoutError): it is this caller's.
                return future.result()
            self._leave(flight, joined, future)
            self._timed_out(key, self._timeout or 0.0)

    def _leave(
        self, flight: _AsyncFlight, joined: float | None, future: asyncio.Future[Any]
    ) -> None:
        """A caller stopped waiting: with ``cancel_orphaned``, the last one cancels the loader."""
        if not future.cancelled():
            return
        state = flight.state
        task = flight.task
        running = task is not None and not task.done()
        if state.table.leave(flight, joined, self._cancel_orphaned and running):
            if state.slot_waiters:
                state.free_slot()
            if task is not None:
                task.cancel()

    def _parked(self) -> int:
        """Callers of the running loop waiting for a slot (white-box, for tests)."""
        return sum(not slot.done() for slot in self._state_here().slot_waiters)

    _token = staticmethod(get_running_loop)


def _outcome(key: object, task: asyncio.Future[Any]) -> Any:
    """The outcome of a loader task that finished while it was being started (counted
    already): the same as its waiters would get."""
    if task.cancelled():
        raise AbortedError(key, "its loader task was cancelled")
    exc = task.exception()
    if exc is not None:
        raise waiter_error(key, exc).with_traceback(exc.__traceback__)
    return task.result()


def _mark_retrieved(task: asyncio.Future[Any]) -> None:
    """A do_future() task its caller may drop: its error is no error to log."""
    if not task.cancelled():
        task.exception()


async def _deadline(awaitable: Awaitable[V], seconds: float, key: object) -> V:
    """Run a loader under ``loader_timeout``: past it, the flight fails with TimeoutError."""
    try:
        async with asyncio.timeout(seconds) as scope:
            return await awaitable
    except TimeoutError:
        if scope.expired():
            raise loader_timed_out(key, seconds) from None
        raise


def _with_deadline(
    returned: object, fn: object, seconds: float, key: object
) -> Coroutine[Any, Any, Any]:
    if not isawaitable(returned):
        raise not_awaitable("AsyncGroup", fn, returned)
    return _deadline(returned, seconds, key)


def _launch_failed(
    table: dict[Any, _AsyncFlight],
    key: object,
    loop: AbstractEventLoop,
    fn: object,
    returned: object,
    exc: BaseException,
) -> asyncio.Future[Any]:
    """``fn`` raised, or returned something a task cannot run.

    An awaitable that is not a coroutine gets a coroutine awaiting it.  A result
    that is not awaitable is a usage error: ``TypeError`` naming ``fn`` is raised.
    An :class:`Exception` raised by ``fn`` itself is the flight's outcome, as if
    its coroutine had raised it: a finished future holding it is returned.  Any
    other ``BaseException`` is raised.  A key nobody needed the record of is
    released here; a record (somebody joined, or the caller is a loader) leaves
    the table as the flight settles, its joins counted.
    """
    if isinstance(exc, TypeError) and returned is not _NOTHING:
        if isawaitable(returned):
            return _new_task(_await(returned), loop=loop)
        exc = not_awaitable("AsyncGroup", fn, returned)
    if table.get(key) is _STARTING:
        del table[key]
    if returned is _NOTHING and isinstance(exc, Exception):
        failed: asyncio.Future[Any] = Future(loop=loop)
        failed.set_exception(exc)
        return failed
    raise exc
