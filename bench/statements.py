"""Counting the SQL statements a piece of work sends (SQLAlchemy engine events).

Used by the bench's "statements per deploy" table and by the test that keeps the deploy path
lean. Transaction control (``BEGIN``/``COMMIT``/``ROLLBACK``) is counted apart from the
statements that read or write rows; connection set-up (SQLite's ``PRAGMA``s, the pool's
pre-ping) is not counted at all.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")
_NOT_COUNTED = ("PRAGMA", "SELECT 1")  # connection set-up, pool pre-ping


@dataclass
class Statements:
    """What was sent: the statements (whitespace collapsed, for a readable breakdown), and the
    number of transactions begun and committed."""

    sent: list[str] = field(default_factory=list)
    begins: int = 0
    commits: int = 0

    @property
    def count(self) -> int:
        return len(self.sent)

    def breakdown(self) -> str:
        return "\n".join(f"  {i + 1:2}. {s}" for i, s in enumerate(self.sent))


@contextmanager
def counting(engine: Engine, *, this_thread: bool = False) -> Iterator[Statements]:
    """Count what ``engine`` (and its ``execution_options`` copies) sends inside the block;
    with ``this_thread``, only what the calling thread sends (other threads of the process,
    e.g. an in-process Celery worker, may use the same engine meanwhile)."""
    seen = Statements()
    caller = threading.get_ident()

    def counted() -> bool:
        return not this_thread or threading.get_ident() == caller

    def on_execute(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not counted():
            return
        head = statement.lstrip().upper()
        if head.startswith(_CONTROL):
            if head.startswith("BEGIN"):
                seen.begins += 1
            return
        if not head.startswith(_NOT_COUNTED):
            seen.sent.append(" ".join(statement.split()))

    def on_begin(conn: Any) -> None:
        # SQLite's BEGIN is an explicit statement (worker.db), counted by on_execute.
        if counted() and conn.dialect.name != "sqlite":
            seen.begins += 1

    def on_commit(_conn: Any) -> None:
        if counted():
            seen.commits += 1

    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine, "begin", on_begin)
    event.listen(engine, "commit", on_commit)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
        event.remove(engine, "begin", on_begin)
        event.remove(engine, "commit", on_commit)
