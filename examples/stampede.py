"""1,000 concurrent callers ask for the same key; the loader runs once.

    python examples/stampede.py

Runs the same burst three ways — no coalescing, a thread Group, an asyncio
AsyncGroup — and prints how many times the (slow) loader ran for each.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from singleflight import AsyncGroup, Group

CALLERS = 1_000
LOAD_SECONDS = 0.2


class Database:
    """Stands in for a slow query; counts how often it is really asked."""

    def __init__(self) -> None:
        self.queries = 0
        self._lock = threading.Lock()

    def load_user(self, user_id: int) -> dict[str, object]:
        with self._lock:
            self.queries += 1
        time.sleep(LOAD_SECONDS)
        return {"id": user_id, "name": f"user {user_id}"}

    async def fetch_user(self, user_id: int) -> dict[str, object]:
        self.queries += 1
        await asyncio.sleep(LOAD_SECONDS)
        return {"id": user_id, "name": f"user {user_id}"}


def burst(call: object) -> float:
    start = threading.Barrier(CALLERS)

    def one() -> object:
        start.wait()
        return call()  # type: ignore[operator]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CALLERS) as pool:
        results = list(pool.map(lambda _: one(), range(CALLERS)))
    assert all(r == results[0] for r in results)
    return time.perf_counter() - t0


def main() -> None:
    naive = Database()
    seconds = burst(lambda: naive.load_user(42))
    print(f"no coalescing : {CALLERS} callers -> {naive.queries:>4} loads  ({seconds:.2f} s)")

    db = Database()
    users: Group[str, dict[str, object]] = Group()
    seconds = burst(lambda: users.do("user:42", db.load_user, 42))
    print(f"Group         : {CALLERS} callers -> {db.queries:>4} load   ({seconds:.2f} s)")

    adb = Database()
    ausers: AsyncGroup[str, dict[str, object]] = AsyncGroup()

    async def many() -> float:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(ausers.do("user:42", adb.fetch_user, 42) for _ in range(CALLERS))
        )
        assert all(r is results[0] for r in results)
        return time.perf_counter() - t0

    seconds = asyncio.run(many())
    print(f"AsyncGroup    : {CALLERS} callers -> {adb.queries:>4} load   ({seconds:.2f} s)")


if __name__ == "__main__":
    main()
