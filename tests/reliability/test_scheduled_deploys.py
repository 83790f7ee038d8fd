"""Scheduled deploys at their due time, when the broker loses everything (``FLUSHALL``) or the
worker is killed (SIGKILL) just after beat's tick sent them.

The test starts its own ``redis-server``, a fresh SQLite database and a worker process on the
session's moto, with a visibility timeout of a few seconds (``tests.support.short_visibility``).
It schedules deploys of several widgets a few seconds ahead through the in-process API, edits
the widgets after the request, and runs beat's two ticks as beat would: the due-deploy tick
(``widgets.send_due_deployments``) and the reconciler (``widgets.reconcile``). Just after the
tick that sends them, the fault lands while their messages are queued or held by the worker.

After: every scheduled deployment ``success`` exactly once (one row each), each widget's file
the snapshot frozen when it was requested (not the later edit), and the delay after the due
time within one tick plus the reconciler's bound.
"""

from __future__ import annotations

import json
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from tests.conftest import BUCKET
from tests.support.api import make_org_client
from tests.support.reliability import (
    RedisServer,
    Workers,
    environment,
    finish_leftovers,
    fresh_sqlite,
    org_deployments,
    wait_all_final,
)
from worker import constants as c
from worker.models import utcnow
from worker.services.reconcile import RESEND_AFTER

pytestmark = pytest.mark.e2e

WIDGETS = 6
LEAD = 4.0  # seconds from the request to the due time
TICK = 1.0  # beat's ticks here (SCHEDULE_TICK_SECONDS is 5 s by default, the reconciler 60 s)
# A message lost at the due time is re-sent by the first reconcile run RESEND_AFTER seconds
# after the tick sent it; a killed worker's messages come back after the visibility timeout.
BOUND = TICK + RESEND_AFTER + TICK + 30.0


def _beat() -> None:
    """Both of beat's ticks, as beat runs them."""
    from worker.tasks.maintenance import reconcile_and_resend, send_due_deployments

    send_due_deployments()
    reconcile_and_resend()


@pytest.mark.parametrize("fault", ["flushall", "worker-sigkill"])
def test_a_scheduled_deploy_publishes_once_after_a_fault_at_its_due_time(
    services: dict[str, Any], tmp_path: Path, fault: str, guarantee: Any
) -> None:
    from api_stub.app import app as api
    from worker.tasks.maintenance import send_due_deployments

    redis_server = RedisServer(tmp_path)
    env = {
        "DATABASE_URL": fresh_sqlite(tmp_path),
        "CELERY_BROKER_URL": redis_server.url(),
        "S3_ENDPOINT_URL": services["moto_url"],
        "TEST_VISIBILITY_TIMEOUT": "3",
    }
    client = redis.Redis(port=redis_server.port, socket_timeout=5)
    s3 = services["s3"]
    org_id = None
    try:
        with (
            environment(**env),
            TestClient(api) as http,
            Workers(tmp_path, env, app="tests.support.short_visibility") as workers,
        ):
            worker = workers.start(concurrency=4)
            org = make_org_client(http)
            org_id = org.id
            widgets = [org.widget(name="reviewed") for _ in range(WIDGETS)]
            due = utcnow() + timedelta(seconds=LEAD)
            at = due.isoformat().replace("+00:00", "Z")
            scheduled = [org.deploy(w["id"], publish_at=at) for w in widgets]
            assert {d["status"] for d in scheduled} == {"scheduled"}
            for w in widgets:
                edit = org.req("PATCH", f"/widgets/{w['id']}", json={"name": "edited later"})
                assert edit.status_code == 200, edit.text

            while utcnow() < due:  # beat ticks; nothing is sent before the due time
                assert send_due_deployments()["sent"] == 0
                time.sleep(0.1)
            assert send_due_deployments()["sent"] == WIDGETS
            sent_at = time.monotonic()
            queued, unacked = int(client.llen(c.DEPLOY_QUEUE)), int(client.hlen("unacked"))
            if fault == "flushall":
                assert client.flushall()
                in_flight = queued + unacked
            else:
                worker.proc.signal_group(signal.SIGKILL)
                in_flight = sum(1 for r in org_deployments(org.id) if r.status == "running")
                in_flight += queued + unacked
                workers.start(concurrency=4)
            wait_all_final(org.id, BOUND + 30, tick=_beat, every=TICK)
            delay = time.monotonic() - sent_at
            rows = org_deployments(org.id)
    finally:
        client.close()
        if org_id is not None:
            with environment(**env):
                finish_leftovers(org_id)
        redis_server.stop()

    assert in_flight >= 1, (queued, unacked)  # the fault met the deploys in flight
    assert len(rows) == WIDGETS  # one row each: nothing doubled
    assert {r.status for r in rows} == {"success"}, [(r.status, r.error) for r in rows]
    for row in rows:
        obj = s3.get_object(Bucket=BUCKET, Key=row.s3_key)
        body = json.loads(obj["Body"].read())
        assert body["deployment_id"] == row.deployment_id
        assert body["widget"]["name"] == "reviewed"  # frozen when requested
    if fault == "flushall":
        assert sum(r.requeues for r in rows) >= 1  # the reconciler brought them back
    assert delay <= BOUND, (delay, BOUND)
    guarantee(
        f"scheduled deploys, {fault} at the due time",
        jobs=len(rows),
        faults=1,
        in_flight_at_fault=in_flight,
        lost=0,
        duplicated=0,
        seconds_after_due=round(delay, 1),
    )
