"""Coalescing across real processes: fan-in, a killed leader, a stalled leader, the watchdog.

Each test runs worker processes (_redis_worker.py) against a private
redis-server, counts loader runs in a file (not in Redis), and checks every
caller's outcome.  Each runs for RedisGroup (threads) and AsyncRedisGroup (tasks).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from _redis_fleet import Fleet, caller_errors, caller_values
from _redis_server import RedisServer

MODES = ["sync", "async"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", MODES)
def test_fan_in_one_load_for_8_processes_of_50_callers(
    mode: str, server: RedisServer, tmp_path: Path
) -> None:
    config = {"mode": mode, "port": server.port, "key": "cold", "callers": 50}
    config |= {"loader_seconds": 0.2, "lease": 3.0}
    before = server.commandstats()
    with Fleet(8, config, tmp_path / "loads") as fleet:
        fleet.start(timeout=60)
        reports = fleet.reports(timeout=30)
        loads = fleet.loads()
    after = server.commandstats()

    assert [kind for kind, _, _ in loads] == ["start", "end"]
    leader = loads[0][1]
    values = caller_values(reports)
    assert len(values) == 400
    assert caller_errors(reports) == []
    assert values == [{"pid": leader}] * 400
    # Everything the server ran for the flight: our commands, the commands run
    # by the scripts, and connection setup; minus this test's INFO calls.
    counted = {
        name: after.get(name, 0) - before.get(name, 0)
        for name in after
        if name not in ("info", "config|resetstat")
    }
    total = sum(counted.values())
    assert total <= 400, counted  # at most one Redis command per caller on average
    assert sum(r["stats"]["leads"] for r in reports) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_leader_sigkilled_mid_load_a_waiter_takes_over_within_the_lease(
    mode: str, server: RedisServer, tmp_path: Path
) -> None:
    lease = 1.0
    config = {"mode": mode, "port": server.port, "key": "k", "callers": 3}
    config |= {"loader_seconds": 1.5, "lease": lease}
    with Fleet(5, config, tmp_path / "loads") as fleet:
        fleet.start()
        (_, leader, started), *_ = fleet.wait_for_load(1, timeout=10)
        time.sleep(max(0.0, started + 0.5 - time.monotonic()))
        killed_at = time.monotonic()
        fleet.by_pid(leader).signal(signal.SIGKILL)
        survivors = [w for w in fleet.workers if w.pid != leader]
        reports = fleet.reports(timeout=20, workers=survivors)
        loads = fleet.loads()

    starts = [(pid, t) for kind, pid, t in loads if kind == "start"]
    ends = [(pid, t) for kind, pid, t in loads if kind == "end"]
    assert len(starts) == 2 and len(ends) == 1, loads
    successor, taken_over = starts[1]
    assert successor != leader
    assert taken_over - killed_at <= lease + 0.1, taken_over - killed_at
    assert caller_errors(reports) == []
    assert caller_values(reports) == [{"pid": successor}] * 12
    assert sum(r["stats"]["takeovers"] for r in reports) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_leader_stalled_past_its_lease_is_fenced_and_the_new_result_wins(
    mode: str, server: RedisServer, tmp_path: Path
) -> None:
    lease = 1.0
    config = {"mode": mode, "port": server.port, "key": "k", "callers": 2}
    config |= {"loader_seconds": 1.0, "lease": lease, "result_ttl": 30.0}
    with Fleet(4, config, tmp_path / "loads") as fleet:
        fleet.start()
        (_, leader, started), *_ = fleet.wait_for_load(1, timeout=10)
        time.sleep(max(0.0, started + 0.3 - time.monotonic()))
        stalled = fleet.by_pid(leader)
        stalled.signal(signal.SIGSTOP)
        others = [w for w in fleet.workers if w is not stalled]
        reports = fleet.reports(timeout=20, workers=others)
        # Everybody else is done; now the old leader wakes up and completes.
        stalled.signal(signal.SIGCONT)
        (old,) = fleet.reports(timeout=20, workers=[stalled])
        loads = fleet.loads()
        client = server.client()
        stored = client.get("sf:{test:k}:res")
        client.close()

    starts = [pid for kind, pid, _ in loads if kind == "start"]
    assert len(starts) == 2 and starts[0] == leader, loads
    successor = starts[1]
    assert caller_errors(reports) == []
    assert caller_values(reports) == [{"pid": successor}] * 6  # nobody else saw the stale value
    assert old["stats"]["fenced"] == 1
    # The stalled leader's own callers get its own value (documented).
    assert [o["value"] for o in old["outcomes"]] == [{"pid": leader}] * 2
    assert stored == b'j1:{"pid":%d}' % successor


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_lease_shorter_than_the_loader_the_watchdog_keeps_one_load(
    mode: str, server: RedisServer, tmp_path: Path
) -> None:
    config = {"mode": mode, "port": server.port, "key": "k", "callers": 4}
    config |= {"loader_seconds": 1.6, "lease": 0.4}
    with Fleet(4, config, tmp_path / "loads") as fleet:
        fleet.start()
        reports = fleet.reports(timeout=30)
        loads = fleet.loads()

    assert [kind for kind, _, _ in loads] == ["start", "end"]
    assert caller_errors(reports) == []
    assert caller_values(reports) == [{"pid": loads[0][1]}] * 16
    stats = [r["stats"] for r in reports]
    assert sum(s["leads"] for s in stats) == 1
    assert sum(s["lost_leases"] + s["fenced"] + s["takeovers"] for s in stats) == 0
