"""A small ASGI service: user profiles from SQLite, through an AsyncLoadingCache.

    pip install 'pysingleflight[demo]'
    python -m uvicorn app:app --app-dir examples/web_service --port 8000
    python examples/web_service/load.py --requests 500 --users 10 --rounds 3 --pause 11

GET /users/{id}  the user's profile with their global and per-country rank: a slow query
                 (two scans of the users table), loaded once per key per TTL however many
                 requests ask at the same time
GET /stats       how many profile queries SQLite really executed, and the counters of the cache
                 and of the middleware in front (identical concurrent GETs share one call of
                 the app: see singleflight.asgi)

Settings from the environment: WEB_SERVICE_DB (the SQLite file; built if missing, default
web_service.db in the temporary directory), WEB_SERVICE_ROWS (users, default 100000),
WEB_SERVICE_TTL (seconds an entry lives, default 10).

The query count comes from SQLite itself: every connection has a trace callback, which
SQLite calls for each statement it starts.  Nothing here counts calls of the loader.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import sqlite3
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from singleflight import AsyncGroup, AsyncLoadingCache
from singleflight.asgi import STATUS_HEADER, CoalescingMiddleware

DB_PATH = Path(os.environ.get("WEB_SERVICE_DB", Path(tempfile.gettempdir()) / "web_service.db"))
ROWS = int(os.environ.get("WEB_SERVICE_ROWS", "100000"))
TTL = float(os.environ.get("WEB_SERVICE_TTL", "10"))

PROFILE_SQL = """/* profile */
SELECT u.id, u.name, u.country, u.score,
       (SELECT count(*) FROM users AS o WHERE o.score > u.score) + 1 AS global_rank,
       (SELECT count(*) FROM users AS o
         WHERE o.country = u.country AND o.score > u.score) + 1 AS country_rank
  FROM users AS u
 WHERE u.id = ?"""
COLUMNS = ("id", "name", "country", "score", "global_rank", "country_rank")


def build_database(path: Path, rows: int) -> None:
    """Create the users table with ``rows`` users, unless the file already has them."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        try:
            (count,) = conn.execute("SELECT count(*) FROM users").fetchone()
            if count == rows:
                return
        except sqlite3.OperationalError:
            pass
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("DROP TABLE IF EXISTS users")
        conn.execute(
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, country TEXT, score INTEGER)"
        )
        rng = random.Random(42)
        countries = ["AR", "BR", "DE", "FR", "IN", "JP", "NG", "SE", "US", "ZA"]
        with conn:
            conn.executemany(
                "INSERT INTO users VALUES (?, ?, ?, ?)",
                (
                    (i, f"user {i}", rng.choice(countries), rng.randrange(1_000_000))
                    for i in range(1, rows + 1)
                ),
            )


class Database:
    """One SQLite connection per thread; counts the profile queries SQLite executes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.queries = 0
        self._lock = threading.Lock()
        self._local = threading.local()

    def _trace(self, statement: str) -> None:
        if statement.startswith("/* profile */"):
            with self._lock:
                self.queries += 1

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path)
            conn.set_trace_callback(self._trace)
            self._local.conn = conn
        return conn

    def profile(self, user_id: int) -> dict[str, Any] | None:
        row = self._connection().execute(PROFILE_SQL, (user_id,)).fetchone()
        return None if row is None else dict(zip(COLUMNS, row, strict=True))


db = Database(DB_PATH)


async def load_profile(user_id: int) -> dict[str, Any] | None:
    # The driver blocks, so it runs in a worker thread; the cache makes sure that
    # concurrent requests for one user wait for one query rather than each run it.
    return await asyncio.to_thread(db.profile, user_id)


profiles: AsyncLoadingCache[int, dict[str, Any] | None] = AsyncLoadingCache(
    load_profile,
    ttl=TTL,
    stale=TTL,  # after expiry, answer at once with the old profile while one refresh runs
    negative=lambda profile: profile is None,  # remember unknown users too...
    negative_ttl=TTL,  # ...for as long
)


async def user(request: Request) -> JSONResponse:
    try:
        user_id = int(request.path_params["user_id"])
    except ValueError:
        return JSONResponse({"error": "user ids are whole numbers"}, status_code=400)
    profile = await profiles.get(user_id)
    if profile is None:
        return JSONResponse({"error": f"no user {user_id}"}, status_code=404)
    return JSONResponse(profile)


# Identical concurrent requests (same URL, same Authorization and Cookie) share one call of
# the app: the cache answers them once, and the JSON is rendered once.
requests = AsyncGroup[object, object](name="requests")


async def stats(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "db_queries": db.queries,
            "ttl": TTL,
            "cache": dataclasses.asdict(profiles.stats()),
            "requests": dataclasses.asdict(requests.stats()),
        }
    )


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await asyncio.to_thread(build_database, DB_PATH, ROWS)
    yield
    await profiles.aclose()  # cancel background refreshes before the loop closes


app = Starlette(
    routes=[Route("/users/{user_id}", user), Route("/stats", stats)],
    middleware=[Middleware(CoalescingMiddleware, group=requests, status_header=STATUS_HEADER)],
    lifespan=lifespan,
)
