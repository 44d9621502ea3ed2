"""LoadingCache / AsyncLoadingCache with a Redis group, across real processes.

Each test runs two worker processes (_redis_cache_worker.py) with a cache over
a RedisGroup (sync) or AsyncRedisGroup (async) on one namespace of a private
redis-server.  Process A leads a load whose loader waits for a release; B
reads the key once it is waiting on A's flight in Redis, so B's value (or
error) is one loaded in A.  Loads are counted in a file across processes;
group calls and cache stats come from each worker.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from _redis_fleet import Worker, read_loads
from _redis_server import RedisServer

from singleflight import LoadingCache
from singleflight.redis import RedisGroup

WORKER = str(Path(__file__).with_name("_redis_cache_worker.py"))

pytestmark = pytest.mark.timeout(90)

OURS = ("info", "hello")


class Proc:
    """One worker: ``cmd(op, **args)`` sends a command and returns its reply."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.worker = Worker(config, WORKER)
        self.pid = self.worker.pid

    def cmd(self, op: str, **args: Any) -> dict[str, Any]:
        self.worker.send(json.dumps({"op": op, **args}))
        return self.worker.report(30, last=False)


def _wait_until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what}")
        time.sleep(0.01)


@pytest.fixture
def procs(server: RedisServer, tmp_path: Path, mode: str) -> Iterator[Callable[..., Proc]]:
    """Start workers on the test's server; each gets ``mode`` and the shared loads file."""
    made: list[Proc] = []

    def make(**config: Any) -> Proc:
        config = {"mode": mode, "port": server.port, "loads_file": str(tmp_path / "loads")} | config
        proc = Proc(config)
        made.append(proc)
        proc.worker.wait_ready(30)
        return proc

    yield make
    for proc in made:
        proc.worker.stop()


def _starts(tmp_path: Path) -> list[int]:
    return [pid for kind, pid, _ in read_loads(tmp_path / "loads") if kind == "start"]


def _remote_flight(
    a: Proc, b: Proc, tmp_path: Path, key: str, callers: int = 1, **behave: Any
) -> None:
    """A starts loading ``key`` (held until A's ``release``); B's ``callers`` reads of
    it are left waiting on A's flight in Redis."""
    loads = len(_starts(tmp_path))
    before = b.cmd("state")
    waits, misses = before["group"]["waits"], before["cache"]["misses"]
    a.cmd("behave", gated=True, **behave)
    a.cmd("start", key=key)
    _wait_until("A's loader started", lambda: len(_starts(tmp_path)) == loads + 1)
    b.cmd("start", key=key, callers=callers)

    def waiting() -> bool:
        state = b.cmd("state")
        return state["group"]["waits"] > waits and state["cache"]["misses"] == misses + callers

    _wait_until("B's readers missed and wait on Redis", waiting)


def test_loaded_once_then_both_processes_hit_their_own_cache(
    procs: Callable[..., Proc], server: RedisServer, tmp_path: Path
) -> None:
    a, b = procs(), procs()
    _remote_flight(a, b, tmp_path, "k", callers=3)
    a.cmd("release")
    ra, rb = a.cmd("join"), b.cmd("join")

    value = {"key": "k", "pid": a.pid, "n": 1}
    assert [o["value"] for o in ra["outcomes"] + rb["outcomes"]] == [value] * 4
    assert _starts(tmp_path) == [a.pid]  # one load in all
    assert (ra["loader_calls"], rb["loader_calls"]) == (1, 0)
    assert rb["group"]["hits"] == 1  # B took A's value from Redis
    assert rb["cache"]["size"] == 1 and b.cmd("contains", key="k")["contains"]

    before = server.commandstats()
    ra2 = a.cmd("get", key="k", callers=5)
    rb2 = b.cmd("get", key="k", callers=5)
    after = server.commandstats()

    assert [o["value"] for o in ra2["outcomes"] + rb2["outcomes"]] == [value] * 10
    # Answered from each process's own cache: no group call, nothing sent to Redis.
    assert (ra2["group_calls"], rb2["group_calls"]) == (ra["group_calls"], rb["group_calls"])
    # Less the test's own INFO, and the HELLO of the connection it was sent on.
    sent = {name: n - before.get(name, 0) for name, n in after.items() if name not in OURS}
    assert {name: n for name, n in sent.items() if n} == {}
    assert _starts(tmp_path) == [a.pid]
    assert rb2["cache"]["hits"] == 5
    # loads counts the loads this process ran: B ran none.
    assert (ra2["cache"]["loads"], rb2["cache"]["loads"]) == (1, 0)


def test_invalidate_during_a_remote_load_is_not_overwritten(
    procs: Callable[..., Proc], server: RedisServer, tmp_path: Path
) -> None:
    a, b = procs(), procs()
    _remote_flight(a, b, tmp_path, "k")
    b.cmd("invalidate", key="k")
    client = server.client()  # the forget reached Redis (AsyncLoadingCache sends it in a task)
    _wait_until("the forget", lambda: client.exists("sf:{test:k}:lease") == 0)
    client.close()
    # B's waiting flight asks again on its own (its loader is not gated): A is released
    # only once B's new load began, or A's rerun could begin first on a loaded machine.
    _wait_until("B led a new load", lambda: _starts(tmp_path)[:2] == [a.pid, b.pid])
    a.cmd("release")
    ra, rb = a.cmd("join"), b.cmd("join")

    # The invalidate forgot A's flight in Redis: B's waiting flight asked again
    # and led a new load (kept in B's cache: it began after the invalidate), and
    # A's flight, forgotten by another process, ran again.  Nobody got the
    # forgotten flight's value.
    old = {"key": "k", "pid": a.pid, "n": 1}
    assert old not in [o["value"] for o in ra["outcomes"]]
    assert [o["value"] for o in rb["outcomes"]] == [{"key": "k", "pid": b.pid, "n": 1}]
    assert b.cmd("contains", key="k")["contains"]
    assert _starts(tmp_path)[:2] == [a.pid, b.pid]


def test_remote_not_found_is_cached_by_type_name_and_other_errors_are_not(
    procs: Callable[..., Proc], tmp_path: Path
) -> None:
    a, b = procs(negative=True), procs(negative=True)
    # MissingProfile subclasses NotFound, the type negative= names.
    _remote_flight(a, b, tmp_path, "gone", error="MissingProfile")
    a.cmd("release")
    ra, rb = a.cmd("join"), b.cmd("join")

    assert ra["outcomes"][0]["error"] == "MissingProfile"
    (remote,) = rb["outcomes"]
    assert (remote["error"], remote["type_name"]) == ("LoaderError", "__main__.MissingProfile")
    assert b.cmd("contains", key="gone")["contains"]
    again = b.cmd("get", key="gone")
    assert again["outcomes"][0]["message"] == remote["message"]
    assert again["group_calls"] == rb["group_calls"]  # raised from B's cache
    assert again["cache"]["loads"] == 0 and again["cache"]["load_failures"] == 0

    # An error negative= does not name is never cached.
    _remote_flight(a, b, tmp_path, "broken", error="ValueError")
    a.cmd("release")
    a.cmd("join")
    (remote,) = b.cmd("join")["outcomes"]
    assert (remote["error"], remote["type_name"]) == ("LoaderError", "ValueError")
    assert not b.cmd("contains", key="broken")["contains"]
    fresh = b.cmd("get", key="broken")
    assert fresh["outcomes"][0]["value"] == {"key": "broken", "pid": b.pid, "n": 1}
    assert fresh["cache"]["load_failures"] == 0
    assert _starts(tmp_path) == [a.pid, a.pid, b.pid]


def test_remote_failure_with_stale_if_error_serves_the_old_value(
    procs: Callable[..., Proc], tmp_path: Path
) -> None:
    a, b = procs(ttl=0.5, stale_if_error=60.0), procs(ttl=0.5, stale_if_error=60.0)
    _remote_flight(a, b, tmp_path, "k")
    a.cmd("release")
    a.cmd("join")
    b.cmd("join")
    old = {"key": "k", "pid": a.pid, "n": 1}
    for proc in (a, b):
        _wait_until("expired", lambda p=proc: not p.cmd("contains", key="k")["contains"])

    _remote_flight(a, b, tmp_path, "k", error="ValueError")
    a.cmd("release")
    ra, rb = a.cmd("join"), b.cmd("join")

    assert [o["value"] for o in ra["outcomes"] + rb["outcomes"]] == [old, old]
    assert rb["loader_calls"] == 0
    assert rb["cache"]["stale_served"] == 1
    # The failed load ran in A: counted there, not in B.
    assert (ra["cache"]["load_failures"], rb["cache"]["load_failures"]) == (1, 0)
    assert _starts(tmp_path) == [a.pid, a.pid]


def test_get_many_leaves_out_a_key_not_found_in_another_process(
    procs: Callable[..., Proc], tmp_path: Path
) -> None:
    a, b = procs(), procs()
    # A is loading "gone" (its loader will raise KeyError); B asks for it with another key.
    a.cmd("behave", gated=True, error="KeyError")
    a.cmd("start", key="gone")
    _wait_until("A's loader started", lambda: len(_starts(tmp_path)) == 1)
    b.cmd("start", keys=["here", "gone"])
    _wait_until("B waits on Redis", lambda: b.cmd("state")["group"]["waits"] > 0)
    a.cmd("release")
    ra, rb = a.cmd("join"), b.cmd("join")

    assert ra["outcomes"][0]["error"] == "KeyError"
    # As with a local group: a key whose loader raised KeyError is left out.
    (outcome,) = rb["outcomes"]
    assert outcome["error"] is None
    assert outcome["value"] == {"here": {"key": "here", "pid": b.pid, "n": 1}}
    assert _starts(tmp_path) == [a.pid, b.pid]
    assert not b.cmd("contains", key="gone")["contains"]


# -- in one process: invalidate() racing a get() that arrives while it runs -----------------


@pytest.mark.parametrize("pause", ["before", "after"])
def test_a_get_during_invalidate_never_writes_the_old_value_back(
    server: RedisServer, pause: str
) -> None:
    """invalidate() forgets the group's flight, then revokes the write-back lease.

    A get() arriving while invalidate() runs (paused here before or after the
    group's own forget) either joins the old flight before the revocation, or
    starts a new load: once invalidate() has returned, the old value is not in
    the cache.  (Revoking first would let such a get() take a fresh lease and
    join the old flight, writing its value back after the invalidate.)
    """
    entered, proceed, gate = threading.Event(), threading.Event(), threading.Event()

    class PausingForget(RedisGroup[str, str]):
        def forget(self, key: str) -> None:
            if pause == "after":
                super().forget(key)
            entered.set()
            assert proceed.wait(10)
            if pause == "before":
                super().forget(key)

    client = redis.Redis(port=server.port)
    group = PausingForget(client, namespace=f"race-{pause}", result_ttl=0)
    version = ["old"]
    loads: list[str] = []

    def load(key: str) -> str:
        seen = version[0]
        loads.append(seen)
        assert gate.wait(10)
        return seen

    cache: LoadingCache[str, str] = LoadingCache(load, ttl=60, group=group)
    got: dict[str, str] = {}
    leader = threading.Thread(target=lambda: got.setdefault("leader", cache.get("k")))
    leader.start()
    try:
        _wait_until("the first load runs", lambda: loads == ["old"])
        version[0] = "new"  # the source changes, and the cache is told
        invalidator = threading.Thread(target=cache.invalidate, args=("k",))
        invalidator.start()
        assert entered.wait(10)
        late = threading.Thread(target=lambda: got.setdefault("late", cache.get("k")))
        late.start()
        if pause == "before":  # the group still has the old flight: the late get joins it
            _wait_until("the late get joins", lambda: group.stats().joins == 1)
        else:  # forgotten: the late get loads anew
            _wait_until("the late get loads", lambda: len(loads) == 2)
        gate.set()
        leader.join(10)
        late.join(10)
        proceed.set()
        invalidator.join(10)
        assert not (leader.is_alive() or late.is_alive() or invalidator.is_alive())
        assert got["leader"] == "old"
        assert cache.get("k") == "new"
        assert loads[-1] == "new"
    finally:
        gate.set()
        proceed.set()
        group.close()
        client.close()
