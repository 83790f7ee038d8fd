"""Database engine (one per process, created lazily after fork) and unit-of-work sessions."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, create_engine

from worker.settings import get_settings

SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_BEGIN_OPTION = "sqlite_begin"

_lock = threading.Lock()
_engine: Engine | None = None
_engine_pid: int | None = None


def _configure_sqlite(engine: Engine) -> None:
    """WAL, foreign keys, a busy timeout, and write-intent transactions.

    pysqlite's own BEGIN is deferred: a transaction that reads and then writes can fail with
    "database is locked" without waiting. Taking the write lock at BEGIN (IMMEDIATE) makes
    concurrent workers queue behind each other instead (SQLAlchemy's documented recipe).
    Read-only sessions (:func:`read_only_engine`) begin DEFERRED: in WAL mode they read a
    snapshot without waiting for a writer, e.g. one holding the lock across an S3 upload.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
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
POOL_TIMEOUT = 10


def _postgres_connect_args(runtime: bool) -> dict[str, Any]:
    args: dict[str, Any] = {
        "connect_timeout": POSTGRES_CONNECT_TIMEOUT,
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
    }
    if runtime:
        args["options"] = POSTGRES_RUNTIME_OPTIONS
    return args


def build_engine(url: str, *, runtime: bool = False) -> Engine:
    """An engine for ``url``; ``runtime`` adds the statement and lock timeouts the API and
    workers run with (a migration may legitimately run long)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        _configure_sqlite(engine)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        pool_timeout=POOL_TIMEOUT,
        connect_args=_postgres_connect_args(runtime),
    )


def get_engine() -> Engine:
    """This process's engine. A child forked from a parent that had one builds its own."""
    global _engine, _engine_pid
    with _lock:
        if _engine is None or _engine_pid != os.getpid():
            if _engine is not None:
                # Inherited across fork: drop the parent's pooled sockets without closing them.
                _engine.dispose(close=False)
            _engine = build_engine(get_settings().sqlalchemy_url, runtime=True)
            _engine_pid = os.getpid()
        return _engine


def read_only_engine() -> Engine:
    """The engine for sessions that never write (no SQLite write lock; same pool)."""
    return get_engine().execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})


def reset_engine() -> None:
    """Forget the engine (tests that switch DATABASE_URL, worker shutdown)."""
    global _engine, _engine_pid
    with _lock:
        if _engine is not None and _engine_pid == os.getpid():
            _engine.dispose()
        _engine, _engine_pid = None, None


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


@contextmanager
def unit_of_work() -> Iterator[Session]:
    """One transaction: commits once at the end, rolls back on any error."""
    with Session(get_engine(), expire_on_commit=False) as session, session.begin():
        yield session
