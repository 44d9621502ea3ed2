"""forget (and a cache's invalidate/put/clear) reaching flights in other processes, and
fenced leaders keeping nothing: across real worker processes (_redis_command_worker.py).

Each test runs for RedisGroup (threads) and AsyncRedisGroup (tasks).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _redis_fleet import Worker, read_loads
from _redis_server import RedisServer

pytestmark = pytest.mark.timeout(90)

MODES = ["sync", "async"]
WORKER = str(Path(__file__).with_name("_redis_command_worker.py"))


class Process:
    """One commanded worker: ``ask`` sends a command and returns its reply."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.worker = Worker(config, WORKER)
        self.worker.wait_ready(30)
        self.pid = self.worker.pid

    def ask(self, op: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        self.worker.send(json.dumps({"op": op, **args}))
        return self.worker.report(timeout, last=False)

    def stop(self) -> None:
        self.worker.stop()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Any]:
    made: list[Process] = []

    def make(n: int, config: dict[str, Any]) -> list[Process]:
        config = {**config, "loads_file": str(tmp_path / "loads"), "db_file": str(tmp_path / "db")}
        new = [Process(config) for _ in range(n)]
        made.extend(new)
        return new

    yield make
    for process in made:
        process.stop()


def _wait_for(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


def _starts(tmp_path: Path) -> list[int]:
    return [pid for kind, pid, _ in read_loads(tmp_path / "loads") if kind == "start"]


def _by_tag(outcomes: list[dict[str, Any]], tag: str) -> list[Any]:
    return [(o["value"], o["error"]) for o in outcomes if o["tag"] == tag]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["forget", "invalidate", "put", "clear"])
def test_after_forget_no_new_caller_anywhere_gets_the_old_flight(
    mode: str, how: str, server: RedisServer, tmp_path: Path, processes: Any
) -> None:
    """A leads a load that read v1; C waits on it; then the database says v2 and a
    forget (or a cache's invalidate/put/clear) returns.  Callers starting after it,
    in A's process and in C's, get v2."""
    db = tmp_path / "db"
    db.write_text("v1")
    cache = how != "forget"
    a, b, c = processes(3, {"mode": mode, "port": server.port, "cache": cache})
    a.ask("gate")
    a.ask("start", key="k", tag="old")
    _wait_for(lambda: _starts(tmp_path) == [a.pid])
    c.ask("start", key="k", tag="old")
    _wait_for(lambda: c.ask("stats")["stats"]["waits"] >= 1)
    db.write_text("v2")
    if how == "clear":  # clear forgets the keys in flight in its own cache: C's
        c.ask("forget", how="clear")
    else:
        b.ask("forget", how=how, key="k", value="v2")
    a.ask("start", key="k", tag="new")
    c.ask("start", key="k", tag="new")
    a.ask("release")
    for process in (a, c):
        outcomes = process.ask("join")["outcomes"]
        assert _by_tag(outcomes, "new") == [("v2", None)], (process.pid, outcomes)
        assert _by_tag(outcomes, "old") in ([("v1", None)], [("v2", None)]), outcomes
        if cache:  # and the cache keeps v2
            assert process.ask("join")["outcomes"] == []
            process.ask("start", key="k", tag="later")
            assert _by_tag(process.ask("join")["outcomes"], "later") == [("v2", None)]


@pytest.mark.parametrize("mode", MODES)
def test_a_fenced_leader_does_not_cache_its_stale_value(
    mode: str, server: RedisServer, tmp_path: Path, processes: Any
) -> None:
    """LoadingCache(ttl=60) over a group with lease=1: A's leader is stopped past its
    lease while B takes over and loads v2.  A's late v1 goes to A's own caller at
    most, and A's cache does not keep it."""
    db = tmp_path / "db"
    db.write_text("v1")
    config = {"mode": mode, "port": server.port, "cache": True}
    config["group"] = {"lease": 1.0, "result_ttl": 0}
    a, b = processes(2, config)
    a.ask("gate")
    a.ask("start", key="k", tag="a")
    _wait_for(lambda: _starts(tmp_path) == [a.pid])
    a.worker.signal(signal.SIGSTOP)
    try:
        db.write_text("v2")
        b.ask("start", key="k", tag="b")
        assert _by_tag(b.ask("join")["outcomes"], "b") == [("v2", None)]  # B took over
    finally:
        a.worker.signal(signal.SIGCONT)
    a.ask("release")
    assert _by_tag(a.ask("join")["outcomes"], "a") in ([("v1", None)], [("v2", None)])
    assert a.ask("stats")["stats"]["fenced"] + a.ask("stats")["stats"]["lost_leases"] >= 1
    assert a.ask("contains", key="k")["contains"] is False
    a.ask("start", key="k", tag="after")
    assert _by_tag(a.ask("join")["outcomes"], "after") == [("v2", None)]
