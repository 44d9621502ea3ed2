"""examples/web_service: the real ASGI server on 127.0.0.1, driven over HTTP.

uvicorn runs the example app in a child process on a free port, with a SQLite file of
its own; bursts of concurrent requests come from threads released together.  The query
count is SQLite's own (its trace callback, read over GET /stats): one per user per TTL
window, however many requests the burst holds.  The cache's clock moves only when the test
says (see _clocked_app.py), so how fast a loaded machine serves a burst does not matter.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parents[1] / "examples" / "web_service"
TTL = 8.0  # seconds of the cache's clock, which moves only when the test advances it
USERS = 5
REQUESTS = 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log

    def advance(self, seconds: float) -> None:
        """Move the cache's clock forward by ``seconds``."""
        response = httpx.post(f"{self.url}/_test/advance", params={"seconds": seconds}, timeout=5)
        response.raise_for_status()

    def queries(self) -> int:
        response = httpx.get(f"{self.url}/stats", timeout=5)
        response.raise_for_status()
        return int(response.json()["db_queries"])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    port = _free_port()
    log = tmp_path / "server.log"
    env = os.environ | {
        "WEB_SERVICE_DB": str(tmp_path / "users.db"),
        "WEB_SERVICE_ROWS": "20000",
        "WEB_SERVICE_TTL": str(TTL),
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "_clocked_app:app", "--app-dir", str(HERE),
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited at start:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/stats", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer in 30 s:\n{log.read_text()}")
            time.sleep(0.05)
        yield Server(url, process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    if "Traceback" in log.read_text():
        pytest.fail(f"the server logged an error:\n{log.read_text()}")


def burst(url: str, requests: int = REQUESTS, threads: int = 40) -> list[tuple[int, int, object]]:
    """``requests`` GETs of /users/1../users/USERS from ``threads`` threads released together;
    (user id, status, body) of each."""
    start = threading.Barrier(threads)
    results: list[tuple[int, int, object]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            start.wait(timeout=30)
            for i in range(index, requests, threads):
                user_id = 1 + i % USERS
                response = http.get(f"/users/{user_id}")
                with lock:
                    results.append((user_id, response.status_code, response.json()))

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert not any(worker.is_alive() for worker in workers)
    assert len(results) == requests
    for user_id, status, body in results:
        assert status == 200, body
        assert isinstance(body, dict) and body["id"] == user_id
    return results


def wait_for_queries(server: Server, expected: int, timeout: float = 5.0) -> None:
    """Wait until the count reaches ``expected`` (background refreshes), then check that
    it stays there."""
    deadline = time.monotonic() + timeout
    while server.queries() < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert server.queries() == expected


@pytest.mark.timeout(120)
def test_one_query_per_user_per_ttl_window_under_bursts(server: Server) -> None:
    # 1. A cold burst, sent by the example's own load script.
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "load.py"), "--url", server.url,
         "--requests", str(REQUESTS), "--users", str(USERS), "--concurrency", "50"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(
        rf"round 1: {REQUESTS} requests for {USERS} users in \d+\.\d\d s "
        rf"\({REQUESTS} x 200\) -> {USERS} database queries\n",
        done.stdout,
    ), done.stdout
    assert server.queries() == USERS

    # 2. Another burst in the same window (the cache's clock has not moved): no query.
    results = burst(server.url)
    assert server.queries() == USERS
    by_user: dict[int, object] = {}
    for user_id, _, body in results:  # every request for a user got the same profile
        assert by_user.setdefault(user_id, body) == body

    # 3. Once every entry has expired (entries live TTL +-10%): one query per user again,
    # however many requests.
    server.advance(1.5 * TTL)
    burst(server.url)
    wait_for_queries(server, 2 * USERS)


@pytest.mark.timeout(60)
def test_unknown_and_malformed_users(server: Server) -> None:
    missing = httpx.get(f"{server.url}/users/999999", timeout=5)
    assert missing.status_code == 404
    assert missing.json() == {"error": "no user 999999"}
    again = httpx.get(f"{server.url}/users/999999", timeout=5)
    assert again.status_code == 404
    assert server.queries() == 1  # "not found" is cached too
    malformed = httpx.get(f"{server.url}/users/abc", timeout=5)
    assert malformed.status_code == 400
    assert server.queries() == 1


@pytest.mark.timeout(60)
def test_load_script_says_when_the_service_is_down() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "load.py"), "--url", f"http://127.0.0.1:{_free_port()}",
         "--wait", "0.5"],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert done.returncode == 1
    assert "load.py: cannot reach the service" in done.stderr
    assert "(waited 0.5 s)" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(120)
def test_the_documented_run_waits_for_the_service_and_loads_each_user_once(
    tmp_path: Path,
) -> None:
    """The two documented commands (docs/index.md), started together: the load script waits
    for the service (still building its database), then its first round queries each of the
    10 users once.
    The real app.py, with a TTL longer than any round (the script says when a round outlasts
    the TTL, which a slow machine may make happen with the default)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    load = subprocess.Popen(
        [sys.executable, str(EXAMPLE / "load.py"), "--url", url, "--requests", "1000",
         "--users", "10", "--rounds", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    server = None
    try:
        assert load.stderr is not None
        assert load.stderr.readline().startswith(f"waiting for the service at {url}")
        log = tmp_path / "server.log"
        env = os.environ | {
            "WEB_SERVICE_DB": str(tmp_path / "users.db"),
            "WEB_SERVICE_ROWS": "20000",
            "WEB_SERVICE_TTL": "120",
        }
        with log.open("wb") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(EXAMPLE),
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        stdout, stderr = load.communicate(timeout=100)
        assert load.returncode == 0, stderr + log.read_text()
        assert re.fullmatch(
            r"round 1: 1000 requests for 10 users in \d+\.\d\d s \(1000 x 200\) "
            r"-> 10 database queries\n",
            stdout,
        ), stdout
    finally:
        for process in (load, server):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
