"""The embedded SQLite default under 50 concurrent clients.

A real ``uvicorn api_stub.app:app`` (``APP_ENV=production``, generated secrets) on a fresh
SQLite file and a Redis database of its own, two prefork workers consuming, and
:data:`CLIENTS` threads, each with its own keep-alive HTTP connection, sending
:data:`REQUESTS` deploy requests in all (each with its own ``deployment_id``, so a retried
request is the same deploy). A 503 is retried after its ``Retry-After``.

Asserted: no 500, no client timeout (:data:`CLIENT_TIMEOUT`) or dropped connection, every
answer but a 202 a 503 in the error shape with ``Retry-After``; every deploy accepted in the
end, each with exactly one row, every row final; p50/p99 latency recorded.

``RELIABILITY_SCALE`` (default 1) multiplies the requests for a longer run (the default keeps
the test near a minute).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import BUCKET
from tests.support.http_api import ApiServer, HttpClients, admin_org, clients_for, production_env
from tests.support.reliability import (
    Workers,
    check,
    environment,
    fresh_sqlite,
    org_deployments,
    wait_all_final,
)

SCALE = max(1, int(os.environ.get("RELIABILITY_SCALE", "1")))
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300 * SCALE)]

BROKER_DB = 11
CLIENTS = 50
REQUESTS = 1000 * SCALE
WIDGETS = 25
CLIENT_TIMEOUT = 30.0
# No request is started past this many seconds into the load (the test stays bounded even when
# the API is not: requests left unsent are counted as not accepted).
LOAD_DEADLINE = 150.0 * SCALE


def _reconcile() -> None:
    from worker.tasks.maintenance import reconcile_and_resend

    reconcile_and_resend()


def test_sqlite_api_serves_50_concurrent_clients(
    services: dict[str, Any], tmp_path: Path, guarantee: Any
) -> None:
    db = fresh_sqlite(tmp_path)
    broker = services["broker"].rsplit("/", 1)[0] + f"/{BROKER_DB}"
    flush = redis.Redis.from_url(broker)
    flush.flushdb()
    env = production_env(db, broker)
    accepted: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    try:
        with (
            Workers(tmp_path, env) as workers,
            ApiServer(tmp_path, env) as server,
            httpx.Client(base_url=server.url, timeout=CLIENT_TIMEOUT) as http,
        ):
            workers.start(concurrency=2, wait=False)
            workers.start(concurrency=2)
            workers.wait_ready(workers.started[0])
            org = admin_org(http, server.admin_token)
            widgets = [org.widget() for _ in range(WIDGETS)]

            def deploy(load: HttpClients, i: int) -> None:
                if time.monotonic() > t0 + LOAD_DEADLINE:
                    return
                body = {"widget_id": widgets[i % WIDGETS]["id"], "deployment_id": str(uuid.uuid4())}
                r = load.request("POST", "/widgets/deployments", json=body)
                if r is not None and r.status_code == 202:
                    with lock:
                        accepted[body["deployment_id"]] = r.json()

            with clients_for(server, org, CLIENTS, CLIENT_TIMEOUT) as load:
                t0 = time.monotonic()
                load.run(REQUESTS, deploy)
                elapsed = time.monotonic() - t0
                server_log = server.log()
            figures = load.figures()
            bad = [a for a in load.attempts if a.status not in (202, 503)]
            unshaped = [
                a
                for a in load.attempts
                if a.status == 503 and not (a.retry_after and a.error_shape)
            ]
            summary = {
                **figures,
                "statuses": dict(load.statuses()),
                "accepted": len(accepted),
                "first_bad": sorted({(a.status, (a.body or a.exception)[:120]) for a in bad})[:6],
                "server_log": {
                    k: server_log.count(k) for k in ("Traceback", "locked", "QueuePool")
                },
            }
            assert not bad, json.dumps(summary)
            assert not unshaped, [(a.retry_after, a.body) for a in unshaped[:5]]
            assert "Traceback" not in server_log, server_log[-5000:]
            with environment(DATABASE_URL=db, CELERY_BROKER_URL=broker):
                rows = wait_all_final(org.id, 240, tick=_reconcile)
                counts = check(org.id, list(accepted.values()), services["s3"], BUCKET)
                by_key = {r.deployment_id for r in org_deployments(org.id)}
    finally:
        flush.flushdb()
        flush.close()

    assert len(accepted) == REQUESTS, (len(accepted), figures)
    assert by_key == set(accepted), "a row without a 202, or a 202 without its row"
    assert len(rows) == REQUESTS
    assert (counts.lost, counts.duplicated, counts.stale, counts.running) == (0, 0, 0, 0)
    guarantee(
        f"SQLite API, {REQUESTS} deploys from {CLIENTS} concurrent keep-alive clients",
        **figures,
        deploys=REQUESTS,
        accepted=len(accepted),
        seconds=round(elapsed, 1),
        requests_per_s=round(figures["requests"] / elapsed, 1),
        jobs=counts.jobs,
        lost=counts.lost,
        duplicated=counts.duplicated,
        stale=counts.stale,
        failures=counts.failures,
    )
