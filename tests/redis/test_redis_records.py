"""Completion records nobody trustworthy wrote: a waiter neither spins nor floods the log.

A record on a live leader's completion stream that does not decode (forged,
corrupt) or has a status no leader writes, or an "abandoned" / "forgotten"
record while its leader still holds the lease, is read once per flight: the
waiter then waits for the records after it (the leader's real completion),
counts the payload as untrusted and logs one WARNING.  Each runs for
RedisGroup and AsyncRedisGroup.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from _redis_server import RedisServer
from _redis_sides import Loader

pytestmark = pytest.mark.timeout(60)

FORGED = [
    pytest.param(b"o", b"j1:{not json", True, id="undecodable-value"),
    pytest.param(b"e", b"garbage", True, id="undecodable-error"),
    pytest.param(b"x", b"", True, id="unknown-status"),
    pytest.param(b"a", b"", False, id="abandoned-while-held"),
    pytest.param(b"f", b"", False, id="forgotten-while-held"),
]


@pytest.mark.parametrize(("status", "payload", "untrusted"), FORGED)
def test_a_forged_record_on_a_live_flight_is_read_once(
    sides: Any,
    server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    status: bytes,
    payload: bytes,
    untrusted: bool,
) -> None:
    a, b = sides(server.port, lease=1.0), sides(server.port, lease=1.0)
    loader = Loader("real", seconds=1.0)  # a live leader, renewing its lease meanwhile
    leading = a.submit("k", loader)
    deadline = time.monotonic() + 10
    while loader.runs < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    admin = server.client()
    token = admin.hget("sf:{test:k}:fence", "tok")
    assert token is not None and loader.runs == 1
    admin.xadd(b"sf:{test:k}:done:" + token, {"s": status, "v": payload})
    before = server.commandstats()
    with caplog.at_level(logging.INFO, logger="singleflight.redis"):
        waiting = b.submit("k", loader)
        first, second = leading.result(30), waiting.result(30)
    after = server.commandstats()
    admin.close()

    assert (first.value, first.error) == ("real", None)
    assert (second.value, second.error) == ("real", None), second  # the real completion
    assert loader.runs == 1
    sent = {name: after.get(name, 0) - before.get(name, 0) for name in ("evalsha", "eval", "xread")}
    # b: ACQUIRE, XREAD (the forged record), ACQUIRE, XREAD (the real one); a: COMPLETE
    # and a few renewals.  Reading the forged record again and again sent thousands.
    assert sum(sent.values()) <= 12, sent
    assert b.stats().untrusted_payloads == (1 if untrusted else 0)
    # A fleet cache left by an earlier test of this process may still log about its
    # channel (under load its heartbeat can lapse): not this group's warning.
    warnings = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name != "singleflight.redis.fleet"
    ]
    assert len(warnings) == (1 if untrusted else 0), [r.getMessage() for r in warnings]
