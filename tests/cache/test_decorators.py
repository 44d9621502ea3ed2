"""The decorator wrappers: bound attributes, per-call control, per-entry policy, compiled
keys, removal events, fork."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import threading
from typing import Any

import pytest

from singleflight import CacheInfo, Group, cached, coalesce
from singleflight.events import CacheRemoved, Event

from .conftest import WAIT, FakeClock

pytestmark = pytest.mark.timeout(60)


# -- methods: attributes bound to the instance ----------------------------------------------


class Client:
    def __init__(self) -> None:
        self.loads: list[str] = []

    @cached
    def fetch(self, path: str) -> str:
        self.loads.append(path)
        return f"{path}#{len(self.loads)}"

    @classmethod  # below: types say kind.invalidate("x"), 3.13 wants the class too
    @cached
    def kind(cls, name: str) -> str:
        return f"{cls.__name__}:{name}"

    @cached  # above @classmethod: bound to the class on every Python
    @classmethod
    def label(cls, name: str) -> str:
        return f"{cls.__name__}={name}"


def test_invalidate_and_refresh_through_an_instance() -> None:
    client = Client()
    assert client.fetch("/a") == "/a#1"
    client.fetch.invalidate("/a")  # failed before: TypeError missing argument
    assert client.fetch("/a") == "/a#2"
    assert client.fetch.refresh("/a") == "/a#3"
    assert client.fetch("/a") == "/a#3"
    assert client.fetch.cache_key("/a") == Client.fetch.cache_key(client, "/a")
    assert client.fetch.uncached("/a") == "/a#4"
    assert client.fetch("/a") == "/a#3"
    other = Client()
    assert other.fetch("/a") == "/a#1"  # another instance, another key
    assert client.loads == ["/a"] * 4


def test_classmethod_attributes_are_bound_to_the_class() -> None:
    assert Client.kind("x") == "Client:x"
    assert Client.kind.cache_info().currsize == 1
    if sys.version_info < (3, 13):
        Client.kind.invalidate("x")  # classmethod passes attribute access through
    else:  # 3.13 removed that: below @classmethod the attributes are the function's
        Client.kind.invalidate(Client, "x")
    assert Client.kind.cache_info().currsize == 0
    assert Client.label("y") == Client().label("y") == "Client=y"
    assert Client.label.cache_info() == CacheInfo(hits=1, misses=1, maxsize=10_000, currsize=1)
    Client().label.invalidate("y")
    assert Client.label.cache_info().currsize == 0


class Units:
    @cached  # above @staticmethod: the function itself, never bound
    @staticmethod
    def double(x: int) -> int:
        return 2 * x

    @staticmethod
    @cached
    def triple(x: int) -> int:
        return 3 * x

    @coalesce
    @staticmethod
    async def halve(x: int) -> float:
        return x / 2

    @cached
    @classmethod
    def unit(cls, name: str) -> str:
        return f"{cls.__name__}.{name}"


class MoreUnits(Units):
    pass


def test_staticmethod_either_order_is_never_bound() -> None:
    units = Units()
    for method, factor in ((Units.double, 2), (Units.triple, 3)):
        assert method(2) == factor * 2
    assert units.double(2) == 4 and units.triple(2) == 6  # failed before: TypeError
    assert Units.double.cache_info() == CacheInfo(hits=1, misses=1, maxsize=10_000, currsize=1)
    units.double.invalidate(2)
    assert Units.double.cache_info().currsize == 0
    assert units.triple.refresh(2) == 6
    assert units.double.cache_key(2) == Units.double.cache_key(2)
    assert asyncio.run(units.halve(3)) == 1.5
    assert units.halve.cache_key(3) == Units.halve.cache_key(3)


def test_classmethod_of_a_subclass_is_keyed_apart() -> None:
    assert Units.unit("m") == Units().unit("m") == "Units.m"
    assert MoreUnits.unit("m") == MoreUnits().unit("m") == "MoreUnits.m"
    assert Units.unit.cache_info() == CacheInfo(hits=2, misses=2, maxsize=10_000, currsize=2)
    MoreUnits().unit.invalidate("m")
    assert Units.unit.cache_info().currsize == 1
    assert Units.unit.refresh("m") == "Units.m"


# -- functools' interface -------------------------------------------------------------------


def test_cache_info_clear_and_parameters() -> None:
    @cached(maxsize=32, typed=True)
    def square(x: float) -> float:
        return x * x

    assert square(3) == 9
    assert square(3) == 9
    assert square(3.0) == 9.0  # typed: another entry
    assert square.cache_info() == CacheInfo(hits=1, misses=2, maxsize=32, currsize=2)
    assert square.cache_parameters() == {"maxsize": 32, "typed": True}
    square.cache_clear()
    assert square.cache_info().currsize == 0
    assert square.cache_key(3) != square.cache_key(3.0)


def test_untyped_keys_equal_values_of_different_types_together() -> None:
    @cached
    def square(x: float) -> float:
        return x * x

    assert square(3) == 9 and square(3.0) == 9  # the entry of 3 answers 3.0
    assert square.cache_info().currsize == 1


# -- the cache's refresh through a decorator ------------------------------------------------


def test_cache_refresh_of_a_default_key_calls_the_function(caplog: Any) -> None:
    calls: list[tuple[int, str]] = []

    @cached
    def load(user_id: int, region: str = "eu") -> str:
        calls.append((user_id, region))
        return f"{user_id}/{region}/{len(calls)}"

    assert load(7) == "7/eu/1"
    with caplog.at_level(logging.WARNING, logger="singleflight"):
        assert load.cache.refresh(load.cache_key(7)) == "7/eu/2"  # was TypeError + warning
        with pytest.raises(TypeError, match="is not a key of"):
            load.cache.refresh((load.cache_key(7, "us")[0], 7))  # a key of another shape
    assert load(7) == "7/eu/2"
    assert not caplog.records
    assert load.cache.stats().load_failures == 0


def test_cache_refresh_with_make_key_fails_clearly(caplog: Any) -> None:
    @cached(make_key=lambda user_id: f"user:{user_id}")
    def load(user_id: int) -> int:
        return user_id

    load(1)
    with (
        caplog.at_level(logging.WARNING, logger="singleflight"),
        pytest.raises(TypeError, match="call the function instead"),
    ):
        load.cache.refresh("user:1")
    assert not caplog.records
    assert load.cache.stats().load_failures == 0


# -- per-call control -----------------------------------------------------------------------


def test_refresh_replaces_the_entry_and_is_coalesced() -> None:
    gate = threading.Event()
    started = threading.Event()
    calls: list[int] = []

    @cached
    def load(x: int) -> int:
        calls.append(x)
        if len(calls) > 1:
            started.set()
            assert gate.wait(WAIT)
        return len(calls)

    assert load(1) == 1
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(load.refresh(1))) for _ in range(2)]
    threads[0].start()
    assert started.wait(WAIT)
    threads[1].start()
    assert load(1) == 1  # answered from the entry meanwhile
    while load._shared.refresher.stats().joins < 1 and threads[1].is_alive():  # type: ignore[attr-defined]
        threads[1].join(0.002)
    gate.set()
    for t in threads:
        t.join(WAIT)
    assert results == [2, 2] and calls == [1, 1]
    assert load(1) == 2


def test_uncached_neither_reads_nor_writes() -> None:
    calls: list[int] = []

    @cached
    def load(x: int) -> int:
        calls.append(x)
        return len(calls)

    assert load.uncached(5) == 1
    assert load.cache_info().currsize == 0
    assert load(5) == 2
    assert load.uncached(5) == 3
    assert load(5) == 2


# -- per-entry policy ------------------------------------------------------------------------


def test_ttl_as_a_function_of_the_value() -> None:
    clock = FakeClock()
    calls: list[str] = []

    @cached(ttl=lambda token: token["expires_in"], jitter=0, clock=clock)
    def token(scope: str) -> dict[str, Any]:
        calls.append(scope)
        return {"scope": scope, "expires_in": 10 if scope == "short" else 100}

    token("short"), token("long")
    clock.advance(50)
    token("short"), token("long")
    assert calls == ["short", "long", "short"]


def test_negative_ttl_as_a_function_of_the_error() -> None:
    clock = FakeClock()
    calls: list[int] = []

    class Gone(Exception):
        def __init__(self, retry_after: float) -> None:
            super().__init__(retry_after)
            self.retry_after = retry_after

    @cached(negative=Gone, negative_ttl=lambda e: e.retry_after, jitter=0, clock=clock)
    def load(x: int) -> int:
        calls.append(x)
        raise Gone(5.0 * x)

    for _ in range(2):
        with pytest.raises(Gone):
            load(1)
        with pytest.raises(Gone):
            load(2)
    clock.advance(7)
    for x in (1, 2):
        with pytest.raises(Gone):
            load(x)
    assert calls == [1, 2, 1]


def test_cache_if_stores_only_what_passes_but_still_coalesces() -> None:
    gate = threading.Event()
    calls: list[int] = []

    @cached(cache_if=lambda value: value is not None)
    def find(x: int) -> int | None:
        calls.append(x)
        assert gate.wait(WAIT)
        return None if x < 0 else x

    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(find(-1))) for _ in range(3)]
    for t in threads:
        t.start()
    group = find.cache._group
    while group.stats().joins < 2 and any(t.is_alive() for t in threads):
        threads[0].join(0.002)
    gate.set()
    for t in threads:
        t.join(WAIT)
    assert results == [None] * 3 and calls == [-1]  # one call for three callers
    assert find.cache_info().currsize == 0  # not stored
    assert find(-1) is None and calls == [-1, -1]
    assert find(4) == 4 and find(4) == 4 and calls == [-1, -1, 4]


def test_a_ttl_function_returning_no_seconds_is_a_clear_error() -> None:
    @cached(ttl=lambda value: "soon")
    def load(x: int) -> int:
        return x

    with pytest.raises(TypeError, match=r"ttl\(value\) returned must be a number of seconds"):
        load(1)


# -- removal events --------------------------------------------------------------------------


def test_removal_events_say_why() -> None:
    clock = FakeClock()
    events: list[Event] = []

    @cached(ttl=10, jitter=0, maxsize=2, clock=clock, on_event=events.append)
    def load(x: int) -> int:
        return x * len(events)

    load(1), load(2), load(3)  # 3 evicts one of them for room
    load.refresh(3)  # replaced
    load.invalidate(3)  # invalidated
    survivor = next(x for x in (1, 2) if load.cache_key(x) in load.cache)
    clock.advance(11)
    load(survivor)  # expired, dropped when read
    removed = [(e.key, e.reason) for e in events if isinstance(e, CacheRemoved)]
    assert removed == [
        ({1, 2}.difference({survivor}).pop(), "size"),
        (3, "replaced"),
        (3, "invalidated"),
        (survivor, "expired"),
    ]


# -- keys ----------------------------------------------------------------------------------------


def test_a_hit_does_no_inspect_work(monkeypatch: Any) -> None:
    @cached(ttl=600)
    def load(user_id: int, region: str = "eu", limit: int = 10) -> tuple[int, str, int]:
        return (user_id, region, limit)

    load(7)

    def no_bind(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("inspect.Signature.bind called on a hit")

    monkeypatch.setattr(inspect.Signature, "bind", no_bind)
    monkeypatch.setattr(inspect.Signature, "bind_partial", no_bind)
    assert load(7) == load(user_id=7) == load(7, "eu", limit=10) == (7, "eu", 10)
    assert load.cache_info().hits == 3


def test_an_unkeyable_argument_names_its_parameter() -> None:
    class Opaque:
        __hash__ = None  # type: ignore[assignment]

    @cached
    def load(user_id: int, options: Any = None) -> int:
        return user_id

    @coalesce
    def share(user_id: int, options: Any = None) -> int:
        return user_id

    for fn in (load, share):
        with pytest.raises(TypeError, match=r"argument 'options' of .*\(\) is unhashable"):
            fn(1, options=Opaque())
    assert load(1, options={"a": [1]}) == 1  # frozen by content


def test_shared_group_keys_start_with_the_function_object() -> None:
    group: Group[Any, Any] = Group()

    def make(n: int) -> Any:
        @cached(group=group)
        def scaled(x: int) -> int:
            return x * n

        return scaled

    double, triple = make(2), make(3)
    assert double.cache_key(1)[0] is not triple.cache_key(1)[0]
    assert (double(1), triple(1)) == (2, 3)


# -- fork --------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads running
def test_background_refresh_runs_in_a_forked_child() -> None:
    clock = FakeClock()
    pids: list[int] = []
    refreshed = threading.Event()

    @cached(ttl=10, jitter=0, stale=100, clock=clock)
    def load(x: int) -> tuple[int, int]:
        pids.append(os.getpid())
        if len(pids) > 1:
            refreshed.set()
        return (x, os.getpid())

    assert load(1) == (1, os.getpid())
    clock.advance(11)
    assert load(1) == (1, os.getpid())  # stale: a refresh runs in the parent's pool
    assert refreshed.wait(WAIT)
    clock.advance(11)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running the parent's cleanup
        code = 1
        try:
            refreshed.clear()
            load(1)  # stale: starts a refresh in the child
            if refreshed.wait(WAIT) and load.cache.stats().refreshes == 2:
                code = 0
        finally:
            os.write(write, bytes([code]))
            os._exit(code)
    os.close(write)
    try:
        status = os.read(read, 1)
    finally:
        os.close(read)
        _, exit_status = os.waitpid(pid, 0)
    assert status == b"\x00", "the child's background refresh never ran"
    assert os.waitstatus_to_exitcode(exit_status) == 0
    load.cache.close()
