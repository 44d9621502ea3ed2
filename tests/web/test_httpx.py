"""singleflight.httpx against a real HTTP server on 127.0.0.1 that counts the requests it gets.

The server holds every request at a gate the test opens once all callers are in the flight.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from singleflight import AsyncGroup, Group
from singleflight.httpx import AsyncCoalescingTransport, CoalescingTransport

from .._support import Gate, run, until, wait_for

WAIT = 30.0
BODY = b"the body " * 100


class Counting(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.requests: list[str] = []
        self.gate = Gate()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count(self) -> int:
        with self.lock:
            return len(self.requests)


class Handler(BaseHTTPRequestHandler):
    server: Counting
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests.append(self.path)
        self.server.gate.wait(WAIT)
        body = b"big" * 1000 if self.path.startswith("/big") else BODY
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-path", self.path)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Counting]:
    server = Counting()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.gate.open()
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


def test_100_threads_one_request(server: Counting) -> None:
    group: Group[object, object] = Group()
    http = httpx.Client(transport=CoalescingTransport(group=group), timeout=WAIT)
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def get() -> None:
        response = http.get(f"{server.url}/data")
        with lock:
            results.append(response)

    threads = [threading.Thread(target=get) for _ in range(100)]
    for thread in threads:
        thread.start()
    wait_for(lambda: group.stats().joins == 99, WAIT, "99 callers to join")
    server.gate.open()
    for thread in threads:
        thread.join(WAIT)
    http.close()
    assert server.count() == 1
    assert len(results) == 100
    assert len({id(r) for r in results}) == 100  # a response object each
    for response in results:
        assert response.status_code == 200
        assert response.content == BODY
        assert response.headers["x-path"] == "/data"


def test_100_tasks_one_request_and_a_cancelled_caller_leaves_alone(server: Counting) -> None:
    group: AsyncGroup[object, object] = AsyncGroup()

    async def burst() -> list[httpx.Response]:
        transport = AsyncCoalescingTransport(group=group)
        async with httpx.AsyncClient(transport=transport, timeout=WAIT) as http:
            first = asyncio.ensure_future(http.get(f"{server.url}/data"))
            await until(lambda: server.count() == 1, WAIT, "the leader's request")
            rest = [asyncio.ensure_future(http.get(f"{server.url}/data")) for _ in range(99)]
            await until(lambda: group.stats().joins == 99, WAIT, "99 callers to join")
            first.cancel()  # the caller that sent the request
            with pytest.raises(asyncio.CancelledError):
                await first
            server.gate.open()
            return await asyncio.gather(*rest)

    responses = run(burst(), WAIT)
    assert server.count() == 1
    assert [(r.status_code, r.content) for r in responses] == [(200, BODY)] * 99


def test_different_urls_and_headers_do_not_share(server: Counting) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=AsyncCoalescingTransport(), timeout=WAIT) as http:
            calls = [
                asyncio.ensure_future(http.get(f"{server.url}/a")),
                asyncio.ensure_future(http.get(f"{server.url}/b")),
                asyncio.ensure_future(
                    http.get(f"{server.url}/a", headers={"authorization": "Bearer x"})
                ),
                asyncio.ensure_future(http.head(f"{server.url}/a")),
            ]
            await until(lambda: server.count() == 4, WAIT, "4 requests")
            server.gate.open()
            return await asyncio.gather(*calls)

    responses = run(burst(), WAIT)
    assert [r.headers["x-path"] for r in responses] == ["/a", "/b", "/a", "/a"]
    assert responses[3].content == b""


def test_a_leader_that_times_out_leaves_the_others_their_own_request(server: Counting) -> None:
    group: AsyncGroup[object, object] = AsyncGroup()

    async def burst() -> tuple[BaseException | None, httpx.Response]:
        transport = AsyncCoalescingTransport(group=group)
        async with httpx.AsyncClient(transport=transport, timeout=WAIT) as http:
            leader = asyncio.ensure_future(http.get(f"{server.url}/slow", timeout=0.5))
            await until(lambda: server.count() == 1, WAIT, "the leader's request")
            joiner = asyncio.ensure_future(http.get(f"{server.url}/slow"))
            await until(lambda: group.stats().joins == 1, WAIT, "the joiner")
            error = None
            try:
                await leader
            except httpx.TimeoutException as exc:
                error = exc
            server.gate.open()
            return error, await joiner

    error, response = run(burst(), WAIT)
    assert isinstance(error, httpx.ReadTimeout)
    assert (response.status_code, response.content) == (200, BODY)
    assert server.count() == 2  # the joiner sent its own


def test_a_long_body_is_not_shared_but_streamed_to_the_leader(server: Counting) -> None:
    group: Group[object, object] = Group()
    http = httpx.Client(transport=CoalescingTransport(group=group, max_body=100), timeout=WAIT)
    results: list[bytes] = []

    def get() -> None:
        results.append(http.get(f"{server.url}/big").content)

    threads = [threading.Thread(target=get) for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: group.stats().joins == 2, WAIT, "2 callers to join")
    server.gate.open()
    for thread in threads:
        thread.join(WAIT)
    http.close()
    assert results == [b"big" * 1000] * 3
    assert server.count() == 3


def test_posts_pass_through(server: Counting) -> None:
    group: Group[object, object] = Group()
    http = httpx.Client(transport=CoalescingTransport(group=group), timeout=WAIT)
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(http.post(server.url, content=b"x").status_code)
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    wait_for(lambda: server.count() == 3, WAIT, "3 requests")
    server.gate.open()
    for thread in threads:
        thread.join(WAIT)
    http.close()
    assert results == [200] * 3
    assert group.stats().calls == 0


# -- responses whose body the wrapped transport has already read ------------------------------
# httpx.Response(200, json=...) or content=b"..." reads its body at once, the common way
# of answering from an httpx.MockTransport handler.


def test_a_response_read_already_is_shared_by_threads() -> None:
    gate = Gate()
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        gate.wait(WAIT)
        return httpx.Response(200, json={"EUR": 1.08}, headers={"x-n": "1"})

    group: Group[object, object] = Group()
    transport = CoalescingTransport(httpx.MockTransport(handler), group=group)
    http = httpx.Client(transport=transport, timeout=WAIT)
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def get() -> None:
        response = http.get("https://api.example/rates")
        with lock:
            results.append(response)

    threads = [threading.Thread(target=get) for _ in range(10)]
    for thread in threads:
        thread.start()
    wait_for(lambda: group.stats().joins == 9, WAIT, "9 callers to join")
    gate.open()
    for thread in threads:
        thread.join(WAIT)
    http.close()
    assert sent == ["/rates"]
    assert [(r.status_code, r.json(), r.headers["x-n"]) for r in results] == [
        (200, {"EUR": 1.08}, "1")
    ] * 10


def test_a_response_read_already_is_shared_by_tasks() -> None:
    gate = Gate()
    sent: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        await gate.wait_async(WAIT)
        return httpx.Response(200, content=b"rates", headers={"content-type": "text/plain"})

    group: AsyncGroup[object, object] = AsyncGroup()

    async def burst() -> list[httpx.Response]:
        transport = AsyncCoalescingTransport(httpx.MockTransport(handler), group=group)
        async with httpx.AsyncClient(transport=transport, timeout=WAIT) as http:
            tasks = [asyncio.ensure_future(http.get("https://api.example/r")) for _ in range(10)]
            await until(lambda: group.stats().joins == 9, WAIT, "9 callers to join")
            gate.open()
            return await asyncio.gather(*tasks)

    responses = run(burst(), WAIT)
    assert sent == ["/r"]
    assert [(r.status_code, r.text) for r in responses] == [(200, "rates")] * 10


def test_a_long_response_read_already_goes_to_the_leader_alone() -> None:
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return httpx.Response(200, content=b"big" * 1000)

    transport = CoalescingTransport(httpx.MockTransport(handler), max_body=100)
    with httpx.Client(transport=transport, timeout=WAIT) as http:
        assert http.get("https://api.example/big").content == b"big" * 1000
    assert sent == ["/big"]
