"""PostgreSQL faults for the reliability suite.

* :func:`own_database`: a fresh, migrated database of the test's own on the test server
  (dropped at the end), so what the test breaks and checks is only its own;
* :class:`Killer`: ``pg_terminate_backend`` of every backend of that database (but its own),
  again and again, counting what it killed, and how many of the API's connections
  (``application_name`` ``widgets-api``) were in use (a statement running, or a transaction
  open) at that moment: the proof that the fault landed under requests in flight.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from tests.conftest import migrate

API_APPLICATION = "widgets-api"


@contextmanager
def own_database(postgres_url: str, prefix: str = "widgets_faults") -> Iterator[tuple[str, str]]:
    """(url, name) of a fresh, migrated database on the server of ``postgres_url``."""
    server = postgres_url.rsplit("/", 1)[0]
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        migrate(f"{server}/{name}")
        yield f"{server}/{name}", name
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Killer(threading.Thread):
    """Terminates every backend of one database (but its own), ``times`` times, ``every``
    seconds apart."""

    def __init__(self, server: str, database: str, times: int, every: float) -> None:
        super().__init__(daemon=True)
        self.server, self.database, self.times, self.every = server, database, times, every
        self.killed = 0
        self.api_killed = 0
        self.api_busy_killed = 0  # API connections killed with a statement or transaction open
        self.rounds: list[float] = []

    def run(self) -> None:
        with psycopg.connect(f"{self.server}/postgres", autocommit=True) as conn:
            for _ in range(self.times):
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid), application_name, state "
                    "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                    (self.database,),
                ).fetchall()
                for ok, application, state in rows:
                    if not ok:
                        continue
                    self.killed += 1
                    if application == API_APPLICATION:
                        self.api_killed += 1
                        if state in ("active", "idle in transaction"):
                            self.api_busy_killed += 1
                self.rounds.append(time.monotonic())
                time.sleep(self.every)
