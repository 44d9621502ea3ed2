# ruff: noqa: F841
"""Uses every attribute of the decorators' wrappers on functions, coroutine functions,
methods, classmethods and staticmethods; lines marked ``# E<n>`` are type errors.

``assert_type`` fails under mypy and pyright when a type is ``Any`` (or anything else than
the one given).  The file also runs: ``test_typing`` calls :func:`main`, so what the type
checkers accept is what the wrappers do.  :func:`type_errors` is never called.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, assert_type

from singleflight import CachedFunction, CacheInfo, CoalescedFunction, cached, coalesce


@cached(ttl=600)
def load(user_id: int, region: str = "eu", limit: int = 10) -> list[str]:
    return [region] * limit


@cached
async def fetch(user_id: int) -> bytes:
    return b"%d" % user_id


@coalesce
def share(x: int) -> str:
    return str(x)


class Service:
    @cached(ttl=5.0)
    def find(self, name: str) -> int:
        return len(name)

    @cached
    async def afind(self, name: str) -> int:
        return len(name) + 1

    @coalesce
    def cfind(self, name: str) -> int:
        return len(name) + 2

    @cached(ttl=60.0)  # above @classmethod: bound to the class however reached
    @classmethod
    def kind(cls, name: str) -> str:
        return f"{cls.__name__}:{name}"

    @cached
    @classmethod
    async def akind(cls, name: str) -> str:
        return f"{cls.__name__}/{name}"

    @coalesce
    @classmethod
    def ckind(cls, name: str) -> str:
        return f"{cls.__name__}!{name}"

    @cached  # above @staticmethod: never bound
    @staticmethod
    def double(x: int) -> int:
        return 2 * x

    @staticmethod  # below: the same
    @cached
    def triple(x: int) -> int:
        return 3 * x

    @cached
    @staticmethod
    async def adouble(x: int) -> int:
        return 2 * x

    @coalesce
    @staticmethod
    def cdouble(x: int) -> int:
        return 2 * x


class Sub(Service):
    pass


async def main() -> None:
    # functions
    assert assert_type(load(7), list[str]) == ["eu"] * 10
    assert assert_type(load(user_id=7, limit=5), list[str]) == ["eu"] * 5
    info = assert_type(load.cache_info(), CacheInfo)
    assert assert_type(info.hits, int) == 0
    load.cache_clear()
    assert assert_type(load.cache_parameters(), dict[str, Any])["typed"] is False
    assert_type(load.invalidate(7, region="us"), None)
    assert assert_type(load.refresh(7), list[str]) == ["eu"] * 10
    key = assert_type(load.cache_key(7), Hashable)
    assert assert_type(load.uncached(7), list[str]) == ["eu"] * 10
    assert assert_type(load.cache.stats().size, int) == 1
    group: Any = load.group
    assert assert_type(await fetch(1), bytes) == b"1"
    assert assert_type(await fetch.refresh(1), bytes) == b"1"
    assert_type(fetch.invalidate(1), None)
    assert assert_type(share(1), str) == "1"
    k2 = assert_type(share.cache_key(1), Hashable)
    assert assert_type(share.uncached(2), str) == "2"
    g2: Any = share.group
    w1: CachedFunction[[int, str, int], list[str]] = load
    w2: CoalescedFunction[[int], str] = share

    # methods, through an instance and through the class
    s = Service()
    assert assert_type(s.find("x"), int) == 1
    assert assert_type(Service.find(s, "xy"), int) == 2
    assert_type(s.find.invalidate("x"), None)
    assert_type(Service.find.invalidate(s, "x"), None)
    assert assert_type(s.find.refresh("x"), int) == 1
    assert assert_type(Service.find.refresh(s, "x"), int) == 1
    assert s.find.cache_key("x") == assert_type(Service.find.cache_key(s, "x"), Hashable)
    assert assert_type(s.find.cache_info(), CacheInfo).currsize == 2
    assert assert_type(s.find.uncached("abc"), int) == 3
    assert assert_type(Service.find.uncached(s, "abc"), int) == 3
    assert assert_type(s.find.cache.stats().size, int) == 2
    assert assert_type(await s.afind("x"), int) == 2
    assert assert_type(await Service.afind(s, "x"), int) == 2
    assert assert_type(await s.afind.refresh("x"), int) == 2
    assert_type(s.afind.invalidate("x"), None)
    assert assert_type(s.cfind("x"), int) == 3
    assert assert_type(Service.cfind(s, "x"), int) == 3
    assert assert_type(s.cfind.uncached("x"), int) == 3
    assert s.cfind.cache_key("x") == assert_type(Service.cfind.cache_key(s, "x"), Hashable)

    # classmethods, through the class and through an instance
    assert assert_type(Service.kind("x"), str) == "Service:x"
    assert assert_type(s.kind("x"), str) == "Service:x"
    assert assert_type(Sub.kind("x"), str) == "Sub:x"
    assert assert_type(Service.kind.cache_info(), CacheInfo).currsize == 2
    assert_type(Service.kind.invalidate("x"), None)
    assert_type(s.kind.invalidate("x"), None)
    assert Service.kind.cache_info().currsize == 1
    assert assert_type(Service.kind.refresh("y"), str) == "Service:y"
    assert assert_type(s.kind.refresh("y"), str) == "Service:y"
    assert s.kind.cache_key("y") == assert_type(Service.kind.cache_key("y"), Hashable)
    assert assert_type(Service.kind.uncached("z"), str) == "Service:z"
    assert assert_type(Service.kind.cache.stats().size, int) == 2
    group = Service.kind.group
    assert assert_type(await Service.akind("x"), str) == "Service/x"
    assert assert_type(await s.akind("x"), str) == "Service/x"
    assert assert_type(await Service.akind.refresh("x"), str) == "Service/x"
    assert_type(s.akind.invalidate("x"), None)
    assert assert_type(Service.ckind("x"), str) == "Service!x"
    assert assert_type(s.ckind.uncached("x"), str) == "Service!x"
    k3 = assert_type(Service.ckind.cache_key("x"), Hashable)
    w3: CachedFunction[[str], str] = Service.kind
    w4: CachedFunction[[str], str] = s.kind
    w5: CoalescedFunction[[str], str] = Service.ckind

    # staticmethods, through the class and through an instance
    assert assert_type(Service.double(2), int) == 4
    assert assert_type(s.double(2), int) == 4
    assert assert_type(Service.triple(2), int) == 6
    assert assert_type(s.triple(2), int) == 6
    assert_type(Service.double.invalidate(2), None)
    assert_type(s.double.invalidate(2), None)
    assert assert_type(s.double.refresh(2), int) == 4
    assert assert_type(s.triple.refresh(2), int) == 6
    assert s.double.cache_key(2) == assert_type(Service.double.cache_key(2), Hashable)
    assert assert_type(s.double.cache_info(), CacheInfo).currsize == 1
    assert assert_type(await Service.adouble(2), int) == 4
    assert assert_type(await s.adouble.refresh(2), int) == 4
    assert assert_type(s.cdouble(2), int) == 4
    assert assert_type(Service.cdouble.uncached(2), int) == 4
    w6: CachedFunction[[int], int] = s.double
    w7: CachedFunction[[int], int] = Service.triple


async def type_errors() -> None:
    s = Service()
    load("7")  # E1
    load.invalidate("7")  # E2
    load.refresh(7, limit="x")  # E3
    await fetch("1")  # E4
    s.find(3)  # E5
    s.find.invalidate(3)  # E6
    bad: str = load.refresh(7)  # E7
    load.cache_key(7, nope=1)  # E8
    share.cache_key("1")  # E9
    Service.find("x")  # E10
    Service.find.invalidate("x")  # E11
    s.find(s, "x")  # E12
    Service.kind(Service, "x")  # E13
    Service.kind.invalidate(1)  # E14
    s.kind.refresh(1)  # E15
    bad2: int = Service.kind("x")  # E16
    bad3: str = Service.kind.cache_info()  # E17
    await s.akind(1)  # E18
    Service.ckind.cache_key(1)  # E19
    s.double(s, 2)  # E20
    Service.double.invalidate("2")  # E21
    s.triple.refresh()  # E22
    bad4: str = await Service.adouble(2)  # E23
