"""Helpers of the command-line tests: run the real CLI, a private Redis, the PostgreSQL server.

The CLI runs as ``python -m singleflight`` in a child process, as a user runs it.
Redis is a redis-server of the test's own on a free port (tests/redis/_redis_server.py);
PostgreSQL is the server on 127.0.0.1:5432.  Without them the tests that need them are
skipped, unless SINGLEFLIGHT_REQUIRE_REDIS / SINGLEFLIGHT_REQUIRE_POSTGRES is set (as CI
does): then they fail with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .._support import private_redis_server

REQUIRE_POSTGRES = bool(os.environ.get("SINGLEFLIGHT_REQUIRE_POSTGRES"))
POSTGRES_DSN = os.environ.get(
    "SINGLEFLIGHT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)


def run_cli(
    *args: str, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m singleflight ARGS`` in a child process; its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "singleflight", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


def load_json(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The URL of a redis-server of this test's own, killed afterwards."""
    with private_redis_server() as server:
        yield f"redis://127.0.0.1:{server.port}/0"


@pytest.fixture
def postgres_dsn() -> str:
    """The PostgreSQL server the demo's --dsn test runs against (it must answer)."""
    import psycopg

    try:
        psycopg.connect(POSTGRES_DSN, connect_timeout=5).close()
    except psycopg.Error as exc:
        reason = f"PostgreSQL at {POSTGRES_DSN} does not answer: {str(exc).splitlines()[0]}"
        if REQUIRE_POSTGRES:
            pytest.fail(f"{reason}, and SINGLEFLIGHT_REQUIRE_POSTGRES is set", pytrace=False)
        pytest.skip(reason)
    return POSTGRES_DSN
