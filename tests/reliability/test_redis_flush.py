"""Redis loses everything (``FLUSHALL``) while deploys are queued and in flight.

The test starts its own ``redis-server``, a fresh SQLite database, two prefork workers whose
uploads are slowed by a proxy in front of the session's moto (so a backlog builds up and work is
running when the data goes), and sends deploys through the in-process API from four threads.
Mid-run it flushes the broker: the queued messages, the unacknowledged ones and kombu's queue
bindings are gone. The reconciler runs every :data:`TICK` seconds meanwhile, as beat would
(:func:`worker.tasks.maintenance.reconcile_and_resend`, the body of ``widgets.reconcile``), and
re-sends the ``ready`` jobs that have no message in the broker any more.

After: every accepted deployment ``success``, one row each, every widget's file its newest
successful deployment's content, nothing ``running``; the recovery time (``FLUSHALL`` → every
job final) is recorded and held to the bound that follows from the reconciler's constants.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis
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
from worker import constants as c
from worker.services.reconcile import RESEND_AFTER

pytestmark = pytest.mark.e2e

JOBS = 100
WIDGETS = 12
TICK = 2.0  # the reconciler's period here (beat: RECONCILE_SCHEDULE_SECONDS, 60 s by default)
S3_DELAY = 0.3  # per S3 request: deploys are slower than they arrive, so a backlog builds up
# A job lost at the flush is re-sent by the first reconcile run at least RESEND_AFTER seconds
# after it was last sent, i.e. within RESEND_AFTER + TICK of the flush; then the backlog of
# re-sent jobs drains through the workers. DRAIN is a generous allowance for that on a loaded
# 2-core machine (what is measured is recorded).
DRAIN = 60.0
BOUND = RESEND_AFTER + TICK + DRAIN


def _reconcile() -> None:
    from worker.tasks.maintenance import reconcile_and_resend

    reconcile_and_resend()


def _broker_counts(client: redis.Redis) -> tuple[int, int]:
    """(messages waiting in the deploy queue, messages delivered and not acknowledged)."""
    return int(client.llen(c.DEPLOY_QUEUE)), int(client.hlen("unacked"))


def test_redis_flushall_mid_run_the_reconciler_resends_the_lost_jobs(
    services: dict[str, Any], tmp_path: Path, guarantee: Any
) -> None:
    from api_stub.app import app as api

    redis_server = RedisServer(tmp_path)
    proxy = OutageS3Proxy(services["moto_url"])
    proxy.slow(S3_DELAY)
    env = {
        "DATABASE_URL": fresh_sqlite(tmp_path),
        "CELERY_BROKER_URL": redis_server.url(),
        "S3_ENDPOINT_URL": proxy.url,
    }
    client = redis.Redis(port=redis_server.port, socket_timeout=5)
    org_id = None
    try:
        with environment(**env), TestClient(api) as http, Workers(tmp_path, env) as workers:
            workers.start(concurrency=3, wait=False)
            workers.start(concurrency=3)
            workers.wait_ready(workers.started[0])
            org = make_org_client(http)
            org_id = org.id
            widgets = [org.widget() for _ in range(WIDGETS)]
            load = Load(org, widgets, threads=4)
            runner = load.in_background(JOBS, pace=0.1)

            # Flush once a backlog is waiting and work is running.
            deadline = time.monotonic() + 90
            while True:
                rows = org_deployments(org.id)
                done = sum(1 for r in rows if r.status == "success")
                running = sum(1 for r in rows if r.status == "running")
                queued, unacked = _broker_counts(client)
                if len(load.accepted) >= JOBS // 4 and done >= 5 and running >= 2 and queued >= 3:
                    break
                assert time.monotonic() < deadline, (len(load.accepted), done, running, queued)
                time.sleep(0.05)
            in_flight = sum(1 for r in rows if r.status in ("ready", "running"))
            keys_before = client.dbsize()
            flushed_at = time.monotonic()
            assert client.flushall()
            keys_after = client.dbsize()
            lost_messages = queued + unacked

            runner.join(timeout=120)
            accepted_after = sum(1 for c_ in load.calls if c_.started >= flushed_at)
            wait_all_final(org.id, BOUND + 60, tick=_reconcile, every=TICK)
            recovery = time.monotonic() - flushed_at
            counts = check(org.id, load.accepted, services["s3"], BUCKET)
            statuses = load.statuses()
            p99 = load.p99_between(flushed_at, flushed_at + RESEND_AFTER)
    finally:
        client.close()
        if org_id is not None:
            with environment(**env):
                finish_leftovers(org_id)
        proxy.close()
        redis_server.stop()

    # The flush landed (a worker may have written a key or two since) ...
    assert keys_after < keys_before, (keys_before, keys_after)
    assert lost_messages >= 3, (queued, unacked)  # ... while jobs were waiting and held
    assert statuses == {202: JOBS}, statuses
    assert (counts.lost, counts.duplicated, counts.stale, counts.running) == (0, 0, 0, 0)
    assert counts.failures == 0 and counts.jobs == JOBS, counts
    assert counts.requeues > 0, counts  # the reconciler is what brought them back
    assert recovery <= BOUND, (recovery, BOUND)
    guarantee(
        "Redis FLUSHALL mid-run (queued, unacknowledged messages and bindings lost)",
        jobs=counts.jobs,
        faults=1,
        in_flight_at_fault=in_flight,
        messages_lost=lost_messages,
        keys_flushed=keys_before,
        accepted_after_flush=accepted_after,
        lost=counts.lost,
        duplicated=counts.duplicated,
        stale=counts.stale,
        failures=counts.failures,
        requeues=counts.requeues,
        http_5xx=sum(n for s, n in statuses.items() if s >= 500),
        api_p99_s=round(p99, 3),
        recovery_s=round(recovery, 1),
        recovery_bound_s=BOUND,
        reconcile_every_s=TICK,
    )
