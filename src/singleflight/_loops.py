"""One weak registry of per-event-loop state, for the drivers that run on event loops.

A group may be used from several asyncio loops (threads, one ``asyncio.run``
after another) or ``trio.run``s; calls of different loops never join each
other, so each loop gets its own :class:`~._flight.Table`, touched only from
that loop's thread.  Entries are keyed weakly by the loop (trio: the run's root
task); when a loop is collected or closed its counters go to ``retired``, so
``stats()`` never goes back.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any, Generic, Literal, NoReturn, TypeVar

from ._flight import Full, Table
from ._flight import stats as _stats
from ._options import check_flag, check_options, check_seconds
from ._protocols import K
from .errors import WaitTimeoutError
from .events import EventHook, emit
from .stats import GroupStats


class LoopState:
    """One loop's table, and how to run a function in that loop's thread from any thread."""

    __slots__ = ("call_soon", "finalizer", "table")

    def __init__(self, table: Table[Any], call_soon: Callable[[Callable[[], object]], object]):
        self.table = table
        self.call_soon = call_soon  # thread-safe; raises RuntimeError once the loop is gone
        self.finalizer: weakref.finalize[Any, Any] | None = None

    def free_slot(self) -> None:  # pragma: no cover - every driver's state has its own
        """A flight left the table: let the first caller waiting for a slot look again."""
        raise NotImplementedError


S = TypeVar("S", bound=LoopState)


def _dead_ref() -> None:
    return None


class Registry(Generic[S]):
    """The states of a group's loops.  ``current`` is the last loop used and its state,
    read as one tuple so that threads running different loops never pair one loop
    with another's state; drivers read it inline on their hot path."""

    __slots__ = ("__weakref__", "current", "dead", "live", "lock", "make", "retired", "states")

    def __init__(self, make: Callable[[Any], S], retired: Table[Any]) -> None:
        self.make = make  # token -> a new state (called in the token's loop)
        self.retired = retired
        self.states: weakref.WeakKeyDictionary[Any, S] = weakref.WeakKeyDictionary()
        # The tables not retired yet.  A collected loop's entry leaves ``states``
        # before its finalizer moves the counters to ``retired``: a table read
        # in between is still here.  (The finalizer holds each state anyway.)
        self.live: set[Table[Any]] = set()
        # The tables of collected loops, retired at the next prune(): a finalizer
        # may run in the middle of stats() in the thread holding the lock, and
        # must not move counters then (they would be summed twice).
        self.dead: list[Table[Any]] = []
        # Reentrant: the garbage collector may run anything while it is held.
        self.lock = threading.RLock()
        self.current: tuple[Callable[[], object], S | None] = (_dead_ref, None)
        _registries.add(self)

    def state_of(self, token: Any) -> S:
        """The state of the loop (or trio run) ``token`` (made on first use)."""
        with self.lock:
            state = self.states.get(token)
            if state is None:
                self.prune()
                state = self.states[token] = self.make(token)
                self.live.add(state.table)
                state.finalizer = weakref.finalize(token, _retire, weakref.ref(self), state)
            self.current = (weakref.ref(token), state)
        return state

    def get(self, token: Any) -> S | None:
        with self.lock:
            return self.states.get(token)

    def all(self) -> list[S]:
        with self.lock:
            self.prune()
            return list(self.states.values())

    def tables(self) -> list[Table[Any]]:
        with self.lock:
            self.prune()
            return [*self.live, self.retired]

    def stats(self) -> GroupStats:
        """The counters of every table summed; each counter only grows."""
        with self.lock:  # no loop retires (its counters moved) while they are summed
            return _stats(self.tables())

    def retire(self, table: Table[Any]) -> None:
        """A loop is gone (the lock is held): its counters go to ``retired``."""
        table.add_to(self.retired)
        self.live.discard(table)

    def prune(self) -> None:
        """Drop the states of closed asyncio loops (the lock is held).

        A loop closed with flights pending can never finish them, and its state
        would keep it alive: its flights hold tasks that hold the loop.  Their
        counters are kept.
        """
        while self.dead:
            self.retire(self.dead.pop())
        closed = [t for t in self.states if getattr(t, "is_closed", bool)()]
        for token in closed:
            state = self.states.pop(token)
            if state.finalizer is not None and state.finalizer.detach() is not None:
                self.retire(state.table)
        token = self.current[0]()
        if token is not None and getattr(token, "is_closed", bool)():
            self.current = (_dead_ref, None)

    def after_fork(self) -> None:
        """In a forked child: only the loop (or trio run) of the thread that forked goes
        on; every other loop's flights will never end there.  Their counters are kept."""
        self.lock = threading.RLock()  # another thread may have held it at the fork
        here = _running_token()
        for token, state in list(self.states.items()):
            if token is here:
                continue
            del self.states[token]
            if state.finalizer is not None and state.finalizer.detach() is not None:
                self.retire(state.table)
        self.current = (_dead_ref, None)


def _running_token() -> object:
    """The asyncio loop or trio run (its root task) running in this thread, if any."""
    loop = asyncio._get_running_loop()
    if loop is not None:
        return loop
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            return trio.lowlevel.current_root_task()
        except RuntimeError:
            return None
    return None


# Every registry, reset in a forked child.
_registries: weakref.WeakSet[Registry[Any]] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for registry in list(_registries):
        registry.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _retire(registry: weakref.ref[Registry[Any]], state: LoopState) -> None:
    """A loop was collected: its counters go to the group's totals at the next prune().

    Takes no lock: it may run in any thread, at any allocation, the middle of
    stats() included.  The table stays in ``live`` until then.
    """
    reg = registry()
    if reg is not None:
        reg.dead.append(state.table)


def wake_in_loop(state: LoopState, here: bool, wake: Callable[[], object]) -> None:
    """Run ``wake`` now if in ``state``'s loop, else in its thread (futures and events
    of a loop are not thread-safe); nothing if the loop is gone."""
    if here:
        wake()
        return
    try:
        state.call_soon(wake)
    except RuntimeError:
        pass  # the loop or run ended: nobody waits in it any more


def asyncio_call_soon(loop: Any) -> Callable[[Callable[[], object]], object]:
    """``loop.call_soon_threadsafe`` without keeping ``loop`` alive."""
    ref = weakref.ref(loop)

    def call_soon(fn: Callable[[], object]) -> object:
        target = ref()
        if target is None:
            raise RuntimeError("the event loop is gone")
        return target.call_soon_threadsafe(fn)

    return call_soon


class LoopGroup(Generic[K, S]):
    """What the event-loop groups (AsyncGroup, AnyIOGroup) share: options, the
    registry of per-loop states, and the methods that only read or forget."""

    __slots__ = (
        "__weakref__",
        "_cancel_orphaned",
        "_limited",
        "_loader_timeout",
        "_loops",
        "_slow",
        "_timeout",
        "name",
    )

    # The state of one loop, made from its table and its loop (or trio run's root task).
    _make_state: Callable[[Table[Any], Any], S]

    def __init__(
        self,
        *,
        cancel_orphaned: bool = False,
        name: str = "default",
        on_event: EventHook | None = None,
        max_flights: int | None = None,
        on_limit: Literal["raise", "wait"] = "raise",
        timeout: float | None = None,
        loader_timeout: float | None = None,
    ) -> None:
        check_options(name, on_event, max_flights, on_limit, timeout)
        check_seconds("loader_timeout", loader_timeout)
        check_flag("cancel_orphaned", cancel_orphaned)
        self._cancel_orphaned = cancel_orphaned
        self.name = name
        self._timeout = timeout
        self._loader_timeout = loader_timeout
        self._limited = max_flights is not None
        # Limits, timeouts and events take the general path; without them the short one.
        self._slow = self._limited or any(
            option is not None for option in (on_event, timeout, loader_timeout)
        )
        make_table = partial(Table, name, on_event, max_flights, on_limit)
        make_state = self._make_state
        self._loops: Registry[S] = Registry(
            lambda token: make_state(make_table(), token), make_table()
        )

    def forget(self, key: K) -> None:
        """Let the next call of ``key`` start a new flight (see the contract).

        The flight in progress goes on for its callers and, when it ends, leaves
        the newer one alone; its slot under ``max_flights`` frees at once.  Acts on
        the running loop's (or trio run's) flights; outside any, on every one's.
        """
        for here, state in self._states_of_caller():
            if state.table.forget(key):
                wake_in_loop(state, here, state.free_slot)

    def forget_unshared(self, key: K) -> bool:
        """Forget ``key`` only if nobody joined its flight, as :meth:`forget` does.

        Returns True if forgotten or not in flight, False if the flight is shared
        (it is then left alone).
        """
        forgotten = True
        for here, state in self._states_of_caller():
            gone, dropped = state.table.forget_unshared(key)
            forgotten = gone and forgotten
            if dropped:
                wake_in_loop(state, here, state.free_slot)
        return forgotten

    def stats(self) -> GroupStats:
        """The group's counters, summed over its loops (see :class:`~singleflight.GroupStats`).

        ``timeouts`` counts callers that left at their ``timeout`` (loaders
        stopped by ``loader_timeout`` are ``errors``); ``rejected`` counts calls
        refused by ``max_flights``.
        """
        return self._loops.stats()

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is in flight in the running loop (outside any: in any)."""
        return any(key in state.table.calls for _, state in self._states_of_caller())

    def __len__(self) -> int:
        """The number of keys in flight, over every loop still alive."""
        return sum(len(state.table.calls) for state in self._loops.all())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} in_flight={len(self)}>"

    # -- the mechanism -------------------------------------------------------------

    @staticmethod
    def _token() -> object:
        """The running loop (or trio run); RuntimeError outside any."""
        raise NotImplementedError

    def _state_here(self) -> S:
        token = self._token()
        current = self._loops.current
        state = current[1] if current[0]() is token else self._loops.state_of(token)
        assert state is not None
        return state

    def _states_of_caller(self) -> list[tuple[bool, S]]:
        """The running loop's state, or every state outside any loop, each with
        whether it is the running loop's."""
        try:
            token = self._token()
        except RuntimeError:
            return [(False, state) for state in self._loops.all()]
        state = self._loops.get(token)
        return [] if state is None else [(True, state)]

    def _refuse(self, full: Full) -> Exception:
        """max_flights refused a call (counted by the table): tell it, return the error."""
        if full.event is not None:
            emit(self._state_here().table.hook, full.event)  # type: ignore[arg-type]
        assert full.error is not None
        return full.error

    def _timed_out(self, key: object, waited: float) -> NoReturn:
        table = self._state_here().table
        told = table.timed_out(key, waited)
        if told is not None:
            emit(table.hook, told)  # type: ignore[arg-type]
        raise WaitTimeoutError(key, self._timeout)
