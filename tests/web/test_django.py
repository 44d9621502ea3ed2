"""singleflight.django: coalesced get_or_set over real Django caches, and coalesced cached views.

LocMemCache and Django's own Redis backend (on a private redis-server on 127.0.0.1); threads,
tasks, and processes sharing one RedisGroup.  Computations wait at a gate until every caller
has joined (the group says so), so the counts are exact.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from singleflight import AsyncGroup, Group

from .._support import Gate, run, until, wait_for
from ._apps import configure_django

configure_django()

from django.core.cache import caches  # noqa: E402
from django.http import HttpResponse  # noqa: E402
from django.test import RequestFactory  # noqa: E402

from singleflight.django import CoalescingCache, coalesce_page  # noqa: E402

WAIT = 30.0
HERE = Path(__file__).resolve().parent


def redis_cache(port: int) -> Any:
    from django.core.cache.backends.redis import RedisCache

    return RedisCache(f"redis://127.0.0.1:{port}/0", {})


class Computation:
    def __init__(self, group: Any, joiners: int) -> None:
        self.group = group
        self.joiners = joiners
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self) -> dict[str, int]:
        with self.lock:
            self.calls += 1
        wait_for(lambda: self.group.stats().joins == self.joiners, WAIT, "every caller to join")
        return {"answer": 42}

    async def acall(self) -> dict[str, int]:
        with self.lock:
            self.calls += 1
        await until(lambda: self.group.stats().joins == self.joiners, WAIT, "every caller")
        return {"answer": 42}


def fifty_threads(cache: CoalescingCache, key: str, compute: Computation) -> list[Any]:
    results: list[Any] = []
    lock = threading.Lock()

    def call() -> None:
        value = cache.get_or_set(key, compute, timeout=60)
        with lock:
            results.append(value)

    threads = [threading.Thread(target=call) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread in threads)
    return results


def test_50_threads_locmem_alias_one_computation() -> None:
    group: Group[str, Any] = Group()
    cache = CoalescingCache("default", group=group)
    key = f"report-{uuid.uuid4()}"
    compute = Computation(group, 49)
    results = fifty_threads(cache, key, compute)
    assert compute.calls == 1
    assert results == [{"answer": 42}] * 50
    assert caches["default"].get(key) == {"answer": 42}
    assert cache.get_or_set(key, compute) == {"answer": 42}  # a hit: nothing computed
    assert compute.calls == 1


def test_50_threads_django_redis_cache_one_computation(redis_port: int) -> None:
    group: Group[str, Any] = Group()
    cache = CoalescingCache(redis_cache(redis_port), group=group)
    key = f"report-{uuid.uuid4()}"
    compute = Computation(group, 49)
    results = fifty_threads(cache, key, compute)
    assert compute.calls == 1
    assert results == [{"answer": 42}] * 50
    assert redis_cache(redis_port).get(key) == {"answer": 42}


def test_50_tasks_aget_or_set_one_computation() -> None:
    agroup: AsyncGroup[str, Any] = AsyncGroup()
    cache = CoalescingCache("default", agroup=agroup)
    key = f"report-{uuid.uuid4()}"
    compute = Computation(agroup, 49)

    async def burst() -> list[Any]:
        return await asyncio.gather(
            *(cache.aget_or_set(key, compute.acall, timeout=60) for _ in range(50))
        )

    assert run(burst(), WAIT) == [{"answer": 42}] * 50
    assert compute.calls == 1
    assert caches["default"].get(key) == {"answer": 42}


def test_4_processes_with_a_redis_group_one_computation(redis_port: int) -> None:
    namespace = f"django-{uuid.uuid4().hex[:8]}"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "_django_worker.py"),
                str(redis_port),
                namespace,
                "report",
                "4",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(4)
    ]
    outputs = [worker.communicate(timeout=60) for worker in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err.decode()
        assert json.loads(out) == {"report": 42}
    import redis

    client = redis.Redis(port=redis_port)
    try:
        assert int(client.get(f"{namespace}:computed")) == 1  # type: ignore[arg-type]
    finally:
        client.close()


def test_a_cache_object_with_a_redis_group_needs_a_name(redis_port: int) -> None:
    """Before: a cache object's flights were keyed by id(cache), which another process
    may give a different cache: with a RedisGroup their values could be shared."""
    import redis

    from singleflight.redis import RedisGroup

    client = redis.Redis(port=redis_port)
    try:
        group: Any = RedisGroup(client, namespace=f"dj-{uuid.uuid4().hex[:8]}")
        with pytest.raises(TypeError, match="name="):
            CoalescingCache(redis_cache(redis_port), group=group)
    finally:
        client.close()


def test_a_named_cache_object_shares_flights_across_workers(redis_port: int) -> None:
    """Two workers (two cache objects of one Redis cache, two Redis groups of one
    namespace) coalesce on the cache's name: one computation."""
    import redis

    from singleflight.redis import RedisGroup

    namespace = f"dj-{uuid.uuid4().hex[:8]}"
    clients = [redis.Redis(port=redis_port) for _ in range(2)]
    groups: list[Any] = [RedisGroup(c, namespace=namespace) for c in clients]
    workers = [
        CoalescingCache(redis_cache(redis_port), name="reports", group=group) for group in groups
    ]
    key = f"report-{uuid.uuid4()}"
    started = threading.Event()
    release = threading.Event()
    calls: list[int] = []

    def compute() -> dict[str, int]:
        calls.append(1)
        started.set()
        assert release.wait(WAIT)
        return {"answer": 42}

    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(workers[0].get_or_set(key, compute)))
    second = threading.Thread(target=lambda: results.append(workers[1].get_or_set(key, compute)))
    try:
        first.start()
        assert started.wait(WAIT)
        second.start()
        wait_for(lambda: groups[1].stats().waits >= 1, WAIT, "the second worker to wait")
        release.set()
        for thread in (first, second):
            thread.join(WAIT)
        assert not first.is_alive() and not second.is_alive()
        assert results == [{"answer": 42}] * 2
        assert len(calls) == 1
    finally:
        release.set()
        for group in groups:
            group.close()
        for c in clients:
            c.close()


# -- coalesce_page ---------------------------------------------------------------------------


def test_a_cached_view_renders_once_for_concurrent_misses() -> None:
    group: Group[Any, Any] = Group()
    gate = Gate()
    calls = []

    @coalesce_page(60, key_prefix=f"p-{uuid.uuid4()}", group=group)
    def dashboard(request: Any) -> HttpResponse:
        calls.append(request)
        gate.wait(WAIT)
        return HttpResponse(f"dashboard for {request.headers.get('authorization', 'anyone')}")

    factory = RequestFactory()
    responses: list[HttpResponse] = []

    def get(auth: str | None) -> None:
        headers = {} if auth is None else {"authorization": auth}
        responses.append(dashboard(factory.get("/dashboard", headers=headers)))

    threads = [threading.Thread(target=get, args=(None,)) for _ in range(20)]
    threads += [threading.Thread(target=get, args=("Bearer eve",)) for _ in range(5)]
    for thread in threads:
        thread.start()
    wait_for(lambda: group.stats().joins == 23, WAIT, "23 requests to join")
    gate.open()
    for thread in threads:
        thread.join(WAIT)
    assert len(calls) == 2  # once per user
    bodies = sorted(response.content for response in responses)
    assert bodies == [b"dashboard for Bearer eve"] * 5 + [b"dashboard for anyone"] * 20
    assert len({id(response) for response in responses}) == 25  # a response each


def test_an_async_cached_view_renders_once() -> None:
    agroup: AsyncGroup[Any, Any] = AsyncGroup()
    calls = []

    @coalesce_page(60, key_prefix=f"p-{uuid.uuid4()}", agroup=agroup)
    async def dashboard(request: Any) -> HttpResponse:
        calls.append(request)
        await until(lambda: agroup.stats().joins == 9, WAIT, "9 requests to join")
        return HttpResponse("dashboard")

    factory = RequestFactory()

    async def burst() -> list[Any]:
        return await asyncio.gather(*(dashboard(factory.get("/d")) for _ in range(10)))

    responses = run(burst(), WAIT)
    assert len(calls) == 1
    assert [r.content for r in responses] == [b"dashboard"] * 10
    assert run(dashboard(factory.get("/d"))).content == b"dashboard"  # a page-cache hit
    assert len(calls) == 1


def test_posts_to_a_cached_view_are_not_coalesced() -> None:
    group: Group[Any, Any] = Group()

    @coalesce_page(60, key_prefix=f"p-{uuid.uuid4()}", group=group)
    def form(request: Any) -> HttpResponse:
        return HttpResponse("posted")

    assert form(RequestFactory().post("/form")).content == b"posted"
    assert group.stats().calls == 0
