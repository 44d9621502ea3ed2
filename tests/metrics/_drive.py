"""Drive real threads through a group: shared flights, errors, timeouts, rejections."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from singleflight import Group, TooManyFlightsError


def drive(group: Group[str, str], *, callers: int = 8) -> None:
    """Make ``group`` count flights, joins, an error, a timeout (if it has one) and a rejection.

    Every wait is bounded; the group's counters afterwards are what the tests compare.
    """
    release = threading.Event()
    entered = threading.Event()

    def slow() -> str:
        entered.set()
        assert release.wait(10)
        return "slow"

    def fail() -> str:
        raise ValueError("boom")

    with ThreadPoolExecutor(callers) as pool:
        first = pool.submit(group.do, "shared", slow)
        assert entered.wait(10)
        joiners = [pool.submit(group.do, "shared", slow) for _ in range(callers - 1)]
        # Joiners are counted when they join; wait until all have.
        for _ in range(1000):
            if group.stats().joins >= callers - 1:
                break
            threading.Event().wait(0.01)
        try:
            group.do("other", lambda: "x")
        except TooManyFlightsError:
            pass
        release.set()
        assert first.result(10) == "slow"
        assert all(j.result(10) == "slow" for j in joiners)
    try:
        group.do("bad", fail)
    except ValueError:
        pass
    assert group.do("alone", lambda: "alone") == "alone"
