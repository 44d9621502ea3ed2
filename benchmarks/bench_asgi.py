"""The ASGI middleware's cost on requests it does not share, next to a trivial Starlette endpoint.

    python benchmarks/bench_asgi.py            # full run
    python benchmarks/bench_asgi.py --quick    # fewer repetitions
    python benchmarks/bench_asgi.py --json
    python benchmarks/bench_asgi.py --callgrind   # instructions per request (valgrind)

One asyncio loop drives the ASGI app in-process (no sockets: the server's own
cost would dilute the ratio), with ``--concurrency`` requests in flight at a
time, all for *different* URLs, so nothing is shared.  Rounds of the bare app
and of the app behind ``CoalescingMiddleware`` are interleaved in the same run.

Figures:
  asgi-get-alone   GET, each request leads its own flight (the middleware's full
                   path: key, group flight, detached receive, captured send)
                   / the same requests to the bare app                       <= 1.05x
  asgi-post        POST (not coalesced: passed straight through) / bare      reported
  uvicorn-get      the same GETs over HTTP to uvicorn on 127.0.0.1, one
                   keep-alive connection per client task (in a child process)
                   / the bare app under uvicorn                              <= 1.05x
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import Figure, interleaved, report
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from singleflight.asgi import CoalescingMiddleware


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello " + request.path_params["name"])


def make_app() -> Starlette:
    return Starlette(routes=[Route("/hello/{name}", hello, methods=["GET", "POST"])])


BARE = make_app()
WRAPPED = CoalescingMiddleware(make_app())

HEADERS = [
    (b"host", b"127.0.0.1:8000"),
    (b"user-agent", b"bench"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
]
_BODY = {"type": "http.request", "body": b"", "more_body": False}


def _scope(method: str, i: int) -> dict[str, object]:
    path = f"/hello/{i}"
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": HEADERS,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def _drive(app: object, method: str, n: int, concurrency: int) -> float:
    """Seconds per request for ``n`` requests, ``concurrency`` at a time."""

    async def receive() -> dict[str, object]:
        return _BODY

    async def send(message: object) -> None:
        pass

    async def client(start: int) -> None:
        for i in range(start, n, concurrency):
            await app(_scope(method, i), receive, send)  # type: ignore[operator]

    begin = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    return (time.perf_counter() - begin) / n


def in_process(method: str, n: int, reps: int, concurrency: int) -> tuple[float, float]:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_drive(BARE, method, n, concurrency))  # warm up
        loop.run_until_complete(_drive(WRAPPED, method, n, concurrency))
        return interleaved(
            lambda: loop.run_until_complete(_drive(BARE, method, n, concurrency)),
            lambda: loop.run_until_complete(_drive(WRAPPED, method, n, concurrency)),
            reps,
        )
    finally:
        loop.close()


# -- over HTTP, uvicorn in a child process ---------------------------------------------------

SERVER = """
import sys
sys.path.insert(0, {here!r})
import uvicorn, bench_asgi
app = bench_asgi.WRAPPED if sys.argv[1] == "wrapped" else bench_asgi.BARE
uvicorn.run(app, fd=int(sys.argv[2]), log_level="warning", access_log=False)
"""


def _serve(which: str) -> tuple[subprocess.Popen[bytes], int, socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    sock.set_inheritable(True)
    code = SERVER.format(here=os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen(
        [sys.executable, "-c", code, which, str(sock.fileno())], pass_fds=[sock.fileno()]
    )
    return process, sock.getsockname()[1], sock


async def _http_round(port: int, n: int, concurrency: int) -> float:
    """Seconds per request: raw HTTP/1.1 keep-alive GETs (a client this thin costs little)."""

    async def client(start: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in range(start, n, concurrency):
                writer.write(f"GET /hello/{i} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length: (\d+)", head, re.I)[1])  # type: ignore[index]
                await reader.readexactly(length)
        finally:
            writer.close()

    begin = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    return (time.perf_counter() - begin) / n


def over_http(n: int, reps: int, concurrency: int) -> tuple[float, float]:
    servers = {which: _serve(which) for which in ("bare", "wrapped")}
    try:
        for _, port, _ in servers.values():  # wait until both answer
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    asyncio.run(_http_round(port, 50, 5))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        return interleaved(
            lambda: asyncio.run(_http_round(servers["bare"][1], n, concurrency)),
            lambda: asyncio.run(_http_round(servers["wrapped"][1], n, concurrency)),
            reps,
        )
    finally:
        for process, _, sock in servers.values():
            process.terminate()
            process.wait(timeout=10)
            sock.close()


# -- instructions per request (callgrind) ----------------------------------------------------


def _instructions(which: str, method: str, n: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, __file__, "--count-only", which, method, str(n)],
            check=True, capture_output=True,
        )  # fmt: skip
        with open(out) as data:
            for line in data:
                if line.startswith("summary:") or line.startswith("totals:"):
                    return int(line.split()[1])
    raise RuntimeError("no callgrind totals")


def callgrind(n: int) -> list[tuple[str, float]]:
    """Instructions per request: the difference between a run of 2n and of n requests."""
    rows = []
    for which, method in (("bare", "GET"), ("wrapped", "GET"), ("wrapped", "POST")):
        small = _instructions(which, method, n)
        large = _instructions(which, method, 2 * n)
        rows.append((f"{which} {method}", (large - small) / n))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--no-http", action="store_true", help="skip the uvicorn figure")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--count-only", nargs=3, metavar=("APP", "METHOD", "N"))
    args = parser.parse_args()
    if args.count_only:
        which, method, n = args.count_only
        app = WRAPPED if which == "wrapped" else BARE
        asyncio.run(_drive(app, method, int(n), args.concurrency))
        return
    if args.callgrind:
        rows = callgrind(500 if args.quick else 2000)
        bare = rows[0][1]
        for name, per in rows:
            print(f"{name:<14} {per:>10,.0f} instructions/request  ({per / bare:.3f}x bare)")
        return
    n, reps = (2_000, 5) if args.quick else (10_000, 11)
    figures = []
    floor, subject = in_process("GET", n, reps, args.concurrency)
    figures.append(Figure("asgi-get-alone", "s/request", floor, subject, 1.05))
    floor, subject = in_process("POST", n, reps, args.concurrency)
    figures.append(Figure("asgi-post", "s/request", floor, subject, None))
    if not args.no_http:
        floor, subject = over_http(n // 2, reps, args.concurrency)
        figures.append(Figure("uvicorn-get", "s/request", floor, subject, 1.05))
    report(figures, args.json)


if __name__ == "__main__":
    main()
