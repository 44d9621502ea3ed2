"""Runs every Python snippet of README.md and docs/*.md as a test (Sybil).

The snippets of one page run in order in one namespace, so a page may define something
in one snippet and use it in the next; whatever a snippet needs is in the page, where a
reader sees it.  A snippet that talks to Redis uses the server on 127.0.0.1:6379; without
one it is skipped, unless SINGLEFLIGHT_REQUIRE_REDIS is set (as CI does): then it fails.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from sybil import Example, Region, Sybil
from sybil.integration import pytest as sybil_pytest
from sybil.parsers.markdown import PythonCodeBlockParser

REDIS = ("127.0.0.1", 6379)


def _redis_answers() -> bool:
    try:
        with socket.create_connection(REDIS, timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class _Snippets(PythonCodeBlockParser):
    """Python code blocks; those that use Redis need it to answer."""

    def __call__(self, document: Any) -> Iterator[Region]:
        for region in super().__call__(document):
            if "127.0.0.1:6379" in str(region.parsed) or "redis.Redis(" in str(region.parsed):
                region.evaluator = _needs_redis(region.evaluator)
            yield region


def _needs_redis(evaluate: Any) -> Any:
    def evaluator(example: Example) -> Any:
        if not _redis_answers():
            reason = "no Redis server answers on 127.0.0.1:6379"
            if os.environ.get("SINGLEFLIGHT_REQUIRE_REDIS"):
                pytest.fail(f"{reason}, and SINGLEFLIGHT_REQUIRE_REDIS is set", pytrace=False)
            pytest.skip(reason)
        return evaluate(example)

    return evaluator


_sybil_filter = sybil_pytest.SybilItem._traceback_filter


def _traceback_filter(self: Any, excinfo: Any) -> Any:
    # Sybil trims the traceback to the snippet's frames; an exception re-raised with the
    # traceback of another thread (a group hands its loader's error over so) has none
    # left to keep, and Sybil's trimming would stop the whole session: keep it whole.
    try:
        return _sybil_filter(self, excinfo)
    except IndexError:
        return excinfo.traceback


sybil_pytest.SybilItem._traceback_filter = _traceback_filter  # type: ignore[method-assign]

pytest_collect_file = Sybil(
    parsers=[_Snippets()],
    patterns=["README.md", "docs/*.md"],
).pytest()
