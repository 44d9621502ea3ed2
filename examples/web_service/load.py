"""Fire bursts of concurrent HTTP requests at the web service; print the database's count.

    python examples/web_service/load.py --url http://127.0.0.1:8000
    python examples/web_service/load.py --requests 2000 --users 10 --rounds 3 --pause 6

Each round sends ``--requests`` GET /users/{id} requests for ``--users`` users, at most
``--concurrency`` at a time, then asks GET /stats how many queries SQLite executed
during the round.  With the cache, that is one per user the first time, and again one
per user once their entries have expired (the service's TTL), however many requests.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import httpx


async def burst(
    client: httpx.AsyncClient, requests: int, users: int, concurrency: int
) -> dict[int, int]:
    """Send the requests; return how many got each status code."""
    limit = asyncio.Semaphore(concurrency)
    statuses: dict[int, int] = {}

    async def one(i: int) -> None:
        async with limit:
            response = await client.get(f"/users/{1 + i % users}")
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    await asyncio.gather(*(one(i) for i in range(requests)))
    return statuses


async def main(args: argparse.Namespace) -> int:
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, limits=limits, timeout=30) as client:
        try:
            before = (await client.get("/stats")).json()["db_queries"]
        except httpx.HTTPError as exc:
            print(f"load.py: cannot reach the service at {args.url}: {exc}", file=sys.stderr)
            return 1
        for round_ in range(1, args.rounds + 1):
            if round_ > 1:
                await asyncio.sleep(args.pause)
            started = time.perf_counter()
            statuses = await burst(client, args.requests, args.users, args.concurrency)
            seconds = time.perf_counter() - started
            await asyncio.sleep(0.2)  # let background refreshes the burst started finish
            after = (await client.get("/stats")).json()["db_queries"]
            codes = ", ".join(f"{n} x {code}" for code, n in sorted(statuses.items()))
            print(
                f"round {round_}: {args.requests} requests for {args.users} users in "
                f"{seconds:.2f} s ({codes}) -> {after - before} database queries"
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
    args = parser.parse_args(argv)
    for name in ("requests", "users", "concurrency", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.pause < 0:
        parser.error("--pause must not be negative")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
