"""singleflight.asgi with the other groups: AnyIOGroup on trio, AsyncRedisGroup across workers.

The app is driven in-process (an ASGI call per request); the endpoint waits at a gate until
every request has joined, so its call count is exact.
"""

from __future__ import annotations

import uuid
from typing import Any

import anyio

from singleflight.asgi import STATUS_HEADER, CoalescingMiddleware

from .._support import until
from ._apps import asgi_get, endpoint, starlette_app

WAIT = 30.0


def test_anyio_group_on_trio() -> None:
    from singleflight.anyio import AnyIOGroup

    endpoint.reset()
    group: AnyIOGroup[Any, Any] = AnyIOGroup()
    app = CoalescingMiddleware(starlette_app(), group=group, status_header=STATUS_HEADER)
    results: list[Any] = []

    async def main() -> None:
        async def one(auth: bytes) -> None:
            results.append(await asgi_get(app, "/hello", (b"authorization", auth)))

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tasks:
                for i in range(20):
                    tasks.start_soon(one, b"u%d" % (i % 2))
                await until(lambda: group.stats().joins == 18, WAIT, "18 requests to join")
                endpoint.gate.open()

    anyio.run(main, backend="trio")
    assert endpoint.calls == 2
    assert sorted((s, h[STATUS_HEADER.encode()], b) for s, h, b in results) == sorted(
        [(200, b"leader", b"hello u0"), (200, b"leader", b"hello u1")]
        + [(200, b"shared", b"hello u0")] * 9
        + [(200, b"shared", b"hello u1")] * 9
    )


def test_redis_group_shares_one_call_among_workers(redis_port: int) -> None:
    import redis.asyncio

    from singleflight.redis import AsyncRedisGroup

    endpoint.reset()
    namespace = f"asgi-{uuid.uuid4().hex[:8]}"
    results: list[Any] = []

    async def main() -> None:
        # Two workers: an app and a middleware each, with a Redis client and group each.
        clients = [redis.asyncio.Redis(port=redis_port) for _ in range(2)]
        groups = [AsyncRedisGroup(client, namespace=namespace, result_ttl=0) for client in clients]
        workers = [
            CoalescingMiddleware(starlette_app(), group=group, status_header=STATUS_HEADER)
            for group in groups
        ]
        try:
            with anyio.fail_after(WAIT):
                async with anyio.create_task_group() as tasks:
                    for i in range(20):
                        tasks.start_soon(_collect, workers[i % 2], results)
                    # result_ttl=0 keeps nothing once the flight ends: the gate opens only
                    # when the other worker waits on the leader in Redis, or it could ask
                    # after the end and call the endpoint itself.
                    await until(
                        lambda: (
                            all(g.stats().joins >= 9 for g in groups)
                            and sum(g.stats().waits for g in groups) >= 1
                        ),
                        WAIT,
                        "local joins, and one worker waiting on the other in Redis",
                    )
                    endpoint.gate.open()
        finally:
            for group in groups:
                await group.aclose()
            for client in clients:
                await client.aclose()

    anyio.run(main, backend="asyncio")
    assert endpoint.calls == 1
    assert {(s, b) for s, _, b in results} == {(200, b"hello anyone")}
    assert len(results) == 20
    assert (
        sorted(h[STATUS_HEADER.encode()] for _, h, _ in results) == [b"leader"] + [b"shared"] * 19
    )


async def _collect(app: Any, results: list[Any]) -> None:
    results.append(await asgi_get(app, "/hello"))
