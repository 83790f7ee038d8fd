"""Database engines (one per process and role, created lazily after fork) and unit-of-work
sessions.

Two roles: :func:`get_engine` is the workers' (and migrations', CLI's) engine; :func:`api_engine`
the HTTP API's, with tighter bounds, since a client is waiting on every statement:

============================  ==========================  ==================================
bound                         workers (``get_engine``)    API (``api_engine``)
============================  ==========================  ==================================
SQLite busy wait (lock)       30 s                        :data:`API_SQLITE_BUSY_TIMEOUT_MS`
PostgreSQL statement          60 s                        15 s
PostgreSQL lock wait          10 s                        5 s
PostgreSQL connect            5 s                         5 s
wait for a pooled connection  :data:`POOL_TIMEOUT`        :data:`POOL_TIMEOUT`
============================  ==========================  ==================================

What is worth a 503 (the database is unavailable or busy *now*, a retry later may succeed) is
decided by :func:`database_unavailable`, in one place.

**SQLite under many concurrent API clients** (the embedded default): an API request waits at
most ``api_stub.admission.ADMISSION_TIMEOUT`` (10 s) for its turn (in the event loop, not in a
thread), then at most :data:`API_SQLITE_BUSY_TIMEOUT_MS` (5 s) for a write lock held by another
process; past either it is a 503 with ``Retry-After``, never a timeout or a 500. The pool
(:data:`SQLITE_POOL_SIZE` + :data:`SQLITE_MAX_OVERFLOW`) is as large as the sessions the API
admits at once, so no request waits for a connection; WAL lets reads proceed beside the writer.
Before this, 50 clients made request threads wait on the write lock (30 s) or the pool (5 + 10
connections, 30 s) while the request that held them waited for a thread: "database is locked"
and "QueuePool limit" 500s and 30 s client timeouts.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlmodel import Session, create_engine

from worker import steps
from worker.settings import get_settings

Role = Literal["worker", "api"]

SQLITE_BUSY_TIMEOUT_MS = 30_000
# The API waits this long for SQLite's write lock, then answers 503. Within one API process
# writers queue in the event loop (api_stub.admission), so only one request thread at a time
# waits here, behind other processes' transactions (workers', other API processes'), which hold
# the lock for milliseconds: no transaction is open across a network call.
API_SQLITE_BUSY_TIMEOUT_MS = 5_000
SQLITE_BEGIN_OPTION = "sqlite_begin"
# SQLite connections are cheap (a file handle or three): enough that a request never waits for
# one (api_stub.admission admits at most this many sessions at once per API process).
SQLITE_POOL_SIZE = 20
SQLITE_MAX_OVERFLOW = 40

_lock = threading.Lock()
_engines: dict[Role, tuple[Engine, int]] = {}


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    """WAL, ``synchronous=NORMAL``, foreign keys, a busy timeout, write-intent transactions.

    pysqlite's own BEGIN is deferred: a transaction that reads and then writes can fail with
    "database is locked" without waiting. Taking the write lock at BEGIN (IMMEDIATE) makes
    concurrent workers queue behind each other instead (SQLAlchemy's documented recipe).
    Read-only sessions (:func:`read_only_engine`) begin DEFERRED: in WAL mode they read a
    snapshot without waiting for a writer, e.g. one holding the lock across an S3 upload.
    ``synchronous=NORMAL`` is SQLite's recommended setting in WAL mode: a commit no longer
    waits for an fsync (the WAL is synced at checkpoints), so the write lock is held for
    microseconds of I/O instead of an fsync; a process crash loses nothing, a power loss may
    lose the last commits but never corrupts the database.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")


# PostgreSQL: no call waits forever on a database that hangs or vanishes. Connecting gives up
# after POSTGRES_CONNECT_TIMEOUT s, TCP keepalives notice a peer that disappeared, and (for the
# application's own sessions, not migrations) a statement, a lock wait or a transaction left idle
# is cut short by the server. A connection that died while pooled is replaced at checkout
# (pool_pre_ping); a thread waits at most POOL_TIMEOUT s for a pooled connection.
POSTGRES_CONNECT_TIMEOUT = 5
POSTGRES_RUNTIME_OPTIONS = (
    "-c statement_timeout=60000 -c lock_timeout=10000 -c idle_in_transaction_session_timeout=120000"
)
POSTGRES_API_OPTIONS = (
    "-c statement_timeout=15000 -c lock_timeout=5000 -c idle_in_transaction_session_timeout=120000"
)
POOL_TIMEOUT = 10
POSTGRES_POOL_SIZE = 5
POSTGRES_MAX_OVERFLOW = 5
# A worker process of the threads pool runs up to 32 tasks (and a chunk's 8 publish threads)
# on one engine: a transaction lasts milliseconds, but a burst must not wait POOL_TIMEOUT for a
# connection. Connections past the pool size are closed when returned.
POSTGRES_WORKER_MAX_OVERFLOW = 40


def _postgres_connect_args(options: str | None, role: Role) -> dict[str, Any]:
    args: dict[str, Any] = {
        # Who is who in pg_stat_activity (and for pg_terminate_backend).
        "application_name": f"widgets-{role}",
        "connect_timeout": POSTGRES_CONNECT_TIMEOUT,
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
    }
    if options:
        args["options"] = options
    return args


def build_engine(url: str, *, runtime: bool = False, role: Role = "worker") -> Engine:
    """An engine for ``url``; ``runtime`` adds the statement and lock timeouts the API and
    workers run with (a migration may legitimately run long), ``role`` which of them."""
    parsed = make_url(url)
    api = runtime and role == "api"
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        busy_ms = API_SQLITE_BUSY_TIMEOUT_MS if api else SQLITE_BUSY_TIMEOUT_MS
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": busy_ms / 1000},
            pool_size=SQLITE_POOL_SIZE,
            max_overflow=SQLITE_MAX_OVERFLOW,
            pool_timeout=POOL_TIMEOUT,
        )
        _configure_sqlite(engine, busy_ms)
        return engine
    options = (POSTGRES_API_OPTIONS if api else POSTGRES_RUNTIME_OPTIONS) if runtime else None
    worker = runtime and role == "worker"
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=POSTGRES_POOL_SIZE,
        max_overflow=POSTGRES_WORKER_MAX_OVERFLOW if worker else POSTGRES_MAX_OVERFLOW,
        pool_timeout=POOL_TIMEOUT,
        connect_args=_postgres_connect_args(options, role),
    )


def pool_capacity(engine: Engine) -> int:
    """Connections ``engine``'s pool opens at most (pool size + overflow)."""
    if engine.dialect.name == "sqlite":
        return SQLITE_POOL_SIZE + SQLITE_MAX_OVERFLOW
    return POSTGRES_POOL_SIZE + POSTGRES_MAX_OVERFLOW


def _engine_for(role: Role) -> Engine:
    with _lock:
        current = _engines.get(role)
        if current is not None and current[1] == os.getpid():
            return current[0]
        if current is not None:
            # Inherited across fork: drop the parent's pooled sockets without closing them.
            current[0].dispose(close=False)
        engine = build_engine(get_settings().sqlalchemy_url, runtime=True, role=role)
        _engines[role] = (engine, os.getpid())
        return engine


def get_engine() -> Engine:
    """This process's engine. A child forked from a parent that had one builds its own."""
    return _engine_for("worker")


def read_only_engine() -> Engine:
    """The engine for sessions that never write (no SQLite write lock; same pool)."""
    return get_engine().execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})


def api_engine(*, read_only: bool = False) -> Engine:
    """The HTTP API's engine (tighter timeouts, see the module's table); ``read_only`` as for
    :func:`read_only_engine`."""
    engine = _engine_for("api")
    return engine.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"}) if read_only else engine


def reset_engine() -> None:
    """Forget the engines (tests that switch DATABASE_URL, worker shutdown)."""
    with _lock:
        for engine, pid in _engines.values():
            if pid == os.getpid():
                engine.dispose()
        _engines.clear()


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


@contextmanager
def unit_of_work(step: str = "transaction") -> Iterator[Session]:
    """One transaction: commits once at the end, rolls back on any error. ``step`` names it
    (:mod:`worker.steps`): the jobs' transactions are the steps their guarantees are stated
    between."""
    steps.reached(step)
    with Session(get_engine(), expire_on_commit=False) as session, session.begin():
        yield session


@contextmanager
def read_session(step: str) -> Iterator[Session]:
    """A read-only session (no SQLite write lock: a WAL snapshot), as a named step."""
    steps.reached(step)
    with Session(read_only_engine(), expire_on_commit=False) as session:
        yield session


# -- the database is unavailable (a 503, not a 500) --------------------------------------------


@dataclass(frozen=True)
class Unavailable:
    """Why the database cannot serve a request right now, when a retry later may succeed."""

    reason: str
    # The connection died under a statement: its transaction is rolled back (by the server, or
    # never committed), and the pool replaces the connection, so a read may be retried at once.
    connection_lost: bool = False


# SQLSTATE classes and codes (PostgreSQL) that mean "not now", not "never": connection
# exceptions, insufficient resources (too many connections...), operator intervention
# (shutdown, restart, statement_timeout's query_canceled), system errors, serialization
# failures and deadlocks (the transaction was rolled back), lock_timeout, and the server ending
# an idle transaction.
_PG_CLASSES = {
    "08": "connection to the database failed",
    "40": "conflict with a concurrent transaction",
    "53": "database out of resources",
    "57": "database unavailable",
    "58": "database system error",
}
_PG_CODES = {
    "57014": "database statement timed out",
    "55P03": "database lock wait timed out",
    "25P03": "database ended an idle transaction",
    "57P01": "database connection terminated",
    "57P02": "database connection terminated",
    "57P03": "database is starting up or shutting down",
}
_SQLITE_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_PROTOCOL}


def database_unavailable(exc: BaseException) -> Unavailable | None:
    """The reason ``exc`` means the database is unavailable or too busy *now* (a 503 with
    ``Retry-After``), or None for any other error (a bug, a constraint: not retryable).

    Covered: a connection that died under a statement (SQLAlchemy's ``connection_invalidated``),
    a connection that cannot be made, no pooled connection free within :data:`POOL_TIMEOUT`,
    SQLite's "database is locked"/busy, and PostgreSQL's statement and lock timeouts, shutdowns,
    resource exhaustion, deadlocks and serialization failures (see ``_PG_CLASSES``).
    """
    if isinstance(exc, PoolTimeoutError):
        return Unavailable("no database connection free in time")
    if not isinstance(exc, DBAPIError):
        return None
    orig = exc.orig
    if exc.connection_invalidated:
        return Unavailable("connection to the database lost", connection_lost=True)
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        if (code is not None and code & 0xFF in _SQLITE_BUSY_CODES) or "locked" in str(orig):
            return Unavailable("database is locked")
        return None
    if isinstance(orig, psycopg.Error):
        state = orig.sqlstate
        if state is None:
            # Raised by the client, not the server: the connection could not be made or is
            # gone (OperationalError, InterfaceError "the connection is closed").
            if isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError):
                return Unavailable("database unreachable")
            return None
        if state in _PG_CODES:
            return Unavailable(_PG_CODES[state])
        if state[:2] in _PG_CLASSES:
            return Unavailable(_PG_CLASSES[state[:2]])
    return None
