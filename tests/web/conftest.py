"""A private redis-server for the web tests that put a Redis group or cache behind an app."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .._support import private_redis_server


@pytest.fixture(scope="module")
def redis_port() -> Iterator[int]:
    """The port of a redis-server of the module's own (killed after it)."""
    with private_redis_server() as server:
        yield server.port
