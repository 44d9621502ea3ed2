"""Findings of an adversarial pass over the web adapters: each test failed before its fix
(or is marked xfail, strict, with what is left to do)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from singleflight.asgi import STATUS_HEADER, CoalescingMiddleware
from singleflight.httpx import AsyncCoalescingTransport, CoalescingTransport

from .._support import run, until
from ._apps import asgi_get

WAIT = 20.0


class _EchoApp:
    """Answers with the request's path and query; every call waits at ``gate``."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await receive()
        self.calls += 1
        await self.gate.wait()
        body = scope["path"].encode() + b"|" + scope["query_string"]
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def test_asgi_across_processes_never_mixes_up_path_and_query(redis_port: int) -> None:
    """Before: the Redis key of a request joined path and query with "?", so
    ``GET /a?b?c`` (path /a) and ``GET /a%3Fb?c`` (path /a?b) were one key: the
    second got the first one's response."""
    import redis.asyncio

    from singleflight.redis import AsyncRedisGroup

    async def main() -> None:
        client = redis.asyncio.Redis(port=redis_port)
        group: Any = AsyncRedisGroup(client, namespace=f"p-{uuid.uuid4().hex[:8]}", result_ttl=0)
        app = _EchoApp()
        middleware = CoalescingMiddleware(app, group=group)
        try:
            first = asyncio.ensure_future(asgi_get(middleware, "/a", query=b"b?c"))
            await until(lambda: app.calls == 1, WAIT, "the first request to reach the app")
            second = asyncio.ensure_future(asgi_get(middleware, "/a?b", query=b"c"))
            await until(
                lambda: app.calls == 2 or group.stats().joins >= 1, WAIT, "the second request"
            )
            app.gate.set()
            (_, _, body1), (_, _, body2) = await asyncio.gather(first, second)
            assert body1 == b"/a|b?c"
            assert body2 == b"/a?b|c"
        finally:
            await group.aclose()
            await client.aclose()

    run(main(), WAIT)


def test_asgi_refuses_a_redis_group_that_keeps_results(redis_port: int) -> None:
    """Before: an AsyncRedisGroup at its defaults keeps each flight's result for
    result_ttl (5 s), so the middleware served a response to requests that arrived
    after the leader's call ended, as a cache would.  Now it refuses such a group."""
    import redis.asyncio

    from singleflight.redis import AsyncRedisGroup

    client = redis.asyncio.Redis(port=redis_port)
    group: Any = AsyncRedisGroup(client, namespace=f"p-{uuid.uuid4().hex[:8]}")
    with pytest.raises(ValueError, match="result_ttl=0"):
        CoalescingMiddleware(_EchoApp(), group=group)


def test_asgi_with_a_redis_group_replays_only_to_requests_that_arrived_while_it_ran(
    redis_port: int,
) -> None:
    import redis.asyncio

    from singleflight.redis import AsyncRedisGroup

    async def main() -> None:
        client = redis.asyncio.Redis(port=redis_port)
        group: Any = AsyncRedisGroup(client, namespace=f"p-{uuid.uuid4().hex[:8]}", result_ttl=0)
        app = _EchoApp()
        app.gate.set()
        middleware = CoalescingMiddleware(app, group=group, status_header=STATUS_HEADER)
        try:
            await asgi_get(middleware, "/n")
            # The flight ends once its completion has reached Redis.
            await until(lambda: len(group) == 0, WAIT, "the first flight to end")
            _, headers, _ = await asgi_get(middleware, "/n")
            assert app.calls == 2
            assert headers[STATUS_HEADER.encode()] == b"leader"
        finally:
            await group.aclose()
            await client.aclose()

    run(main(), WAIT)


class _Body(httpx.AsyncByteStream):
    def __init__(self, closed: list[int], n: int) -> None:
        self.closed = closed
        self.n = n

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * 10

    async def aclose(self) -> None:
        self.closed.append(self.n)


class _Slow(httpx.AsyncBaseTransport):
    """The first request waits at ``gate``; every response streams a 30-byte body."""

    def __init__(self) -> None:
        self.sent = 0
        self.closed: list[int] = []
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        n = self.sent
        if n == 1:
            self.started.set()
            await self.gate.wait()
        return httpx.Response(200, stream=_Body(self.closed, n))


def test_httpx_a_long_response_whose_caller_left_is_closed() -> None:
    """Before: when the leader's caller was cancelled and the body was longer than
    ``max_body``, nobody took the leader's streamed response: it was never closed
    (its connection stayed checked out of the pool)."""

    async def main() -> None:
        wire = _Slow()
        transport = AsyncCoalescingTransport(transport=wire, max_body=5)
        async with httpx.AsyncClient(transport=transport) as client:
            leader = asyncio.ensure_future(client.get("http://x/"))
            await asyncio.wait_for(wire.started.wait(), WAIT)
            joiner = asyncio.ensure_future(client.get("http://x/"))
            await until(lambda: transport.group.stats().joins == 1, WAIT, "the joiner")
            leader.cancel()
            wire.gate.set()
            response = await asyncio.wait_for(joiner, WAIT)
            assert response.content == b"x" * 30
            assert wire.sent == 2  # the joiner sent its own
            await until(lambda: 1 in wire.closed, WAIT, "the leader's response to be closed")
        with pytest.raises(asyncio.CancelledError):
            await leader

    run(main(), WAIT)


def test_httpx_with_a_redis_group(redis_port: int) -> None:
    """Before: the transports' keys held bytes and their values tuples (and an
    unencodable object for a long body): a RedisGroup refused every request."""
    import redis

    from singleflight.redis import MsgpackCodec, RedisGroup

    client = redis.Redis(port=redis_port)
    group: Any = RedisGroup(
        client, namespace=f"h-{uuid.uuid4().hex[:8]}", codec=MsgpackCodec(), result_ttl=0
    )
    transport = CoalescingTransport(
        transport=httpx.MockTransport(lambda request: httpx.Response(200, content=b"hello")),
        group=group,
    )
    try:
        with httpx.Client(transport=transport) as http:
            response = http.get("http://x/")
            assert response.content == b"hello"
            assert response.http_version == "HTTP/1.1"
    finally:
        group.close()
        client.close()


@pytest.mark.parametrize("side", ["sync", "async"])
def test_httpx_refuses_a_redis_group_that_keeps_results(redis_port: int, side: str) -> None:
    """A Redis group keeping each result for result_ttl would serve a response to
    requests sent after it arrived, as a cache: the transports refuse it."""
    import redis
    import redis.asyncio

    from singleflight.redis import AsyncRedisGroup, RedisGroup

    namespace = f"h-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ValueError, match="result_ttl=0"):
        if side == "sync":
            CoalescingTransport(group=RedisGroup(redis.Redis(port=redis_port), namespace=namespace))
        else:
            AsyncCoalescingTransport(
                group=AsyncRedisGroup(redis.asyncio.Redis(port=redis_port), namespace=namespace)
            )


class _Gated(httpx.AsyncBaseTransport):
    """Answers every request with a ``size``-byte body, once ``gate`` is set."""

    def __init__(self, size: int) -> None:
        self.sent = 0
        self.size = size
        self.gate = asyncio.Event()
        self.closed: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        await self.gate.wait()
        if self.size < 0:
            if self.sent == 1:
                raise httpx.ConnectError("refused", request=request)
            self.size = 10
        return httpx.Response(
            200,
            headers=[(b"x-b", b"\xe9")],
            stream=_Body(self.closed, self.sent) if self.size > 10 else None,
            content=None if self.size > 10 else b"x" * self.size,
            extensions={"reason_phrase": b"Fine"},
        )


@pytest.mark.parametrize("size", [10, 30, -1], ids=["shared", "too-long", "failed"])
def test_httpx_two_workers_share_one_request_through_redis(redis_port: int, size: int) -> None:
    """Two transports (two workers) on one AsyncRedisGroup namespace: one request on
    the wire for both; a body past max_body is the leader's, the other sends its own,
    as it does when the leader's request failed (the leader alone gets its error)."""
    import redis.asyncio

    from singleflight.redis import AsyncRedisGroup

    async def main() -> None:
        namespace = f"h-{uuid.uuid4().hex[:8]}"
        clients = [redis.asyncio.Redis(port=redis_port) for _ in range(2)]
        groups: list[Any] = [
            AsyncRedisGroup(client, namespace=namespace, result_ttl=0) for client in clients
        ]
        wire = _Gated(size)
        transports = [
            AsyncCoalescingTransport(transport=wire, group=group, max_body=20) for group in groups
        ]
        try:
            async with (
                httpx.AsyncClient(transport=transports[0]) as first,
                httpx.AsyncClient(transport=transports[1]) as second,
            ):
                leader = asyncio.ensure_future(first.get("http://x/a?b"))
                await until(lambda: wire.sent == 1, WAIT, "the leader's request")
                joiner = asyncio.ensure_future(second.get("http://x/a?b"))
                await until(lambda: groups[1].stats().waits >= 1, WAIT, "the other worker to wait")
                wire.gate.set()
                if size < 0:
                    with pytest.raises(httpx.ConnectError):
                        await asyncio.wait_for(leader, WAIT)
                    response = await asyncio.wait_for(joiner, WAIT)
                    assert (response.content, wire.sent) == (b"x" * 10, 2)
                    return
                responses = await asyncio.wait_for(asyncio.gather(leader, joiner), WAIT)
            for response in responses:
                assert response.content == b"x" * size
                assert response.headers["x-b"] == "\xe9"
            assert wire.sent == (1 if size <= 20 else 2)
            if size <= 20:
                assert responses[1].reason_phrase == "Fine"
        finally:
            for group in groups:
                await group.aclose()
            for client in clients:
                await client.aclose()

    run(main(), WAIT)
