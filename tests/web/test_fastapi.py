"""The FastAPI pattern of docs/web.md, no glue code: a cache made in the lifespan and injected
as a dependency, ``@cached`` on an endpoint, ``stats()`` served to Prometheus; under uvicorn.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from singleflight import AsyncLoadingCache, cached
from singleflight.metrics.prometheus import register

from .._support import Gate, run, until
from ._server import serve

WAIT = 60.0
registry = CollectorRegistry()
loads: list[int] = []
reports: list[str] = []
gate = Gate()
profiles_cache: list[AsyncLoadingCache[int, dict[str, Any]]] = []


async def load_profile(user_id: int) -> dict[str, Any]:
    loads.append(user_id)
    await until(lambda: profiles_cache[0].stats().joins == 29, WAIT, "29 requests to join")
    return {"id": user_id, "name": f"user {user_id}"}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.profiles = AsyncLoadingCache(load_profile, ttl=30.0, name="profiles")
    profiles_cache.append(app.state.profiles)
    register(app.state.profiles, registry=registry)
    yield
    await app.state.profiles.aclose()


def profiles(request: Request) -> AsyncLoadingCache[int, dict[str, Any]]:
    return request.app.state.profiles  # type: ignore[no-any-return]


app = FastAPI(lifespan=lifespan)


@app.get("/users/{user_id}")
async def user(
    user_id: int, cache: Annotated[AsyncLoadingCache[int, dict[str, Any]], Depends(profiles)]
) -> dict[str, Any]:
    return await cache.get(user_id)


@app.get("/reports/{name}")
@cached(ttl=60.0, make_key=lambda name, request: name)  # the request is not part of the key
async def report(name: str, request: Request) -> dict[str, str]:
    reports.append(name)
    await gate.wait_async(WAIT)
    return {"report": name}


@app.get("/metrics")
def metrics() -> PlainTextResponse:
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def test_the_fastapi_pattern() -> None:
    async def burst(url: str) -> tuple[list[httpx.Response], list[httpx.Response], str]:
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(base_url=url, timeout=WAIT, limits=limits) as http:
            users = await asyncio.gather(*(http.get("/users/7") for _ in range(30)))
            calls = [asyncio.ensure_future(http.get("/reports/sales")) for _ in range(10)]
            await until(lambda: report.cache.stats().joins == 9, WAIT, "9 requests to join")
            gate.open()
            reported = await asyncio.gather(*calls)
            text = (await http.get("/metrics")).text
            return users, reported, text

    with serve(app, lifespan="on") as url:
        users, reported, text = run(burst(url), WAIT)
    assert loads == [7]
    assert [r.json() for r in users] == [{"id": 7, "name": "user 7"}] * 30
    assert reports == ["sales"]
    assert [r.json() for r in reported] == [{"report": "sales"}] * 10
    assert 'singleflight_cache_misses_total{cache="profiles"} 30.0' in text
