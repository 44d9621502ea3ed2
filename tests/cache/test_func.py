"""The decorators (coalesce, cached) and the keys they build from arguments."""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import os
import textwrap
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from singleflight import AsyncGroup, AsyncLoadingCache, Group, LoadingCache, cached, coalesce
from singleflight.keys import KeyBuilder, freeze

from .conftest import WAIT, FakeClock, wait_for

pytestmark = pytest.mark.timeout(60)


def run_threads(n: int, target: Any) -> list[Any]:
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def one(i: int) -> None:
        barrier.wait(WAIT)
        results[i] = target(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    return results


# -- keys ---------------------------------------------------------------------------------


def test_positional_and_keyword_spellings_give_one_key() -> None:
    def f(a: int, b: int = 2, *, c: str = "x") -> None: ...

    key = KeyBuilder(f)
    spellings = [
        ((1,), {}),
        ((1, 2), {}),
        ((1,), {"b": 2}),
        ((), {"a": 1, "b": 2}),
        ((), {"b": 2, "a": 1, "c": "x"}),
    ]
    assert len({key(args, kwargs) for args, kwargs in spellings}) == 1
    assert key((1, 3), {}) != key((1,), {})
    assert key((1,), {"c": "y"}) != key((1,), {})


def test_var_args_and_kwargs_are_part_of_the_key() -> None:
    def f(a: int, *rest: int, **options: int) -> None: ...

    key = KeyBuilder(f)
    assert key((1, 2, 3), {"x": 1, "y": 2}) == key((1, 2, 3), {"y": 2, "x": 1})
    assert key((1, 2), {}) != key((1, 2, 3), {})
    assert key((1,), {"x": 1}) != key((1,), {"x": 2})


def test_bad_calls_raise_what_the_call_would() -> None:
    def f(a: int) -> None: ...

    with pytest.raises(TypeError, match=r"f\(\) missing 1 required positional argument: 'a'"):
        KeyBuilder(f)((), {})
    with pytest.raises(TypeError, match="unexpected keyword argument 'b'"):
        KeyBuilder(f)((1,), {"b": 2})


def test_unhashable_arguments_are_frozen_by_content() -> None:
    def f(x: Any) -> None: ...

    key = KeyBuilder(f)
    assert key(([1, [2, 3]],), {}) == key(([1, [2, 3]],), {})
    assert key(({"a": [1], "b": {2}},), {}) == key(({"b": {2}, "a": [1]},), {})
    assert key(([1, 2],), {}) != key(((1, 2),), {})  # a list is not the tuple of its items
    assert key(([1, 2],), {}) != key(([2, 1],), {})
    assert key((bytearray(b"ab"),), {}) == key((bytearray(b"ab"),), {})
    assert key(((1, [2]),), {}) == key(((1, [2]),), {})
    hash(key(({"a": [1]},), {}))


def test_an_unhashable_argument_that_cannot_be_frozen_asks_for_key() -> None:
    class Opaque:
        __hash__ = None  # type: ignore[assignment]

    def f(thing: Any) -> None: ...

    with pytest.raises(TypeError, match=r"argument 'thing' of .*f\(\) is unhashable .*make_key="):
        KeyBuilder(f)((Opaque(),), {})
    with pytest.raises(TypeError, match="pass make_key="):
        freeze([Opaque()])


def test_self_is_keyed_by_identity() -> None:
    @dataclass  # eq=True and not frozen: equal instances, and unhashable
    class Account:
        number: int

        def balance(self, day: int) -> None: ...

    key = KeyBuilder(Account.balance)
    a, b = Account(1), Account(1)
    assert a == b
    assert key((a, 5), {}) == key((a,), {"day": 5})
    assert key((a, 5), {}) != key((b, 5), {})


def test_a_self_key_does_not_keep_the_instance_alive() -> None:
    class Thing:
        def m(self) -> None: ...

    thing = Thing()
    builder = KeyBuilder(Thing.m)
    identity = builder((thing,), {})  # a lone parameter is the key itself
    ref = weakref.ref(thing)
    del thing
    gc.collect()
    assert ref() is None
    assert "Thing" in repr(identity) or "NoneType" in repr(identity)
    assert identity != builder((Thing(),), {})


# -- coalesce -------------------------------------------------------------------------------


def test_coalesce_shares_concurrent_calls_with_equal_arguments() -> None:
    calls: list[tuple[int, int]] = []

    @coalesce
    def load(a: int, b: int = 0) -> tuple[int, int]:
        calls.append((a, b))
        time.sleep(0.1)
        return (a, b)

    spellings = [lambda: load(1), lambda: load(1, 0), lambda: load(a=1, b=0), lambda: load(2)]
    results = run_threads(40, lambda i: spellings[i % 4]())
    assert sorted(set(calls)) == [(1, 0), (2, 0)] and len(calls) == 2
    assert results.count((1, 0)) == 30 and results.count((2, 0)) == 10
    assert load(1) == (1, 0) and len(calls) == 3  # not a cache: a later call runs again


def test_coalesce_keeps_metadata_and_signature() -> None:
    def load(user_id: int, *, fresh: bool = False) -> str:
        """Load a user."""
        return str(user_id)

    wrapped = coalesce(load)
    assert wrapped.__name__ == "load" and wrapped.__doc__ == "Load a user."
    assert wrapped.__wrapped__ is load  # type: ignore[attr-defined]
    assert inspect.signature(wrapped) == inspect.signature(load)
    assert isinstance(wrapped.group, Group)  # type: ignore[attr-defined]


def test_a_bound_wrapper_has_the_bound_signature() -> None:
    """inspect.signature (help(), IDEs, frameworks reading a callable's parameters) of a
    method reached through an instance, or a classmethod, leaves out self/cls, as for
    a plain bound method; failed before: the function's own, with self/cls."""

    class Service:
        @cached
        def find(self, name: str, *, limit: int = 1) -> int:
            return len(name)

        @coalesce
        async def afind(self, name: str) -> int:
            return len(name)

        @cached
        @classmethod
        def kind(cls, name: str) -> str:
            return name

    plain = inspect.signature(lambda name, *, limit=1: 0).parameters.keys()
    service = Service()
    assert inspect.signature(service.find).parameters.keys() == plain
    assert list(inspect.signature(service.afind).parameters) == ["name"]
    assert list(inspect.signature(Service.kind).parameters) == ["name"]
    assert list(inspect.signature(service.kind).parameters) == ["name"]
    assert list(inspect.signature(Service.find).parameters) == ["self", "name", "limit"]


@pytest.mark.parametrize("decorator", [cached, coalesce])
def test_an_option_given_positionally_says_options_are_keywords(decorator: Any) -> None:
    with pytest.raises(TypeError, match="keyword"):
        decorator(60)


def test_coalesce_detects_coroutine_functions() -> None:
    calls: list[int] = []

    @coalesce(make_key=lambda user_id: f"user:{user_id}")
    async def fetch(user_id: int) -> str:
        calls.append(user_id)
        await asyncio.sleep(0.05)
        return f"u{user_id}"

    assert inspect.iscoroutinefunction(fetch)
    assert fetch.group is not None

    async def main() -> list[str]:
        return await asyncio.gather(*(fetch(i % 2) for i in range(50)), fetch(user_id=1))

    results = asyncio.run(main())
    assert results.count("u0") == 25 and results.count("u1") == 26
    assert sorted(calls) == [0, 1]


def test_coalesce_with_a_key_function_and_a_shared_group() -> None:
    group: Group[Any, Any] = Group()
    calls: list[str] = []

    @coalesce(group=group)
    def a(x: int) -> str:
        calls.append("a")
        time.sleep(0.1)
        return "a"

    @coalesce(group=group)
    def b(x: int) -> str:
        calls.append("b")
        time.sleep(0.1)
        return "b"

    # One group, equal arguments, different functions: kept apart by the key prefix.
    results = run_threads(20, lambda i: (a if i % 2 else b)(1))
    assert sorted(calls) == ["a", "b"]
    assert results.count("a") == 10 and results.count("b") == 10

    merged: list[int] = []

    @coalesce(make_key=lambda x, y: x)  # the key function decides: y is ignored
    def c(x: int, y: int) -> int:
        merged.append(y)
        time.sleep(0.1)
        return y

    results = run_threads(10, lambda i: c(1, i))
    assert len(merged) == 1 and set(results) == {merged[0]}


def test_coalesce_on_methods_never_shares_between_instances() -> None:
    @dataclass
    class Client:
        name: str

        @coalesce
        def fetch(self, path: str) -> str:
            calls.append((id(self), path))
            time.sleep(0.1)
            return f"{self.name}:{path}"

    calls: list[tuple[int, str]] = []
    first, second = Client("x"), Client("x")
    results = run_threads(20, lambda i: (first if i % 2 else second).fetch("/a"))
    assert len(calls) == 2 and {c[0] for c in calls} == {id(first), id(second)}
    assert set(results) == {"x:/a"}


def test_coalesce_errors_reach_every_caller_and_are_not_kept() -> None:
    calls = [0]

    @coalesce
    def flaky(x: int) -> int:
        calls[0] += 1
        time.sleep(0.1)
        raise ValueError("no")

    results = run_threads(10, lambda i: _outcome(lambda: flaky(1)))
    assert all(isinstance(r, ValueError) for r in results)
    assert calls[0] == 1
    with pytest.raises(ValueError):
        flaky(1)
    assert calls[0] == 2


def _outcome(fn: Any) -> Any:
    try:
        return fn()
    except Exception as exc:
        return exc


@pytest.mark.parametrize("decorator", [coalesce, cached])
def test_decorators_refuse_what_they_cannot_wrap(decorator: Any) -> None:
    name = decorator.__name__

    def gen() -> Any:
        yield 1

    async def agen() -> Any:
        yield 1

    with pytest.raises(TypeError, match="generator function"):
        decorator(gen)
    with pytest.raises(TypeError, match="generator function"):
        decorator(agen)
    with pytest.raises(TypeError, match=f"@{name} needs a function"):
        decorator(42)
    with pytest.raises(TypeError, match=f"@{name} needs a function"):
        decorator(staticmethod(42))
    with pytest.raises(TypeError, match="generator function"):
        decorator(classmethod(gen))
    with pytest.raises(TypeError, match="needs an AsyncGroup"):

        @decorator(group=Group())
        async def a() -> None: ...

    with pytest.raises(TypeError, match="needs a thread Group"):

        @decorator(group=AsyncGroup())
        def s() -> None: ...

    with pytest.raises(TypeError, match="make_key= must be a function"):
        decorator(make_key="user")(lambda: 1)


def test_unhashable_arguments_without_a_key_function() -> None:
    class Opaque:
        __hash__ = None  # type: ignore[assignment]

    @coalesce
    def f(x: Any) -> Any:
        return x

    assert f([1, 2]) == [1, 2]
    assert f({"a": [1]}) == {"a": [1]}
    with pytest.raises(TypeError, match="pass make_key="):
        f(Opaque())


# -- cached -----------------------------------------------------------------------------------


def test_cached_sync_function() -> None:
    clock = FakeClock()
    calls: list[int] = []

    @cached(ttl=30.0, jitter=0.0, clock=clock)
    def load(user_id: int, detail: bool = False) -> str:
        """Load one user."""
        calls.append(user_id)
        time.sleep(0.05)
        return f"u{user_id}"

    assert load.__name__ == "load" and load.__doc__ == "Load one user."
    results = run_threads(20, lambda i: load(1) if i % 2 else load(user_id=1, detail=False))
    assert results == ["u1"] * 20 and calls == [1]
    cache: LoadingCache[Any, str] = load.cache  # type: ignore[attr-defined]
    assert isinstance(cache, LoadingCache)
    assert load(1) == "u1" and calls == [1]
    clock.advance(30.0)
    assert load(1) == "u1" and calls == [1, 1]
    load.invalidate(1)  # type: ignore[attr-defined]
    assert load(1, False) == "u1" and calls == [1, 1, 1]
    assert load.cache_key(1) == load.cache_key(user_id=1, detail=False)  # type: ignore[attr-defined]
    stats = cache.stats()
    assert (stats.loads, stats.misses, stats.hits) == (3, 22, 1)
    with pytest.raises(TypeError, match=r"is not a key of .*load\(\)"):
        cache.get((load.cache_key(1, True)[0], "not", "a", "call"))
    assert cache.get(load.cache_key(1)) == "u1"  # a default key stands for its call
    cache.close()


def test_cached_async_function_with_stale_while_revalidate() -> None:
    clock = FakeClock()
    version = [0]

    @cached(ttl=30.0, stale=60.0, jitter=0.0, clock=clock)
    async def fetch_profile(user_id: int) -> str:
        version[0] += 1
        await asyncio.sleep(0.01)
        return f"p{user_id}.{version[0]}"

    assert inspect.iscoroutinefunction(fetch_profile)

    async def main() -> None:
        cache: AsyncLoadingCache[Any, str] = fetch_profile.cache  # type: ignore[attr-defined]
        assert await fetch_profile(7) == "p7.1"
        clock.advance(31.0)
        assert await fetch_profile(7) == "p7.1"  # stale, served at once
        async with asyncio.timeout(WAIT):
            while await fetch_profile(7) != "p7.2":  # refreshed in the background
                await asyncio.sleep(0.005)
        stats = cache.stats()
        assert (stats.refreshes, stats.loads) == (1, 2)
        await cache.aclose()

    asyncio.run(main())


def test_cached_bare_decorator_has_no_expiry() -> None:
    calls: list[int] = []

    @cached
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    assert [square(3), square(3), square(x=3)] == [9, 9, 9]
    assert calls == [3]


def test_cached_methods_keep_instances_apart_and_alive_only_in_use() -> None:
    calls: list[str] = []

    class Repo:
        def __init__(self, name: str) -> None:
            self.name = name

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Repo) and other.name == self.name

        __hash__ = None  # type: ignore[assignment]

        @cached(ttl=60.0)
        def find(self, key: str) -> str:
            calls.append(self.name)
            return f"{self.name}/{key}"

    first, second = Repo("r"), Repo("r")
    assert first.find("a") == "r/a" and second.find("a") == "r/a"
    assert first.find("a") == "r/a"
    assert calls == ["r", "r"]
    import weakref

    ref = weakref.ref(first)
    del first
    gc.collect()
    assert ref() is None  # the cache's key did not keep the instance alive
    Repo.find.cache.close()  # type: ignore[attr-defined]


def test_cached_negative_and_errors() -> None:
    class NotFound(Exception):
        pass

    calls: list[int] = []

    @cached(ttl=60.0, negative=NotFound, negative_ttl=10.0)
    def find(x: int) -> int:
        calls.append(x)
        if x < 0:
            raise NotFound(x)
        if x == 0:
            raise ValueError("zero")
        return x

    for _ in range(3):
        with pytest.raises(NotFound):
            find(-1)
        with pytest.raises(ValueError):
            find(0)
    assert calls == [-1, 0, 0, 0]


def test_cached_with_a_group_and_a_key_function() -> None:
    group: AsyncGroup[Any, Any] = AsyncGroup()
    calls: list[int] = []

    @cached(make_key=lambda user_id, **_: f"user:{user_id}", group=group, ttl=5.0)
    async def fetch(user_id: int, trace: str = "") -> int:
        calls.append(user_id)
        await asyncio.sleep(0.01)
        return user_id

    async def main() -> list[int]:
        return await asyncio.gather(fetch(1, trace="a"), fetch(1, trace="b"), fetch(2))

    assert asyncio.run(main()) == [1, 1, 2]
    assert sorted(calls) == [1, 2]
    assert fetch.cache_key(1) == "user:1"  # type: ignore[attr-defined]


def test_cached_background_refresh_uses_the_original_arguments() -> None:
    clock = FakeClock()
    seen: list[tuple[int, str]] = []

    @cached(ttl=10.0, jitter=0.0, stale=10.0, clock=clock)
    def load(a: int, b: str = "x") -> str:
        seen.append((a, b))
        return f"{a}{b}{len(seen)}"

    assert load(1, b="y") == "1y1"
    clock.advance(11.0)
    assert load(1, "y") == "1y1"
    wait_for(lambda: len(seen) == 2)
    assert seen == [(1, "y"), (1, "y")]
    wait_for(lambda: load(1, "y") == "1y2")
    load.cache.close()  # type: ignore[attr-defined]


# -- typing: the decorated signature reaches the user's type checker ---------------------------


def test_mypy_sees_the_decorated_signatures(tmp_path: Path) -> None:
    import mypy.api as mypy_api  # in the test extra: this test must run, not skip

    snippet = textwrap.dedent(
        """
        from singleflight import AsyncLoadingCache, LoadingCache, cached, coalesce

        @coalesce
        def load_user(user_id: int) -> str:
            return str(user_id)

        @coalesce(make_key=lambda user_id: f"user:{user_id}")
        async def fetch_user(user_id: int) -> str:
            return str(user_id)

        @cached(ttl=30.0, stale=60.0)
        async def fetch_profile(user_id: int) -> bytes:
            return b""

        class Service:
            @cached(ttl=5.0)
            def find(self, name: str) -> int:
                return 1

        async def main() -> None:
            ok: str = load_user(1)
            ok2: str = await fetch_user(1)
            ok3: bytes = await fetch_profile(1)
            ok4: int = Service().find("x")
            users: LoadingCache[int, str] = LoadingCache(load_user, ttl=30.0)
            one: str = users.get(1)
            many: dict[int, str] = users.get_many([1, 2])
            ausers: AsyncLoadingCache[int, str] = AsyncLoadingCache(fetch_user)
            aone: str = await ausers.get(1)

            load_user("1")  # E1
            await fetch_user("1")  # E2
            await fetch_profile(user_id="1")  # E3
            Service().find(3)  # E4
            bad: int = users.get(1)  # E5
            users.get("1")  # E6
        """
    )
    path = tmp_path / "snippet.py"
    path.write_text(snippet)
    stdout, stderr, status = mypy_api.run(
        [
            "--strict",
            "--no-incremental",
            "--cache-dir",
            os.devnull,
            "--config-file",
            os.devnull,
            str(path),
        ]
    )
    lines = [line for line in stdout.splitlines() if ": error:" in line]
    marked = {
        n + 1: tag
        for n, line in enumerate(snippet.splitlines())
        for tag in ["E1", "E2", "E3", "E4", "E5", "E6"]
        if line.endswith(f"# {tag}")
    }
    reported = {int(line.split(":")[1]) for line in lines}
    assert reported == set(marked), (stdout, stderr)
    assert status == 1
    assert any('incompatible type "str"; expected "int"' in line for line in lines)


def test_wraps_keeps_the_wrapped_function_reachable() -> None:
    def f(x: int) -> int:
        return x

    for decorator in (coalesce, cached):
        wrapped = decorator(f)
        assert functools.WRAPPER_ASSIGNMENTS
        assert wrapped.__wrapped__ is f  # type: ignore[attr-defined]
        assert wrapped.__qualname__ == f.__qualname__


def test_a_key_function_returning_an_unhashable_key_gets_a_clear_error() -> None:
    @cached(make_key=lambda x: [x])
    def f(x: int) -> int:
        return x

    @coalesce(make_key=lambda x: [x])
    def g(x: int) -> int:
        return x

    with pytest.raises(TypeError, match=r"returned an unhashable key for .*f\(\): list"):
        f(1)
    with pytest.raises(TypeError, match=r"returned an unhashable key for .*g\(\): list"):
        g(1)


def test_cached_freezes_unhashable_arguments_only_when_needed() -> None:
    calls: list[Any] = []

    @cached
    def total(values: list[int], scale: int = 1) -> int:
        calls.append(values)
        return sum(values) * scale

    assert total([1, 2]) == 3
    assert total([1, 2], 1) == 3
    assert total(values=[1, 2]) == 3
    assert total([2, 1]) == 3
    assert calls == [[1, 2], [2, 1]]


@pytest.mark.parametrize(
    "call",
    [((1,), {}), ((1, 2), {}), ((), {"a": 1}), ((1,), {"b": [3]}), (([1],), {}), ((None, ()), {})],
)
def test_the_raw_key_is_the_key_whenever_it_is_hashable(call: Any) -> None:
    def f(a: Any, b: Any = 2) -> None: ...

    class C:
        def m(self, a: Any, b: Any = 2) -> None: ...

    args, kwargs = call
    for builder, prefix_args in ((KeyBuilder(f), ()), (KeyBuilder(C.m), (C(),))):
        full = prefix_args + args
        raw = builder._raw(*full, **kwargs)
        key = builder(full, kwargs)
        try:
            hash(raw)
        except TypeError:
            assert raw != key  # frozen
        else:
            assert raw == key
    prefixed = KeyBuilder(f, prefix="mod.f")
    assert prefixed((1,), {})[0] == "mod.f"


def test_cached_refuses_an_unknown_option() -> None:
    with pytest.raises(TypeError, match="unknown options tll; it takes cache_if, clock"):
        cached(tll=5)  # type: ignore[call-overload]
