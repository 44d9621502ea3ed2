"""singleflight.asgi in front of a Starlette app and a Django ASGI app, under uvicorn on 127.0.0.1.

Each endpoint counts its calls and waits at a gate the test opens only once every request of
the burst has arrived and joined (the middleware's group says so), so the counts are exact.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from singleflight import AsyncGroup
from singleflight.asgi import STATUS_HEADER, CoalescingMiddleware

from .._support import run, until
from ._apps import CHUNKS, django_app, endpoint, starlette_app
from ._server import serve

WAIT = 60.0


class DisconnectProbe:
    """Outer middleware: for requests with ``x-watch``, tells when their client has gone.

    It reads the server's receive channel itself (after handing the request body on), which
    the middleware under it never does for a leader while joiners wait.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.gone = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (b"x-watch", b"1") not in scope["headers"]:
            await self.app(scope, receive, send)
            return
        first = await receive()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.gone.set()

        watcher = asyncio.ensure_future(watch())
        given = False

        async def replay() -> Any:
            nonlocal given
            if not given:
                given = True
                return first
            await asyncio.Event().wait()  # the watcher owns the channel

        try:
            await self.app(scope, replay, send)
        finally:
            watcher.cancel()


class Served:
    def __init__(self, url: str, middleware: CoalescingMiddleware, probe: DisconnectProbe):
        self.url = url
        self.middleware = middleware
        self.probe = probe

    def joins(self) -> int:
        return int(self.middleware.group.stats().joins)


@pytest.fixture(params=["starlette", "django"])
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    endpoint.reset()
    app = starlette_app() if request.param == "starlette" else django_app()
    middleware = CoalescingMiddleware(app, group=AsyncGroup(), status_header=STATUS_HEADER)
    probe = DisconnectProbe(middleware)
    with serve(probe) as url:
        yield Served(url, middleware, probe)
    endpoint.gate.open()


def client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=WAIT, limits=httpx.Limits(max_connections=None))


def test_200_identical_gets_call_the_app_once(served: Served) -> None:
    async def burst() -> list[httpx.Response]:
        async with client(served.url) as http:
            calls = [asyncio.ensure_future(http.get("/hello?x=1")) for _ in range(200)]
            await until(lambda: served.joins() == 199, WAIT, "199 requests to join")
            endpoint.gate.open()
            return await asyncio.gather(*calls)

    responses = run(burst(), WAIT)
    assert endpoint.calls == 1
    assert {(r.status_code, r.text) for r in responses} == {(200, "hello anyone")}
    statuses = sorted(r.headers[STATUS_HEADER] for r in responses)
    assert statuses == ["leader"] + ["shared"] * 199
    # Every copy carries the leader's headers.
    assert {r.headers["content-type"] for r in responses} == {responses[0].headers["content-type"]}


def test_one_call_per_user(served: Served) -> None:
    users = ["Bearer alice", "Bearer bob", "Bearer carol"]

    async def burst() -> list[httpx.Response]:
        async with client(served.url) as http:
            calls = [
                asyncio.ensure_future(http.get("/hello", headers={"authorization": user}))
                for _ in range(20)
                for user in users
            ]
            await until(lambda: served.joins() == 57, WAIT, "57 requests to join")
            endpoint.gate.open()
            return await asyncio.gather(*calls)

    responses = run(burst(), WAIT)
    assert endpoint.calls == 3
    for response in responses:
        assert response.status_code == 200
        assert response.text == "hello " + response.request.headers["authorization"]


def test_posts_are_never_shared(served: Served) -> None:
    async def burst() -> list[httpx.Response]:
        async with client(served.url) as http:
            calls = [asyncio.ensure_future(http.post("/hello")) for _ in range(10)]
            await until(lambda: endpoint.calls == 10, WAIT, "10 calls of the endpoint")
            endpoint.gate.open()
            return await asyncio.gather(*calls)

    responses = run(burst(), WAIT)
    assert endpoint.calls == 10
    assert served.middleware.group.stats().calls == 0
    assert {(r.status_code, r.text) for r in responses} == {(200, "hello anyone")}


def test_a_streaming_response_is_not_shared(served: Served) -> None:
    async def burst() -> list[httpx.Response]:
        async with client(served.url) as http:
            calls = [asyncio.ensure_future(http.get("/stream")) for _ in range(5)]
            await until(lambda: served.joins() == 4, WAIT, "4 requests to join")
            endpoint.gate.open()
            return await asyncio.gather(*calls)

    responses = run(burst(), WAIT)
    assert endpoint.calls == 5  # the leader's call, then each joiner's own
    assert {(r.status_code, r.content) for r in responses} == {(200, b"".join(CHUNKS))}
    assert sorted(r.headers[STATUS_HEADER] for r in responses) == ["bypass"] * 4 + ["leader"]


def _raw_get(url: str, path: str, *headers: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=WAIT)
    lines = [f"GET {path} HTTP/1.1", f"Host: {parts.netloc}", *headers, "", ""]
    sock.sendall("\r\n".join(lines).encode())
    return sock


def test_clients_that_disconnect_do_not_fail_the_others(served: Served) -> None:
    # The leader's client sends its request and goes; so does one joiner's.
    leader = _raw_get(served.url, "/hello", "x-watch: 1")

    async def burst() -> list[httpx.Response]:
        async with client(served.url) as http:
            await until(lambda: endpoint.calls == 1, WAIT, "the leader's call")
            quitter = await asyncio.to_thread(_raw_get, served.url, "/hello")
            calls = [asyncio.ensure_future(http.get("/hello")) for _ in range(9)]
            await until(lambda: served.joins() == 10, WAIT, "10 requests to join")
            leader.close()
            quitter.close()
            assert await asyncio.to_thread(served.probe.gone.wait, WAIT)
            endpoint.gate.open()
            return await asyncio.gather(*calls)

    try:
        responses = run(burst(), WAIT)
    finally:
        leader.close()
    assert endpoint.calls == 1
    assert {(r.status_code, r.text) for r in responses} == {(200, "hello anyone")}
    assert {r.headers[STATUS_HEADER] for r in responses} == {"shared"}


# -- in-process, behind httpx.ASGITransport --------------------------------------------------
# ASGITransport hands a GET's empty body over as an empty chunk with more_body=True, then an
# empty last one: still a request without a body.


class GatedApp:
    """A plain ASGI app that reads the request body, counts its calls, then waits at a gate."""

    def __init__(self) -> None:
        self.calls = 0
        self.bodies: list[bytes] = []
        self.gate = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        await asyncio.wait_for(self.gate.wait(), WAIT)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"answer " + body})


def test_identical_gets_through_asgi_transport_call_the_app_once() -> None:
    app = GatedApp()
    middleware = CoalescingMiddleware(app, group=AsyncGroup(), status_header=STATUS_HEADER)

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            tasks = [asyncio.ensure_future(http.get("/page")) for _ in range(10)]
            await until(lambda: middleware.group.stats().joins == 9, WAIT, "9 requests to join")
            app.gate.set()
            return await asyncio.gather(*tasks)

    responses = run(burst(), WAIT)
    assert app.calls == 1
    assert app.bodies == [b""]
    assert [(r.status_code, r.content) for r in responses] == [(200, b"answer ")] * 10
    assert sorted(r.headers[STATUS_HEADER] for r in responses) == ["leader"] + ["shared"] * 9


def test_a_get_with_a_body_through_asgi_transport_passes_through() -> None:
    app = GatedApp()
    app.gate.set()
    middleware = CoalescingMiddleware(app, group=AsyncGroup(), status_header=STATUS_HEADER)

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            return await http.request("GET", "/page", content=b"query")

    response = run(ask(), WAIT)
    assert (response.content, response.headers[STATUS_HEADER]) == (b"answer query", "bypass")
    assert middleware.group.stats().calls == 0
