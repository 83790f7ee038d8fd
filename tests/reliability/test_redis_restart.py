"""Redis killed (``kill -9``) and restarted with its AOF while deploys are accepted and running.

The test starts its own ``redis-server --appendonly yes --appendfsync everysec`` (the compose
stack's settings), a fresh SQLite database, two prefork workers whose uploads are slowed by a
proxy (so work is in flight when Redis dies), and sends deploys through the in-process API from
four threads; the reconciler runs every two seconds meanwhile, as beat would. After: every
accepted deployment final and ``success``, one row each, every widget's file its newest
successful deployment's content, nothing ``running``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import BUCKET
from tests.support.api import make_org_client
from tests.support.outage_s3 import OutageS3Proxy
from tests.support.reliability import (
    Load,
    RedisServer,
    Workers,
    check,
    environment,
    finish_leftovers,
    fresh_sqlite,
    org_deployments,
    wait_all_final,
)

pytestmark = pytest.mark.e2e

JOBS = 120
DOWN_SECONDS = 3.0


def _reconcile() -> None:
    from worker.tasks.maintenance import reconcile_and_resend

    reconcile_and_resend()


def _diagnose(broker: str, workers: Workers) -> str:
    import redis

    from worker import constants as c

    client = redis.Redis.from_url(broker, socket_timeout=5)
    try:
        queues = {q: client.llen(q) for q in c.QUEUES}
        state = f"queues {queues}, unacked {client.hlen('unacked')}"
    finally:
        client.close()
    tails = "\n".join(f"--- {w.pid}\n{w.log(3000)}" for w in workers.started)
    return f"{state}\n{tails}"


def test_redis_killed_and_restarted_mid_run(
    services: dict[str, Any], tmp_path: Path, guarantee: Any
) -> None:
    from api_stub.app import app as api

    redis_server = RedisServer(tmp_path)
    proxy = OutageS3Proxy(services["moto_url"])
    proxy.slow(0.1)
    env = {
        "DATABASE_URL": fresh_sqlite(tmp_path),
        "CELERY_BROKER_URL": redis_server.url(),
        "S3_ENDPOINT_URL": proxy.url,
    }
    org_id = None
    try:
        with environment(**env), TestClient(api) as http, Workers(tmp_path, env) as workers:
            workers.start(concurrency=3, wait=False)
            workers.start(concurrency=3)
            workers.wait_ready(workers.started[0])
            org = make_org_client(http)
            org_id = org.id
            widgets = [org.widget() for _ in range(12)]
            load = Load(org, widgets, threads=4)
            runner = load.in_background(JOBS, pace=0.1)

            deadline = time.monotonic() + 90
            while True:
                rows = org_deployments(org.id)
                done = sum(1 for r in rows if r.status == "success")
                busy = sum(1 for r in rows if r.status in ("ready", "running"))
                if len(load.accepted) >= JOBS // 4 and done >= 5 and busy >= 3:
                    break
                assert time.monotonic() < deadline, (len(load.accepted), done, busy)
                time.sleep(0.05)
            in_flight = busy
            start = time.monotonic()
            redis_server.kill()
            time.sleep(DOWN_SECONDS)
            redis_server.start()
            end = time.monotonic()
            runner.join(timeout=180)
            accepted_during = sum(
                1 for c in load.calls if start <= c.started <= end and c.status == 202
            )
            wait_all_final(
                org.id,
                240,
                tick=_reconcile,
                diagnose=lambda: _diagnose(redis_server.url(), workers),
            )
            counts = check(org.id, load.accepted, services["s3"], BUCKET)
            statuses = load.statuses()
            p99 = load.p99_between(start, end + 1)
            logs = "".join(w.log() for w in workers.started)
    finally:
        if org_id is not None:
            with environment(**env):
                finish_leftovers(org_id)
        proxy.close()
        redis_server.stop()

    assert statuses == {202: JOBS}, statuses
    assert (counts.lost, counts.duplicated, counts.stale, counts.running) == (0, 0, 0, 0)
    assert counts.failures == 0 and counts.jobs == JOBS
    assert "Connection to broker lost" in logs or "Cannot connect" in logs  # the fault landed
    # Every worker survived the loss (a worker that hit kombu's detached-transport race would
    # have stopped consuming for good: worker.delivery.RedisChannel).
    assert "Unrecoverable error" not in logs, logs[logs.index("Unrecoverable error") - 2000 :]
    guarantee(
        f"Redis kill -9, restarted after {DOWN_SECONDS:.0f} s (AOF everysec)",
        jobs=counts.jobs,
        faults=redis_server.kills,
        in_flight_at_fault=in_flight,
        accepted_while_down=accepted_during,
        lost=counts.lost,
        duplicated=counts.duplicated,
        stale=counts.stale,
        failures=counts.failures,
        requeues=counts.requeues,
        http_5xx=sum(n for s, n in statuses.items() if s >= 500),
        api_p99_s=round(p99, 3),
    )
