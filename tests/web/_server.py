"""uvicorn serving an ASGI app on a free 127.0.0.1 port, in a thread of the test process.

The test and the app share memory, so gates and counters need no side channel.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from .._support import wait_for


@contextmanager
def serve(app: Any, lifespan: str = "off") -> Iterator[str]:
    """Serve ``app`` until the block ends (``lifespan="on"`` runs its lifespan); yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan=lifespan, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # pragma: no cover - reported below
            failed.append(exc)

    thread = threading.Thread(target=run, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or failed or not thread.is_alive(), 10, "uvicorn")
        assert server.started, failed
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"
