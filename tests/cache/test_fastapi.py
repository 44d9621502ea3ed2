"""@cached on FastAPI endpoints, over HTTP: per-request parameters (``Request``,
``BackgroundTasks``, ``Depends(...)``) are left out of the key."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fastapi import BackgroundTasks, Depends, FastAPI, Request  # noqa: E402

from singleflight import cached  # noqa: E402

pytestmark = pytest.mark.timeout(60)


class Session:
    """A per-request object: a new one for every request, as a database session is."""

    opened = 0

    def __init__(self) -> None:
        Session.opened += 1


def session() -> Session:
    return Session()


loads: list[tuple[str, int]] = []


@cached(ttl=600)
async def user(user_id: int, request: Request, db: Session = Depends(session)) -> dict[str, Any]:  # noqa: B008
    loads.append(("user", user_id))
    return {"id": user_id, "path": request.url.path}


@cached(ttl=600)
def report(
    name: str,
    tasks: BackgroundTasks,
    db: Annotated[Session, Depends(session)],
    limit: int = 10,
) -> dict[str, Any]:
    loads.append(("report", limit))
    return {"name": name, "limit": limit}


def make_app() -> FastAPI:
    app = FastAPI()
    app.get("/users/{user_id}")(user)
    app.get("/reports/{name}")(report)
    return app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def base_url() -> Iterator[str]:
    port = _free_port()
    config = uvicorn.Config(make_app(), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        assert not thread.is_alive()


def test_per_request_parameters_are_not_part_of_the_key(base_url: str) -> None:
    loads.clear()
    user.cache_clear()
    report.cache_clear()
    opened = Session.opened
    with httpx.Client(base_url=base_url, timeout=10) as client:
        for _ in range(3):
            assert client.get("/users/7").json() == {"id": 7, "path": "/users/7"}
        assert client.get("/users/8").json()["id"] == 8
        for _ in range(3):
            assert client.get("/reports/daily", params={"limit": 5}).json() == {
                "name": "daily",
                "limit": 5,
            }
        assert client.get("/reports/daily").json()["limit"] == 10
    assert loads == [("user", 7), ("user", 8), ("report", 5), ("report", 10)]
    assert Session.opened - opened == 8  # every request got its own session...
    assert user.cache_info().hits == 2 and report.cache_info().hits == 2  # ...and hit
    assert user.cache_key(7, None, None) == 7  # type: ignore[arg-type]


def test_an_endpoint_keyed_by_nothing_is_refused() -> None:
    with pytest.raises(TypeError, match=r"every parameter of .*home\(\) \(request, db\)"):

        @cached
        def home(request: Request, db: Session = Depends(session)) -> str:  # noqa: B008
            return "home"


class WebSocket:
    """A class of the user's own named as Starlette's: its arguments are keyed."""


def test_per_request_annotations_are_told_by_module_not_by_name() -> None:
    @cached
    def handle(socket: WebSocket) -> int:
        return 1

    s = WebSocket()
    assert handle.cache_key(s) is s
