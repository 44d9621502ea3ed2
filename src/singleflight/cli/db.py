"""The demo's databases, and the count of queries each one really executed.

Two backends with one interface (:class:`Database`):

* :class:`SqliteDatabase`: a SQLite file the demo builds (100,000 users by
  default) in a temporary directory or at ``--db-file``.  Every connection
  has a trace callback (``Connection.set_trace_callback``): SQLite calls it
  for each statement it starts, with the bound parameters expanded, so the
  count is the driver's own, never this library's.
* :class:`PostgresDatabase`: the same table and query on a PostgreSQL
  server.  The query runs inside a server-side function that first inserts a
  row (run id, user id, the server's ``clock_timestamp()``) into an unlogged
  table, so the count and the times are the server's own records.

The query (:data:`PROFILE_SQL`) is a user profile with the user's global and
per-country rank by score: two scans of the whole table, since ``score`` has
no index, so each call is real SQL work of a few milliseconds, not a sleep.

Connections are per thread (SQLite connections and psycopg's must not be shared
between threads that use them at once); :meth:`Database.close` closes them all.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "COUNTRIES",
    "Database",
    "DatabaseError",
    "PROFILE_SQL",
    "PostgresDatabase",
    "SqliteDatabase",
    "describe_dsn",
    "user_rows",
]

PROFILE_COLUMNS = ("id", "name", "email", "country", "score", "global_rank", "country_rank")

# The marker lets the trace callback tell the profile query from anything else.
PROFILE_TAG = "singleflight-demo:profile"

# {users} is the table's name; the user id is the statement's last parameter,
# so the trace callback reads it off the expanded SQL's end.
PROFILE_SQL = f"""/* {PROFILE_TAG} */
SELECT u.id, u.name, u.email, u.country, u.score,
       (SELECT count(*) FROM {{users}} AS o WHERE o.score > u.score) + 1,
       (SELECT count(*) FROM {{users}} AS o
         WHERE o.country = u.country AND o.score > u.score) + 1
  FROM {{users}} AS u
 WHERE u.id = {{param}}"""

COUNTRIES = (
    *("AR", "AU", "BR", "CA", "DE", "ES", "FR", "GB", "IN", "IT"),
    *("JP", "KR", "MX", "NG", "NL", "PL", "SE", "TR", "US", "ZA"),
)
_FIRST_NAMES = (
    *("Ada", "Alan", "Barbara", "Dennis", "Donald", "Edsger", "Frances", "Grace"),
    *("Guido", "John", "Ken", "Linus", "Margaret", "Niklaus", "Radia", "Tim"),
)


class DatabaseError(Exception):
    """The database could not be reached or set up; the message is one line for the user."""


def user_rows(count: int, seed: int = 2024) -> list[tuple[int, str, str, str, int]]:
    """``count`` realistic user rows ``(id, name, email, country, score)``, the same for a seed."""
    rng = random.Random(seed)
    return [
        (
            i,
            f"{rng.choice(_FIRST_NAMES)} {i}",
            f"user{i}@example.com",
            rng.choice(COUNTRIES),
            rng.randrange(1_000_000),
        )
        for i in range(1, count + 1)
    ]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def describe_dsn(dsn: str) -> str:
    """``host:port/db`` of a PostgreSQL URL, without its password."""
    parts = urlsplit(dsn)
    host = parts.hostname or "localhost"
    port = parts.port or 5432
    return f"{host}:{port}{parts.path or '/'}"


class Database:
    """What the demo needs of a database: the slow query, and an honest count of it.

    ``profile(user_id)`` runs the query on the calling thread's connection.
    ``begin(run, origin)`` starts a count: from then on :meth:`executed` is
    the number of profile queries the database executed for this run, and
    :meth:`log` lists them as ``(started, finished, user id)``, times in
    seconds since ``origin``, a ``time.monotonic()`` reading.  ``counts_in_process`` says
    whether the count lives in this process (SQLite's trace callback: worker
    processes each keep their own) or on the server (PostgreSQL).
    """

    label: str
    counts_in_process: bool

    def __init__(self) -> None:
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        raise NotImplementedError

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._lock:
                self._connections.append(conn)
        return conn

    def profile(self, user_id: int) -> dict[str, Any]:
        raise NotImplementedError

    def begin(self, run: str, origin: float) -> None:
        raise NotImplementedError

    def executed(self) -> int:
        raise NotImplementedError

    def log(self) -> list[tuple[float, float, int]]:
        raise NotImplementedError

    def end(self) -> None:
        """Forget the current run's records (the server's too)."""

    def close(self) -> None:
        """Close the per-thread connections (the database stays usable)."""
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()

    def shutdown(self) -> None:
        """Close every connection, for good."""
        self.close()

    def spec(self) -> tuple[str, str, int]:
        """``(kind, where, rows)``, enough for :func:`attach` in another process."""
        raise NotImplementedError


def attach(spec: tuple[str, str, int]) -> Database:
    """Open a database another process has set up (for worker processes)."""
    kind, where, rows = spec
    if kind == "sqlite":
        return SqliteDatabase(Path(where), rows, create=False)
    return PostgresDatabase(where, rows, create=False)


# -- SQLite --------------------------------------------------------------------------


class SqliteDatabase(Database):
    """A SQLite file of ``rows`` users; created (or rebuilt, if it holds another
    number of rows) unless ``create`` is false."""

    counts_in_process = True

    def __init__(
        self, path: Path, rows: int, *, create: bool = True, label: str | None = None
    ) -> None:
        super().__init__()
        self.path = path
        self.rows = rows
        self._sql = PROFILE_SQL.format(users="users", param="?")
        self._origin = time.monotonic()
        self._entries: list[list[float]] = []  # [started, finished, user id]
        if create:
            self._build()
        elif not path.is_file():
            raise DatabaseError(f"SQLite file {path} does not exist")
        self.label = f"{label or f'SQLite file {path}'} ({rows:,} users)"

    def _build(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.closing(sqlite3.connect(self.path)) as conn:
                if self._has_users(conn):
                    return
                conn.execute("PRAGMA journal_mode=WAL")  # readers never wait on each other
                conn.execute("DROP TABLE IF EXISTS users")
                conn.execute(
                    "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                    "email TEXT NOT NULL, country TEXT NOT NULL, score INTEGER NOT NULL)"
                )
                with conn:
                    conn.executemany(
                        "INSERT INTO users VALUES (?, ?, ?, ?, ?)", user_rows(self.rows)
                    )
        except sqlite3.Error as exc:
            raise DatabaseError(
                f"cannot build SQLite file {self.path}: {_first_line(exc)}"
            ) from exc

    def _has_users(self, conn: sqlite3.Connection) -> bool:
        try:
            (count,) = conn.execute("SELECT count(*) FROM users").fetchone()
        except sqlite3.Error:
            return False
        return bool(count == self.rows)

    def _connect(self) -> sqlite3.Connection:
        # check_same_thread=False only so that close() may close it from
        # another thread; each connection is used by its own thread alone.
        conn = sqlite3.connect(self.path, check_same_thread=False)
        conn.set_trace_callback(self._trace)
        return conn

    def _trace(self, statement: str) -> None:
        # Called by SQLite, in the executing thread, as each statement starts:
        # the count and the start time are SQLite's.  profile() notes the end.
        if PROFILE_TAG in statement:
            try:
                user_id = int(statement.rsplit("=", 1)[1])
            except (IndexError, ValueError):  # parameters not expanded: still counted
                user_id = -1
            now = time.monotonic() - self._origin
            entry = [now, now, float(user_id)]
            self._entries.append(entry)
            self._local.entry = entry

    def profile(self, user_id: int) -> dict[str, Any]:
        self._local.entry = None
        try:
            row = self._connection().execute(self._sql, (user_id,)).fetchone()
        finally:
            entry = self._local.entry
            if entry is not None:
                entry[1] = time.monotonic() - self._origin
        if row is None:
            raise LookupError(f"no user {user_id}")
        return dict(zip(PROFILE_COLUMNS, row, strict=True))

    def begin(self, run: str, origin: float) -> None:
        self._origin = origin
        self._entries = []

    def executed(self) -> int:
        return len(self._entries)

    def log(self) -> list[tuple[float, float, int]]:
        return [(started, finished, int(key)) for started, finished, key in self._entries]

    def spec(self) -> tuple[str, str, int]:
        return ("sqlite", str(self.path), self.rows)


# -- PostgreSQL ----------------------------------------------------------------------

_SCHEMA = "singleflight_demo"

_SETUP = f"""
CREATE SCHEMA IF NOT EXISTS {_SCHEMA};
CREATE TABLE IF NOT EXISTS {_SCHEMA}.users (
    id integer PRIMARY KEY, name text NOT NULL, email text NOT NULL,
    country text NOT NULL, score integer NOT NULL);
-- One row per executed profile query, written by the server itself.  Unlogged:
-- no WAL, so recording costs next to nothing and never waits on a disk flush.
CREATE UNLOGGED TABLE IF NOT EXISTS {_SCHEMA}.query_log (
    run_id text NOT NULL, user_id integer NOT NULL,
    started timestamptz NOT NULL, finished timestamptz NOT NULL);
CREATE INDEX IF NOT EXISTS query_log_run ON {_SCHEMA}.query_log (run_id);
CREATE OR REPLACE FUNCTION {_SCHEMA}.profile(uid integer, run text)
RETURNS TABLE (id integer, name text, email text, country text, score integer,
               global_rank bigint, country_rank bigint)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    started timestamptz := clock_timestamp();
BEGIN
    RETURN QUERY {PROFILE_SQL.format(users=_SCHEMA + ".users", param="uid")};
    INSERT INTO {_SCHEMA}.query_log VALUES (run, uid, started, clock_timestamp());
END
$fn$;
"""

_FILL = f"""
INSERT INTO {_SCHEMA}.users
SELECT i,
       (ARRAY['{"','".join(_FIRST_NAMES)}'])
           [1 + mod(abs(hashtext('n' || i)), {len(_FIRST_NAMES)})] || ' ' || i,
       'user' || i || '@example.com',
       (ARRAY['{"','".join(COUNTRIES)}'])[1 + mod(abs(hashtext('c' || i)), {len(COUNTRIES)})],
       mod(abs(hashtext('s' || i)), 1000000)
  FROM generate_series(1, %s) AS i
"""

_LOCK_ID = 0x5F1D_DE30  # advisory lock around set-up: two demos never build at once


class PostgresDatabase(Database):
    """The demo's table and query on the PostgreSQL server at ``dsn``."""

    counts_in_process = False

    def __init__(self, dsn: str, rows: int, *, create: bool = True) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise DatabaseError("--dsn needs psycopg: pip install 'pysingleflight[demo]'") from exc
        super().__init__()
        self._psycopg = psycopg
        self.dsn = dsn
        self.rows = rows
        self.where = describe_dsn(dsn)
        self._run = ""
        self._server_origin = 0.0  # the server's epoch seconds at our origin
        self._monitor = self._connect()
        if create:
            self._build()
        self.label = f"PostgreSQL {self._server_version()} at {self.where} ({rows:,} users)"

    def _connect(self) -> Any:
        try:
            conn = self._psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
        except self._psycopg.Error as exc:
            raise DatabaseError(
                f"cannot connect to PostgreSQL at {self.where}: {_first_line(exc)}"
            ) from exc
        # Recording a query must not wait for a disk flush; one scan per query
        # on a 2-core machine, not a parallel plan.
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET max_parallel_workers_per_gather = 0")
        return conn

    def _server_version(self) -> str:
        (version,) = self._monitor.execute("SHOW server_version").fetchone()
        return str(version).split()[0]

    def _build(self) -> None:
        psycopg = self._psycopg
        conn = self._monitor
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
            try:
                conn.execute(_SETUP)
                (count,) = conn.execute(f"SELECT count(*) FROM {_SCHEMA}.users").fetchone()
                if count != self.rows:
                    with conn.transaction():
                        conn.execute(f"TRUNCATE {_SCHEMA}.users")
                        conn.execute(_FILL, (self.rows,))
                    conn.execute(f"ANALYZE {_SCHEMA}.users")
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
        except psycopg.Error as exc:
            raise DatabaseError(
                f"cannot set up the demo's tables on PostgreSQL at {self.where}: {_first_line(exc)}"
            ) from exc

    def max_clients(self) -> int:
        """Connections still free on the server, leaving a few for others."""
        (limit,) = self._monitor.execute("SHOW max_connections").fetchone()
        (used,) = self._monitor.execute("SELECT count(*) FROM pg_stat_activity").fetchone()
        (reserved,) = self._monitor.execute("SHOW superuser_reserved_connections").fetchone()
        return int(limit) - int(reserved) - int(used) - 2

    def profile(self, user_id: int) -> dict[str, Any]:
        row = (
            self._connection()
            .execute(f"SELECT * FROM {_SCHEMA}.profile(%s, %s)", (user_id, self._run))
            .fetchone()
        )
        if row is None:
            raise LookupError(f"no user {user_id}")
        return dict(zip(PROFILE_COLUMNS, row, strict=True))

    def begin(self, run: str, origin: float) -> None:
        """Use ``run`` as this run's id; map the server's clock onto ``origin``."""
        self._run = run
        before = time.monotonic()
        (server_now,) = self._monitor.execute(
            "SELECT extract(epoch FROM clock_timestamp())::float8"
        ).fetchone()
        after = time.monotonic()
        # The server read its clock about halfway through the round trip.
        self._server_origin = float(server_now) - ((before + after) / 2 - origin)

    def executed(self) -> int:
        (count,) = self._monitor.execute(
            f"SELECT count(*) FROM {_SCHEMA}.query_log WHERE run_id = %s", (self._run,)
        ).fetchone()
        return int(count)

    def log(self) -> list[tuple[float, float, int]]:
        rows = self._monitor.execute(
            "SELECT extract(epoch FROM started)::float8, extract(epoch FROM finished)::float8, "
            f"user_id FROM {_SCHEMA}.query_log WHERE run_id = %s ORDER BY started",
            (self._run,),
        ).fetchall()
        origin = self._server_origin
        return [(float(a) - origin, float(b) - origin, int(user_id)) for a, b, user_id in rows]

    def end(self) -> None:
        self._monitor.execute(f"DELETE FROM {_SCHEMA}.query_log WHERE run_id = %s", (self._run,))

    def shutdown(self) -> None:
        self.close()
        self._monitor.close()

    def spec(self) -> tuple[str, str, int]:
        return ("postgresql", self.dsn, self.rows)


def new_run_id() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
