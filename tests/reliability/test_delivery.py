"""Delivery arithmetic in long waits: a message a live worker holds is never redelivered by the
broker, however long it holds it. The worker holds a retry's message (an ETA message,
unacknowledged) for its whole countdown; here the visibility timeout is 3 s, the countdown 12 s
(production: 240 s and up to 120 s, plus queue waits that have no bound in a long outage)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from kombu.connection import Connection

from tests.support.api import make_org_client
from tests.support.reliability import Workers, environment, fresh_sqlite

pytestmark = pytest.mark.e2e

BROKER_DB = 12
VISIBILITY_TIMEOUT = 3
COUNTDOWN = 12


@pytest.fixture
def broker(services: dict[str, Any]) -> Any:
    url = services["broker"].rsplit("/", 1)[0] + f"/{BROKER_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def test_a_retry_waiting_for_its_countdown_is_never_redelivered(
    services: dict[str, Any], broker: str, tmp_path: Path, guarantee: Any
) -> None:
    from api_stub.app import app as api
    from worker import constants as c
    from worker.celery import app
    from worker.db import unit_of_work
    from worker.models import Deployment, utcnow

    db = fresh_sqlite(tmp_path)
    env = {"DATABASE_URL": db, "CELERY_BROKER_URL": broker}
    with environment(**env), TestClient(api) as http:
        org = make_org_client(http)
        widget = org.widget()
        dep = Deployment(organization_id=org.id, widget_id=widget["id"], enqueued_at=utcnow())
        with unit_of_work() as s:
            s.add(dep)
        with Workers(
            tmp_path,
            {**env, "TEST_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT)},
            app="tests.support.short_visibility",
        ) as workers:
            worker = workers.start(concurrency=2)
            task_id = f"countdown-{uuid.uuid4().hex[:8]}"
            with Connection(broker) as conn:
                app.send_task(
                    c.DEPLOY_TASK,
                    kwargs={
                        "organization_id": org.id,
                        "widget_id": widget["id"],
                        "deployment_id": dep.deployment_id,
                    },
                    queue=c.DEPLOY_QUEUE,
                    countdown=COUNTDOWN,
                    task_id=task_id,
                    connection=conn,
                )
            sent = time.monotonic()
            received = f"Task {c.DEPLOY_TASK}[{task_id}] received"
            deadline = sent + 10
            while received not in worker.log():
                assert time.monotonic() < deadline, worker.log(5000)
                time.sleep(0.2)
            # Held unacknowledged for the countdown, i.e. 4 visibility timeouts, then run; and a
            # few more seconds for a redelivery to show up if there were one.
            while True:
                with unit_of_work() as s:
                    row = s.get(Deployment, dep.id)
                assert row is not None
                if row.status in ("success", "failure"):
                    break
                assert time.monotonic() < sent + COUNTDOWN + 20, row
                time.sleep(0.2)
            ran_after = time.monotonic() - sent
            time.sleep(2 * VISIBILITY_TIMEOUT)
            log = worker.log()
            deliveries = log.count(received)
            client = redis.Redis.from_url(broker)
            try:
                leftovers = (client.llen(c.DEPLOY_QUEUE), client.hlen("unacked"))
            finally:
                client.close()

    assert ran_after >= COUNTDOWN - 1, "the countdown was not honoured"
    assert deliveries == 1, f"delivered {deliveries} times:\n{log[-4000:]}"
    assert (row.status, row.attempts) == ("success", 1), (row.status, row.attempts, row.error)
    assert leftovers == (0, 0)
    guarantee(
        "retry held past the visibility timeout",
        jobs=1,
        held_s=round(ran_after, 1),
        visibility_timeout_s=VISIBILITY_TIMEOUT,
        deliveries=deliveries,
        attempts=row.attempts,
        lost=0,
        duplicated=deliveries - 1,
        stale=0,
    )
