"""On SQLite, reads do not queue behind a writer (e.g. a deploy holding the write lock across
its S3 upload): GET requests and /health begin DEFERRED transactions on a WAL snapshot."""

from __future__ import annotations

import sqlite3

from worker.settings import get_settings


def test_get_requests_answer_while_another_process_holds_the_write_lock(sqlite_database, org):
    w = org.widget()
    path = get_settings().database_url.removeprefix("sqlite:///")
    holder = sqlite3.connect(path, isolation_level=None, timeout=1)
    try:
        holder.execute("BEGIN IMMEDIATE")  # what a publishing deploy holds
        holder.execute("UPDATE widgets SET name = name WHERE id = ?", (w["id"],))
        # Queued behind the lock they would wait out the busy timeout and answer 500/503.
        got = org.req("GET", f"/widgets/{w['id']}")
        listed = org.req("GET", "/widgets/deployments")
        health = org.http.get("/health")
        assert (got.status_code, listed.status_code, health.status_code) == (200, 200, 200)
        assert got.json()["id"] == w["id"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
