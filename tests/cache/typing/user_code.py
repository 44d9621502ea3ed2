# ruff: noqa: F841
"""Uses every attribute of the decorators' wrappers; lines marked ``# E<n>`` are type errors."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from singleflight import CachedFunction, CacheInfo, CoalescedFunction, cached, coalesce


@cached(ttl=600)
def load(user_id: int, region: str = "eu", limit: int = 10) -> list[str]:
    return [region] * limit


@cached
async def fetch(user_id: int) -> bytes:
    return b""


@coalesce
def share(x: int) -> str:
    return str(x)


class Service:
    @cached(ttl=5.0)
    def find(self, name: str) -> int:
        return 1


async def main() -> None:
    a: list[str] = load(7)
    b: list[str] = load(user_id=7, limit=5)
    info: CacheInfo = load.cache_info()
    hits: int = info.hits
    load.cache_clear()
    params: dict[str, Any] = load.cache_parameters()
    load.invalidate(7, region="us")
    fresh: list[str] = load.refresh(7)
    key: Hashable = load.cache_key(7)
    direct: list[str] = load.uncached(7)
    size: int = load.cache.stats().size
    group: Any = load.group
    c: bytes = await fetch(1)
    d: bytes = await fetch.refresh(1)
    fetch.invalidate(1)
    e: str = share(1)
    k2: Hashable = share.cache_key(1)
    g2: Any = share.group
    s = Service()
    f: int = s.find("x")
    s.find.invalidate("x")
    g: int = s.find.refresh("x")
    k3: Hashable = s.find.cache_key("x")
    i2: CacheInfo = s.find.cache_info()
    h: int = Service.find(s, "x")
    Service.find.invalidate(s, "x")
    w1: CachedFunction[[int, str, int], list[str]] = load
    w2: CoalescedFunction[[int], str] = share

    load("7")  # E1
    load.invalidate("7")  # E2
    load.refresh(7, limit="x")  # E3
    await fetch("1")  # E4
    s.find(3)  # E5
    s.find.invalidate(3)  # E6
    bad: str = load.refresh(7)  # E7
    load.cache_key(7, nope=1)  # E8
    share.cache_key("1")  # E9
