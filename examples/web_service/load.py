"""Fire bursts of concurrent HTTP requests at the web service; print the database's count.

    python examples/web_service/load.py --url http://127.0.0.1:8000
    python examples/web_service/load.py --requests 500 --users 10 --rounds 3 --pause 11

It first waits (at most ``--wait`` seconds) for the service to answer: a service just
started is still building its database.  Each round sends ``--requests`` GET /users/{id}
requests for ``--users`` users, at most ``--concurrency`` at a time, waits for the
refreshes the round started to finish, then asks GET /stats how many queries SQLite
executed during the round.  With the cache, that is one per user the first time, and
again one per user once their entries have expired (the service's TTL), however many
requests: when a round takes longer than the TTL, entries also expire during it, and
the script says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from typing import Any

import httpx

CONNECTIONS_PER_CLIENT = 10  # httpx's pool gets slow with many connections: use several


async def burst(
    clients: list[httpx.AsyncClient], requests: int, users: int, concurrency: int
) -> dict[int, int]:
    """Send the requests, spread over ``clients``; return how many got each status code."""
    limit = asyncio.Semaphore(concurrency)
    statuses: dict[int, int] = {}

    async def one(i: int) -> None:
        async with limit:
            response = await clients[i % len(clients)].get(f"/users/{1 + i % users}")
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    await asyncio.gather(*(one(i) for i in range(requests)))
    return statuses


async def wait_until_up(client: httpx.AsyncClient, wait: float) -> dict[str, Any]:
    """GET /stats once the service answers, polling for at most ``wait`` seconds."""
    deadline = time.monotonic() + wait
    told = False
    while True:
        try:
            response = await client.get("/stats")
            response.raise_for_status()
            stats: dict[str, Any] = response.json()
            return stats
        except httpx.HTTPError:
            if time.monotonic() >= deadline:
                raise
            if not told:
                print(f"waiting for the service at {client.base_url} ...", file=sys.stderr)
                told = True
            await asyncio.sleep(0.25)


async def settled_count(client: httpx.AsyncClient, quiet: float = 0.5, wait: float = 30) -> int:
    """The service's query count once it has not moved for ``quiet`` seconds (background
    refreshes a burst started have finished), waiting at most ``wait`` seconds."""
    deadline = time.monotonic() + wait
    count = (await client.get("/stats")).json()["db_queries"]
    steady_since = time.monotonic()
    while time.monotonic() - steady_since < quiet and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = (await client.get("/stats")).json()["db_queries"]
        if now != count:
            count, steady_since = now, time.monotonic()
    return int(count)


async def main(args: argparse.Namespace) -> int:
    per_client = min(args.concurrency, CONNECTIONS_PER_CLIENT)
    limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=args.url, limits=limits, timeout=30)
            )
            for _ in range(-(-args.concurrency // per_client))
        ]
        client = clients[0]
        try:
            stats = await wait_until_up(client, args.wait)
        except httpx.HTTPError as exc:
            print(
                f"load.py: cannot reach the service at {args.url} (waited {args.wait:g} s): {exc}",
                file=sys.stderr,
            )
            return 1
        before, ttl = int(stats["db_queries"]), float(stats["ttl"])
        for round_ in range(1, args.rounds + 1):
            if round_ > 1:
                await asyncio.sleep(args.pause)
            started = time.perf_counter()
            statuses = await burst(clients, args.requests, args.users, args.concurrency)
            seconds = time.perf_counter() - started
            after = await settled_count(client)
            codes = ", ".join(f"{n} x {code}" for code, n in sorted(statuses.items()))
            print(
                f"round {round_}: {args.requests} requests for {args.users} users in "
                f"{seconds:.2f} s ({codes}) -> {after - before} database queries"
            )
            if seconds > 0.9 * ttl:  # entries live ttl * (1 +- 10%)
                print(
                    f"  (the round took longer than the cache's TTL of {ttl:g} s, so entries "
                    "also expired during it: send fewer --requests, or start the service "
                    "with a longer WEB_SERVICE_TTL)"
                )
            before = after
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    parser.add_argument("--requests", type=int, default=1000, help="requests per round")
    parser.add_argument("--users", type=int, default=10, help="distinct users asked for")
    parser.add_argument("--concurrency", type=int, default=100, help="requests at a time")
    parser.add_argument("--rounds", type=int, default=1, help="bursts to send")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between rounds")
    parser.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for the service to answer"
    )
    args = parser.parse_args(argv)
    for name in ("requests", "users", "concurrency", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.pause < 0 or args.wait < 0:
        parser.error("--pause and --wait must not be negative")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
