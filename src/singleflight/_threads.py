"""The thread driver: :class:`Group`, safe from any number of threads.

One lock guards one dict of in-flight calls; the lock is never held while a
loader runs.  Waiting threads block on an :class:`threading.Event` created only
when somebody actually has to wait, so a call nobody joins costs two short
critical sections and the loader itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, InvalidStateError
from functools import partial
from threading import get_ident
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypeVar

from . import _flight
from ._flight import Flight, reentry_error, remove, waiter_error
from ._result import AbortedError, Result

__all__ = ["Group"]

K = TypeVar("K")
V = TypeVar("V")
P = ParamSpec("P")


class _Call(Flight):
    """A flight run by a thread.

    ``owner`` is the ident of the thread running the loader.  ``error`` is what
    waiters raise and ``tb`` its traceback as the loader left it: re-raising
    with it each time keeps the shared exception's traceback from growing.
    """

    __slots__ = ("error", "event", "futures", "owner", "tb", "value")
    error: Exception | None
    tb: TracebackType | None

    def __init__(self, owner: int | None) -> None:
        self.dups = 0
        self.value: Any = None
        self.error = None
        self.event: threading.Event | None = None
        self.futures: list[_CallFuture[Any]] | None = None
        self.owner = owner


class _CallFuture(Future[V]):
    """A caller's own future: ``result()`` re-raises a shared exception with the loader's traceback.

    ``concurrent.futures.Future.result`` re-raises the stored exception as it is,
    so an exception shared by many futures would gain frames on every call.
    """

    _tb: TracebackType | None = None

    def result(self, timeout: float | None = None) -> V:
        error = self.exception(timeout)
        if error is not None:
            raise error.with_traceback(self._tb)
        return super().result(0)


def _outcome(call: _Call) -> Any:
    """Return the flight's value, or raise its error as it was when the loader raised it."""
    error = call.error
    if error is None:
        return call.value
    raise error.with_traceback(call.tb)


def _publish(call: _Call) -> None:
    """Wake every waiter of a finished call.  Runs after the call has left the table."""
    if call.event is not None:
        call.event.set()
    if call.futures:
        error = call.error
        for future in call.futures:
            try:
                if error is None:
                    future.set_result(call.value)
                else:
                    future._tb = call.tb
                    future.set_exception(error)
            except InvalidStateError:
                pass  # the caller cancelled its own future; the others still get theirs


def _bad_key(key: object) -> TypeError:
    return TypeError(f"singleflight keys must be hashable; got {type(key).__name__} {key!r}")


class Group(Generic[K, V]):
    """Coalesces concurrent calls that share a key into one execution, for threads.

    ``Group()`` needs no arguments.  ``executor`` (optional) runs the loaders of
    :meth:`do_future`; by default each such flight gets a daemon thread of its own.

    A group is not a cache: a flight's entry is removed before any of its callers
    sees the result, so a call made after that starts a new flight.  Nothing about
    a finished flight is kept.
    """

    __slots__ = ("__weakref__", "_calls", "_executor", "_lock")

    def __init__(self, *, executor: Executor | None = None) -> None:
        self._lock = threading.Lock()
        self._calls: dict[K, _Call] = {}
        self._executor = executor

    def do(self, key: K, fn: Callable[P, V], /, *args: P.args, **kwargs: P.kwargs) -> V:
        """Run ``fn(*args, **kwargs)`` as the flight of ``key``, or join the one in flight.

        Returns the loader's value; every caller of one flight gets the same object.

        Errors: an :class:`Exception` from the loader is raised in every caller of
        the flight (the same object, with the loader's traceback).  A
        ``BaseException`` that is not an ``Exception`` (``KeyboardInterrupt``,
        ``SystemExit``) is re-raised in the thread that ran the loader only; the
        waiting threads raise :class:`AbortedError` caused by it.  ``TypeError`` if
        ``key`` is unhashable, before anything runs.  ``RuntimeError`` if the
        loader calls ``do`` on its own key from its own thread (it would wait for
        itself).  A waiting ``do`` cannot be cancelled; use :meth:`do_future` to
        stop waiting without stopping the flight.
        """
        calls = self._calls
        # The lead path below is _enter() and _settle() written out: every call
        # of do() takes it, and a method call is a third of its cost.
        with self._lock:
            try:
                call = calls.get(key)
            except TypeError:
                raise _bad_key(key) from None
            if call is None:
                calls[key] = call = _Call(get_ident())
                event = None
            else:
                event = self._join(key, call, fn)
        if event is not None:
            event.wait()
            return _outcome(call)  # type: ignore[no-any-return]
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            self._settle(key, call, None, exc, fn)
            raise
        with self._lock:
            # Remove the entry before anyone can see the value (Go 8fcdb60), and
            # only if it is still ours: after forget() it may be a newer flight.
            current = calls.pop(key, None)
            if current is not call and current is not None:
                calls[key] = current
        # dups is final: joiners only join under the lock while the entry is present.
        if call.dups:
            call.value = value
            _publish(call)
        return value

    def do_result(
        self, key: K, fn: Callable[P, V], /, *args: P.args, **kwargs: P.kwargs
    ) -> Result[V]:
        """Like :meth:`do`, but returns a :class:`Result` instead of raising the loader's error.

        ``Result.error`` holds the loader's :class:`Exception`, or an
        :class:`AbortedError` for a waiter whose leader was interrupted.  A
        ``BaseException`` that stopped the loader in this very thread is still
        raised, as are ``TypeError`` for an unhashable key and ``RuntimeError``
        for a re-entrant call.
        """
        call, event = self._enter(key, fn)
        try:
            if event is not None:
                event.wait()
                value = _outcome(call)
            else:
                try:
                    value = fn(*args, **kwargs)
                except BaseException as exc:
                    self._settle(key, call, None, exc, fn)
                    raise
                self._settle(key, call, value, None, fn)
        except Exception as exc:
            return Result(None, exc, call.dups > 0)
        return Result(value, None, call.dups > 0)

    def do_future(
        self, key: K, fn: Callable[P, V], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[V]:
        """Start or join the flight of ``key`` and return at once with a future of its outcome.

        Go's ``DoChan``.  A new flight's loader runs on the group's executor (by
        default a daemon thread of its own).  Each caller gets its own future:
        waiting on it with a timeout, or cancelling it, affects nobody else, and
        the flight runs on.  The future holds the value, the loader's
        :class:`Exception`, or :class:`AbortedError`.  ``TypeError`` for an
        unhashable key is raised here; so is the executor's error if it refuses
        the work (every caller that joined meanwhile gets it too).
        """
        future: _CallFuture[V] = _CallFuture()
        with self._lock:
            try:
                call = self._calls.get(key)
            except TypeError:
                raise _bad_key(key) from None
            lead = call is None
            if call is None:
                self._calls[key] = call = _Call(None)
            else:
                call.dups += 1
            if call.futures is None:
                call.futures = [future]
            else:
                call.futures.append(future)
        if lead:
            try:
                if self._executor is None:
                    threading.Thread(
                        target=self._run,
                        args=(key, call, fn, args, kwargs),
                        name=f"singleflight {key!r}",
                        daemon=True,
                    ).start()
                else:
                    work = self._executor.submit(self._run, key, call, fn, args, kwargs)
                    work.add_done_callback(partial(self._dropped, key, call))
            except BaseException as exc:
                self._settle(key, call, None, exc, fn)
                raise
        return future

    def forget(self, key: K) -> None:
        """Let the next call of ``key`` start a new flight.

        The flight in progress is not stopped; its callers still get its outcome,
        and when it ends it does not remove the newer flight.  A no-op for a key
        not in flight.
        """
        with self._lock:
            _flight.forget(self._calls, key)

    def forget_unshared(self, key: K) -> bool:
        """Forget ``key`` only if nobody joined its flight.

        Returns True if the key was forgotten or was not in flight, False if its
        flight is shared (it is then left alone).
        """
        with self._lock:
            return _flight.forget_unshared(self._calls, key)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._calls

    def __len__(self) -> int:
        """The number of keys in flight."""
        with self._lock:
            return len(self._calls)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} in_flight={len(self)}>"

    # -- the slow paths --------------------------------------------------------------

    def _enter(self, key: K, fn: object) -> tuple[_Call, threading.Event | None]:
        """Lead (no event) or join (the event to wait on) the flight of ``key``."""
        with self._lock:
            try:
                call = self._calls.get(key)
            except TypeError:
                raise _bad_key(key) from None
            if call is None:
                self._calls[key] = call = _Call(get_ident())
                return call, None
            return call, self._join(key, call, fn)

    @staticmethod
    def _join(key: object, call: _Call, fn: object) -> threading.Event:
        """Join ``call`` (the group's lock is held) and return the event to wait on."""
        if call.owner == get_ident():
            raise reentry_error(key)
        if not callable(fn):
            raise TypeError(f"fn must be callable; got {type(fn).__name__} {fn!r}")
        call.dups += 1
        if call.event is None:
            call.event = threading.Event()
        return call.event

    def _run(
        self,
        key: K,
        call: _Call,
        fn: Callable[..., V],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """Run a :meth:`do_future` flight's loader on a worker thread."""
        call.owner = get_ident()
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            # Every caller holds a future that now carries the outcome; nothing
            # is left for the worker thread to report.
            self._settle(key, call, None, exc, fn)
            return
        self._settle(key, call, value, None, fn)

    def _dropped(self, key: K, call: _Call, work: Future[None]) -> None:
        """The executor cancelled a flight's work before it ran: end the flight for its callers."""
        if work.cancelled():
            self._settle(key, call, None, AbortedError(key, "the executor dropped its work"), None)

    def _settle(
        self, key: K, call: _Call, value: Any, exc: BaseException | None, fn: object
    ) -> None:
        """End ``call``: remove it from the table, then hand its outcome to every waiter."""
        with self._lock:
            remove(self._calls, key, call)
        if exc is None:
            call.value = value
        else:
            call.error = error = waiter_error(key, exc)
            call.tb = error.__traceback__
        _publish(call)
