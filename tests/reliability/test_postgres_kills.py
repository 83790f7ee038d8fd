"""PostgreSQL connections killed (``pg_terminate_backend``) again and again while deploys are
accepted and running.

The test creates a database of its own on the server of the ``postgres_url`` fixture (so the
reconciler it runs sees only this test's jobs), starts two prefork workers on it and on a Redis
database of its own, sends deploys through the in-process API from four threads, and kills every
backend of that database but its own every :data:`KILL_EVERY` seconds, :data:`KILLS` times,
while work is in flight. The reconciler runs every two seconds, as beat would.

Worker side: every accepted deployment ends ``success``, one row each, files correct, nothing
left ``running``. API side: no 500; a request whose database connection was killed under it is
a 503 in the error shape (``api_stub.errors``), and a rejected deploy left no row behind that
did not end final. The same fault seen by clients over real HTTP keep-alive connections is
``test_api_database_faults.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from tests.conftest import BUCKET
from tests.support.api import make_org_client
from tests.support.outage_s3 import OutageS3Proxy
from tests.support.pg_faults import Killer
from tests.support.pg_faults import own_database as fresh_database
from tests.support.reliability import (
    Load,
    Workers,
    check,
    environment,
    org_deployments,
    wait_all_final,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

BROKER_DB = 10
JOBS = 100
KILLS = 12
KILL_EVERY = 0.75


@pytest.fixture
def own_database(postgres_url: str) -> Iterator[tuple[str, str]]:
    """(url, name) of a fresh, migrated database on the test server, dropped at the end."""
    with fresh_database(postgres_url, "widgets_kills") as database:
        yield database


def _reconcile() -> None:
    from worker.tasks.maintenance import reconcile_and_resend

    reconcile_and_resend()


def test_postgres_connections_killed_repeatedly_mid_run(
    services: dict[str, Any],
    own_database: tuple[str, str],
    tmp_path: Path,
    guarantee: Any,
) -> None:
    from api_stub.app import app as api

    url, name = own_database
    broker = services["broker"].rsplit("/", 1)[0] + f"/{BROKER_DB}"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    proxy = OutageS3Proxy(services["moto_url"])
    proxy.slow(0.05)
    env = {"DATABASE_URL": url, "CELERY_BROKER_URL": broker, "S3_ENDPOINT_URL": proxy.url}
    try:
        with environment(**env), TestClient(api) as http, Workers(tmp_path, env) as workers:
            workers.start(concurrency=2, wait=False)
            workers.start(concurrency=2)
            workers.wait_ready(workers.started[0])
            org = make_org_client(http)
            widgets = [org.widget() for _ in range(10)]
            load = Load(org, widgets, threads=4)
            runner = load.in_background(JOBS, pace=0.05)
            deadline = time.monotonic() + 90
            while True:
                rows = org_deployments(org.id)
                busy = sum(1 for r in rows if r.status in ("ready", "running"))
                if len(load.accepted) >= 10 and busy >= 2:
                    break
                assert time.monotonic() < deadline, (len(load.accepted), busy)
                time.sleep(0.05)
            in_flight = busy
            killer = Killer(url.rsplit("/", 1)[0], name, KILLS, KILL_EVERY)
            start = time.monotonic()
            killer.start()
            killer.join(timeout=120)
            end = time.monotonic()
            runner.join(timeout=180)
            final = wait_all_final(org.id, 240, tick=_reconcile)
            counts = check(org.id, load.accepted, services["s3"], BUCKET)
            statuses = load.statuses()
            p99 = load.p99_between(start, end)
            during = sum(1 for c in load.calls if start <= c.started <= end)
            errors = load.errors()
    finally:
        proxy.close()
        client.flushdb()
        client.close()

    assert killer.killed >= KILLS, killer.killed  # the fault landed: connections were in use
    assert during > 0, "no request overlapped the kills"
    # The API: a killed connection is a 503 in the error shape, never a 500.
    assert set(statuses) <= {202, 503}, (statuses, errors[:5])
    for _, body in errors:
        assert json.loads(body)["name"] == "Unavailable", body
    assert (counts.lost, counts.duplicated, counts.stale, counts.running) == (0, 0, 0, 0)
    accepted_ids = {d["id"] for d in load.accepted}
    assert all(r.status == "success" for r in final if r.id in accepted_ids)
    # Rows whose request got a 5xx after its commit are finished too (the reconciler sent them).
    assert all(r.status in ("success", "failure") for r in final)
    guarantee(
        f"PostgreSQL backends killed {KILLS} times, every {KILL_EVERY} s",
        jobs=counts.jobs,
        accepted=len(load.accepted),
        faults=killer.killed,
        in_flight_at_fault=in_flight,
        requests_during_fault=during,
        lost=counts.lost,
        duplicated=counts.duplicated,
        stale=counts.stale,
        failures=counts.failures,
        requeues=counts.requeues,
        http_5xx=sum(n for s, n in statuses.items() if s >= 500),
        http_other=sum(n for s, n in statuses.items() if s not in (202,) and s < 500),
        api_p99_s=round(p99, 3),
        first_errors=[e[:160] for _, e in errors[:3]],
    )
