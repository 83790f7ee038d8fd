"""A broker that accepts connections and never answers (a hung Redis, a half-open connection
after a failover): the API still answers a deploy with 202 and its row committed ``ready``
within :data:`BOUND` seconds, and the reconciler sends the job once the broker answers again."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.api import make_org_client
from tests.support.reliability import environment, p99
from tests.support.silent_server import SilentServer

pytestmark = pytest.mark.e2e

BOUND = 5.0  # seconds: what a deploy request may take when the broker hangs


def test_deploy_answers_202_on_a_broker_that_never_answers(
    services: dict[str, Any], sqlite_database: str, celery_worker: Any, guarantee: Any
) -> None:
    from api_stub.app import app
    from worker import producer
    from worker.db import unit_of_work
    from worker.models import Deployment, utcnow

    accepted: list[dict[str, Any]] = []
    latencies: list[float] = []
    with (
        SilentServer() as silent,
        environment(CELERY_BROKER_URL=silent.url),
        TestClient(app) as http,
    ):
        org = make_org_client(http)
        widgets = [org.widget() for _ in range(4)]

        def deploy(i: int) -> tuple[int, float, dict[str, Any]]:
            t0 = time.monotonic()
            r = org.req("POST", "/widgets/deployments", json={"widget_id": widgets[i % 4]["id"]})
            return r.status_code, time.monotonic() - t0, r.json()

        # A burst at once (every request meets the hung broker), then a steady trickle.
        pool = ThreadPoolExecutor(8)
        try:
            futures = [pool.submit(deploy, i) for i in range(8)]  # before any breaker opens
            results = [f.result(timeout=BOUND + 10) for f in futures]
            results += [pool.submit(deploy, i).result(timeout=BOUND + 10) for i in range(12)]
            reached = silent.accepted
            t0 = time.monotonic()
            health = http.get("/health")
            health_seconds = time.monotonic() - t0
        finally:
            # A request still hanging must not hang the test: closing the server ends it.
            pool.shutdown(wait=False, cancel_futures=True)
            silent.close()
        for status, seconds, body in results:
            assert status == 202, body
            latencies.append(seconds)
            accepted.append(body)
        assert max(latencies) <= BOUND, sorted(latencies)
        assert reached >= 1, "the API never reached the hung broker"
        assert health.status_code == 503 and health_seconds <= BOUND
        assert health.headers["retry-after"] == "1"

        # Committed, and left ready for the reconciler.
        with unit_of_work() as s:
            for body in accepted:
                row = s.get(Deployment, body["id"])
                assert row is not None and row.status == "ready", body

    # The broker answers again (the session's): the reconciler finds the jobs without a message
    # and sends them; the session's worker publishes them.
    from worker.services.reconcile import RESEND_AFTER, reconcile

    view = producer.jobs_in_broker()
    assert not ({d for _, d in view.deployments} & {b["deployment_id"] for b in accepted})
    report = reconcile(now=utcnow() + timedelta(seconds=RESEND_AFTER + 1), in_broker=view)
    mine = [d for d in report.deployments if d[0] == org.id]
    assert {d[2] for d in mine} == {b["deployment_id"] for b in accepted}
    for org_id, widget_id, dep_id in mine:
        assert producer.send_deploy(org_id, widget_id, dep_id)
    deadline = time.monotonic() + 60
    while True:
        with unit_of_work() as s:
            rows = [s.get(Deployment, b["id"]) for b in accepted]
        if all(r is not None and r.status in ("success", "failure") for r in rows):
            break
        assert time.monotonic() < deadline, [(r.deployment_id, r.status) for r in rows if r]
        time.sleep(0.2)
    assert all(r is not None and r.status == "success" for r in rows)
    guarantee(
        "broker accepts connections, never answers",
        jobs=len(accepted),
        faults=reached,
        lost=0,
        duplicated=0,
        stale=0,
        http_5xx=0,
        api_p99_s=round(p99(latencies), 3),
        api_max_s=round(max(latencies), 3),
        bound_s=BOUND,
    )
