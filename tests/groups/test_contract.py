"""The contract every group keeps, written once and run against each of them.

The drivers (see conftest.py): ``Group`` (threads), ``AsyncGroup``, ``AnyIOGroup`` on asyncio
and on trio, ``RedisGroup`` and ``AsyncRedisGroup`` (against the Redis on 127.0.0.1:6379, a
namespace per test, no result kept in Redis).  The first tests are Go's singleflight tests
(TestDo, TestDoErr, TestDoDupSuppress, TestForget, TestDoChan, the panic tests with
``BaseException`` for panics, and Go issue 31420); the rest are this project's own.  Tests
that concern one driver only live in that driver's file.

Callers overlap because the test makes them: a loader waits at a gate the test opens, and a
joiner is known to have joined from the group's ``Joined`` event.  Nothing sleeps.
"""

from __future__ import annotations

import gc
import traceback
import weakref
from typing import Any

import pytest

from singleflight import AbortedError

from .._support import Boom, Stop, Token, same_error
from .conftest import Driver

pytestmark = pytest.mark.timeout(30)

ENTRIES = ["do", "do_result", "do_future"]


# -- Go's tests ----------------------------------------------------------------------------


def test_do_returns_the_loaders_value_with_its_type(driver: Driver) -> None:
    """Go's TestDo: the caller gets the loader's value, type unchanged, and no error."""

    async def main() -> None:
        g = driver.group()
        v = await driver.do(g, "key", driver.fn(lambda: "bar"))
        assert (v, type(v)) == ("bar", str)
        assert len(g) == 0

    driver.run(main)


@pytest.mark.parametrize("entry", ENTRIES)
def test_loader_exception_reaches_the_caller_that_started_the_flight_as_itself(
    driver: Driver, entry: str
) -> None:
    """Go's TestDoErr and TestPanicErrorUnwrap: the very exception raised, cause included.

    A redis group's caller may get an equal copy (the value crossed Redis), cause included.
    """
    original = ValueError("error value")
    error = Boom("Some error")
    error.__cause__ = original

    async def main() -> None:
        g = driver.group()
        seen = await driver.call(entry, g, "key", driver.loader(raises=error))
        if driver.redis:
            assert same_error(seen.error, error)
        else:
            assert seen.error is error
        assert seen.error is not None and seen.error.__cause__ is original
        assert seen.value is None
        if entry == "do_result":
            assert seen.shared is False
        assert "key" not in g

    driver.run(main)


@pytest.mark.parametrize("leader", ENTRIES)
def test_concurrent_callers_of_a_key_share_one_loader_run(driver: Driver, leader: str) -> None:
    """Go's TestDoDupSuppress: joiners of every entry point share the leader's one run.

    Every caller gets the same object; a joiner's own loader never runs.
    """

    async def main() -> None:
        g = driver.group()
        gate = driver.gate()
        loader = driver.loader(gate=gate)
        first = await driver.lead(g, "key", loader, leader)
        joiners = [await driver.join(g, "key", entry) for entry in ENTRIES * 3]
        assert "key" in g and len(g) == 1
        assert "in_flight=1" in repr(g)
        assert not first.done()
        gate.open()
        outcomes = [await call.outcome() for call in [first, *joiners]]
        assert loader.calls == 1
        assert [o.error for o in outcomes] == [None] * len(outcomes)
        assert all(o.value is loader.value for o in outcomes)
        assert len(g) == 0

    driver.run(main)


@pytest.mark.parametrize("ending", ["value", "error", "base-exception"])
def test_a_forgotten_flight_ending_leaves_the_newer_flight_in_place(
    driver: Driver, ending: str
) -> None:
    """Go's TestForget and Go issue 31420: forget lets the next caller start a new flight.

    The forgotten flight's callers, joined before the forget, still get its outcome; when
    it ends (whatever way) the newer flight stays registered, and a later caller joins it.
    """

    async def main() -> None:
        g = driver.group()
        gate1, gate2 = driver.gate(), driver.gate()
        raises = {"value": None, "error": Boom("old"), "base-exception": Stop()}[ending]
        old = driver.loader(gate=gate1, raises=raises)
        first = await driver.lead(g, "key", old)
        early = await driver.join(g, "key", "do_result")
        assert g.stats().joins == 1
        g.forget("key")
        assert "key" not in g
        assert g.stats().joins == 1, "a forgotten flight's joins are still counted"

        new = driver.loader(gate=gate2)
        second = await driver.lead(g, "key", new, "do_future")
        gate1.open()
        seen = await early.outcome()
        await first.outcome()
        assert "key" in g, "the forgotten flight's end removed the newer flight"
        third = await driver.join(g, "key", "do_future")
        assert g.stats().joins == 2
        gate2.open()
        assert await second.result() is new.value
        assert await third.result() is new.value
        assert (old.calls, new.calls) == (1, 1)
        stats = g.stats()
        assert (stats.flights, stats.joins, stats.calls, stats.shared) == (2, 2, 4, 2)
        assert seen.shared is True
        if ending == "value":
            assert seen.value is old.value
        elif ending == "error":
            assert raises is not None and same_error(seen.error, raises)
        else:
            assert isinstance(seen.error, AbortedError)
            assert seen.error.__cause__ is raises
        assert len(g) == 0

    driver.run(main)


def test_do_future_returns_at_once_and_delivers_the_value(driver: Driver) -> None:
    """Go's TestDoChan: do_future returns before the loader ends; its future gets the value."""

    async def main() -> None:
        g = driver.group()
        gate = driver.gate()
        started: list[bool] = []
        loader = driver.fn(lambda: started.append(True) or "bar", gate=gate)
        call = driver.start("do_future", g, "key", loader)
        assert not call.done()
        joiner = await driver.join(g, "key", "do_future")
        assert not call.done() and not joiner.done()
        gate.open()
        v = await call.result()
        assert (v, type(v)) == ("bar", str)
        assert await joiner.result() is v
        assert started == [True]
        assert len(g) == 0

    driver.run(main)


@pytest.mark.parametrize("leader", ENTRIES)
def test_a_loaders_exception_reaches_every_caller_as_its_own_equal_copy(
    driver: Driver, leader: str
) -> None:
    """Go's TestPanicDo, TestPanicDoChan, TestPanicDoSharedByDoChan, with an Exception.

    Whoever leads, every caller gets the loader's exception, and nobody hangs: at most
    one caller (the one that started the flight) the object itself, every other an equal
    copy of its own: same type, args and cause, and the loader's own frame in its
    traceback.  So one caller's handling (``raise`` inside an ``except`` block sets
    ``__context__``, each raise grows the traceback) never shows in another's.
    """
    original = ValueError("the cause")
    error = Boom("Panicking")
    error.__cause__ = original

    async def main() -> None:
        g = driver.group()
        gate = driver.gate()
        first = await driver.lead(g, "key", driver.loader(gate=gate, raises=error), leader)
        joiners = [await driver.join(g, "key", entry) for entry in ENTRIES]
        gate.open()
        seen = [await call.error() for call in [first, *joiners]]
        assert all(same_error(e, error) for e in seen), seen
        assert all(e.__cause__ is original for e in seen)
        assert len({id(e) for e in seen}) == len(seen), "two callers share one object"
        assert sum(e is error for e in seen) <= 1
        if not driver.redis:
            # Where the loader raised: the innermost frame of every caller's traceback.
            innermost = {tuple(traceback.extract_tb(e.__traceback__)[-1]) for e in seen}
            assert len(innermost) == 1, innermost
        assert "key" not in g

    driver.run(main)


@pytest.mark.parametrize("leader", ENTRIES)
def test_a_loader_ended_by_a_base_exception_gives_every_waiter_aborted_error(
    driver: Driver, leader: str
) -> None:
    """Go's TestGoexitDo and TestPanicDo with a BaseException for the panic.

    The loader ends without a result: a caller running the loader in its own thread sees
    the BaseException itself; every other caller gets AbortedError caused by it.  The key
    is free at once.
    """
    stop = Stop()

    async def main() -> None:
        g = driver.group()
        gate = driver.gate()
        first = await driver.lead(g, "key", driver.loader(gate=gate, raises=stop), leader)
        joiners = [await driver.join(g, "key", entry) for entry in ENTRIES]
        gate.open()
        seen = await first.error()
        if driver.leader_runs_loader and leader != "do_future":
            assert seen is stop
        else:
            assert isinstance(seen, AbortedError) and seen.__cause__ is stop
        for call in joiners:
            error = await call.error()
            assert isinstance(error, AbortedError), error
            assert error.__cause__ is stop
        assert "key" not in g
        assert await driver.do(g, "key", driver.fn(lambda: "again")) == "again"

    driver.run(main)


# -- this project's contract ---------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
def test_calls_one_after_another_each_run_the_loader(driver: Driver, entry: str) -> None:
    """A group is not a cache: each call made after the previous one ended runs the loader."""

    async def main() -> None:
        g = driver.group()
        loader = driver.loader()
        for _ in range(3):
            seen = await driver.call(entry, g, "key", loader)
            assert seen.error is None
            if entry == "do_result":
                assert seen.shared is False
        assert loader.calls == 3
        assert len(g) == 0

    driver.run(main)


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_key_is_free_again_after_a_failed_flight(driver: Driver, entry: str) -> None:
    """A failure is not kept: the very next call of the key runs its loader and succeeds."""

    async def main() -> None:
        g = driver.group()
        failing = driver.loader(raises=Boom("once"))
        assert isinstance((await driver.call(entry, g, "key", failing)).error, Boom)
        assert "key" not in g
        loader = driver.loader()
        seen = await driver.call(entry, g, "key", loader)
        assert seen.error is None and seen.value is loader.value
        assert (failing.calls, loader.calls) == (1, 1)

    driver.run(main)


def test_shared_is_false_alone_and_true_for_every_caller_of_a_shared_flight(
    driver: Driver,
) -> None:
    """``Result.shared``: False for a lone caller; True for each, the leader included, when
    two or more callers shared a flight (whatever entry point the others used)."""

    async def main() -> None:
        g = driver.group()
        alone = await driver.call("do_result", g, "key", driver.loader())
        assert alone.shared is False

        gate = driver.gate()
        loader = driver.loader(gate=gate)
        first = await driver.lead(g, "key", loader, "do_result")
        second = await driver.join(g, "key", "do_result")
        future = await driver.join(g, "key", "do_future")
        gate.open()
        for call in (first, second):
            seen = await call.outcome()
            assert seen.value is loader.value and seen.shared is True
        assert await future.result() is loader.value

        gate2 = driver.gate()
        led_by_future = driver.loader(gate=gate2)
        future = await driver.lead(g, "key", led_by_future, "do_future")
        joiner = await driver.join(g, "key", "do_result")
        gate2.open()
        seen = await joiner.outcome()
        assert seen.value is led_by_future.value and seen.shared is True
        assert await future.result() is led_by_future.value

        gate2 = driver.gate()
        failing = driver.loader(gate=gate2, raises=Boom("shared failure"))
        first = await driver.lead(g, "key", failing, "do_result")
        await driver.join(g, "key", "do_future")
        gate2.open()
        seen = await first.outcome()
        assert isinstance(seen.error, Boom) and seen.shared is True

    driver.run(main)


def test_the_key_is_out_of_the_group_when_any_caller_sees_the_outcome(driver: Driver) -> None:
    """The flight leaves the group before any caller sees its outcome, so a caller that
    calls again at once starts a new flight rather than get the old outcome."""

    async def main() -> None:
        g = driver.group()
        gate = driver.gate()
        loader = driver.loader(gate=gate)
        saw_key: list[bool] = []

        def caller(entry: str, fn: Any) -> Any:
            if driver.is_async:

                async def call_async() -> Any:
                    got = await getattr(g, entry)("key", fn)
                    saw_key.append("key" in g)
                    return got

                return call_async

            def call() -> Any:
                got = getattr(g, entry)("key", fn)
                saw_key.append("key" in g)
                return got

            return call

        first = driver.start_fn(caller("do", loader))
        await loader.started_async()
        joiners = [driver.start_fn(caller(e, driver.never_called)) for e in ("do", "do_result")]
        await driver.joined(g, "key", 2)
        gate.open()
        for call in [first, *joiners]:
            await call.result()
        assert saw_key == [False] * 3
        again = driver.loader()
        assert await driver.do(g, "key", again) is again.value
        assert (loader.calls, again.calls) == (1, 1)

    driver.run(main)


def test_a_caller_calling_again_at_once_starts_a_new_flight(driver: Driver) -> None:
    """A caller that, on getting its outcome, calls again at once never gets the finished
    flight's outcome: its second call runs the loader again."""

    async def main() -> None:
        g = driver.group()
        gate = driver.gate()
        loader = driver.loader(gate=gate)
        first = await driver.lead(g, "key", loader)
        joiners = [await driver.join(g, "key", entry) for entry in ENTRIES]
        gate.open()
        for call in [first, *joiners]:
            assert (await call.outcome()).value is loader.value
        assert "key" not in g
        again = driver.loader()
        assert await driver.do(g, "key", again) is again.value
        assert (loader.calls, again.calls) == (1, 1)

    driver.run(main)


def test_forget_unshared_forgets_only_a_flight_nobody_joined(driver: Driver) -> None:
    """Go's TestForgetUnshared: ``forget_unshared`` is True for a key not in flight, and for
    a flight nobody joined (it is forgotten); False for a shared flight (kept), also after an
    older, forgotten flight of the key has ended.  ``forget`` of an unknown key, or twice,
    does nothing."""

    async def main() -> None:
        g = driver.group()
        assert g.forget_unshared("absent") is True
        g.forget("absent")
        g.forget("absent")
        assert len(g) == 0

        gate1, gate2 = driver.gate(), driver.gate()
        lone = driver.loader(gate=gate1)
        first = await driver.lead(g, "key", lone)
        assert g.forget_unshared("key") is True
        assert "key" not in g

        shared = driver.loader(gate=gate2)
        second = await driver.lead(g, "key", shared)
        joiner = await driver.join(g, "key", "do_future")
        assert g.forget_unshared("key") is False, "shared, while the forgotten flight runs"
        gate1.open()
        assert await first.result() is lone.value
        assert g.forget_unshared("key") is False, "shared, after the forgotten flight ended"
        assert "key" in g
        gate2.open()
        assert await second.result() is shared.value
        assert await joiner.result() is shared.value
        assert g.forget_unshared("key") is True
        assert len(g) == 0

    driver.run(main)


def test_a_loader_may_forget_its_own_key_and_call_other_keys(driver: Driver) -> None:
    """No lock is held while a loader runs: it may forget its own key (then calling that key
    starts a new flight, no re-entry, and so does the next caller, alongside) and call other
    keys of the same group."""

    async def main() -> None:
        g = driver.group()
        gate = driver.gate()
        inner_values: list[Any] = []

        if driver.is_async:

            async def outer() -> str:
                g.forget("outer")
                inner_values.append(await g.do("outer", driver.fn(lambda: "own")))
                inner_values.append(await g.do("inner", driver.fn(lambda: "i")))
                await gate.wait_async()
                return "o"

        else:

            def outer() -> str:
                g.forget("outer")
                inner_values.append(g.do("outer", lambda: "own"))
                inner_values.append(g.do("inner", lambda: "i"))
                gate.wait()
                return "o"

        first = driver.start("do", g, "outer", outer)
        await driver.until(lambda: len(inner_values) == 2)
        assert "outer" not in g
        second = driver.loader()
        assert await driver.do(g, "outer", second) is second.value
        gate.open()
        assert await first.result() == "o"
        assert inner_values == ["own", "i"]
        assert len(g) == 0

    driver.run(main)


@pytest.mark.parametrize("entry", ENTRIES)
def test_different_keys_never_wait_for_each_other(driver: Driver, entry: str) -> None:
    """While a flight of one key waits, calls of another key start and end."""

    async def main() -> None:
        g = driver.group()
        gate = driver.gate()
        blocked = await driver.lead(g, "a", driver.loader(gate=gate))
        loader = driver.loader()
        seen = await driver.call(entry, g, "b", loader)
        assert seen.value is loader.value
        assert "a" in g and "b" not in g and len(g) == 1
        gate.open()
        await blocked.result()
        assert len(g) == 0

    driver.run(main)


def test_the_loader_gets_the_leaders_arguments(driver: Driver) -> None:
    """``fn(*args, **kwargs)``, even keyword arguments named key or fn; a joiner's own
    arguments are never used."""

    async def main() -> None:
        g = driver.group()
        gate = driver.gate()
        loader = driver.loader(gate=gate)
        first = driver.start("do", g, "key", loader, 1, "two", key="k", fn="f")
        await loader.started_async()
        joiner = driver.start("do", g, "key", driver.never_called, 3, fn="other")
        await driver.joined(g, "key", 1)
        gate.open()
        assert await first.result() is loader.value
        assert await joiner.result() is loader.value
        assert loader.args == [((1, "two"), {"key": "k", "fn": "f"})]

    driver.run(main)


KEYS: list[Any] = [0, 42, -1.5, ("t", 1), None, "", b"", frozenset({1, 2})]


@pytest.mark.parametrize("key", KEYS, ids=repr)
def test_any_hashable_key_coalesces_and_is_released(driver: Driver, key: Any) -> None:
    """Any hashable key (None and "" included) coalesces its callers and leaves the group
    when its flight ends.  Redis groups take str, int and tuple keys (their Redis names)."""
    if driver.redis and not isinstance(key, str | int | tuple):
        pytest.skip("Redis groups take str, int and tuple keys")

    async def main() -> None:
        g = driver.group()
        gate = driver.gate()
        loader = driver.loader(gate=gate)
        first = await driver.lead(g, key, loader)
        assert key in g
        joiner = await driver.join(g, key, "do_future")
        gate.open()
        assert await first.result() is loader.value
        assert await joiner.result() is loader.value
        assert key not in g and len(g) == 0

    driver.run(main)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("key", [[1], {"a": 1}, {1}, ("t", [1])], ids=repr)
def test_an_unhashable_key_is_a_type_error_before_the_loader_runs(
    driver: Driver, entry: str, key: Any
) -> None:
    """An unhashable key raises TypeError; the loader never runs and nothing is in flight."""

    async def main() -> None:
        g = driver.group()
        loader = driver.loader()
        try:
            seen = await driver.call(entry, g, key, loader)
            error = seen.error
        except TypeError as exc:  # raised by the call itself (do_future)
            error = exc
        assert isinstance(error, TypeError), error
        assert loader.calls == 0
        assert len(g) == 0
        assert g.stats().calls == 0

    driver.run(main)


@pytest.mark.parametrize("inner", ["do", "do_result"])
@pytest.mark.parametrize("outer", ENTRIES)
def test_a_loader_calling_its_own_key_gets_runtime_error(
    driver: Driver, outer: str, inner: str
) -> None:
    """A loader calling do/do_result on the key it is loading would wait for itself: it gets
    RuntimeError naming the key at once, and the inner loader never runs."""
    key = ("self", 1)

    async def main() -> None:
        g = driver.group()
        inner_loader = driver.loader()
        errors: list[BaseException | None] = []

        if driver.is_async:

            async def loader() -> str:
                try:
                    await getattr(g, inner)(key, inner_loader)
                except RuntimeError as exc:
                    errors.append(exc)
                else:
                    errors.append(None)
                return "outer"

        else:

            def loader() -> str:
                try:
                    getattr(g, inner)(key, inner_loader)
                except RuntimeError as exc:
                    errors.append(exc)
                else:
                    errors.append(None)
                return "outer"

        assert (await driver.call(outer, g, key, loader)).value == "outer"
        assert len(errors) == 1 and isinstance(errors[0], RuntimeError), errors
        assert repr(key) in str(errors[0])
        assert inner_loader.calls == 0
        assert len(g) == 0

    driver.run(main)


@pytest.mark.parametrize("ending", ["value", "error", "base-exception"])
def test_a_finished_flight_leaves_no_reference_to_its_outcome(driver: Driver, ending: str) -> None:
    """Nothing keeps a finished flight's value or exception alive (weak references die)."""
    if driver.redis:
        pytest.skip("a Redis group's values are JSON, which takes no weak references")
    refs: list[weakref.ref[Any]] = []

    class Failure(Boom):
        pass

    class Ended(Stop):
        pass

    async def main() -> None:
        g = driver.group()
        gate = driver.gate()

        if driver.is_async:

            async def loader() -> Any:
                await gate.wait_async()
                return make()

        else:

            def loader() -> Any:
                gate.wait()
                return make()

        def make() -> Any:
            obj: Any = {"value": Token, "error": Failure, "base-exception": Ended}[ending]()
            refs.append(weakref.ref(obj))
            if isinstance(obj, BaseException):
                raise obj
            return obj

        calls = [driver.start("do", g, "key", loader)]
        await driver.until(lambda: "key" in g)
        calls += [await driver.join(g, "key", entry) for entry in ENTRIES]
        gate.open()
        for call in calls:
            await call.outcome()
        calls.clear()
        assert len(g) == 0

    driver.run(main)
    gc.collect()  # this test measures what stays alive
    assert len(refs) == 1
    assert refs[0]() is None, f"the flight's {ending} is still referenced"
