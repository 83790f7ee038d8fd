"""A pool child killed mid-upload (by the hard time limit, or ``kill -9``) while its upload's
response is held by the proxy: the upload had landed on S3, the requeued message's delivery
adopts that file, and the database agrees with S3 (one write per file, nothing lost).

Real ``celery -A worker worker`` subprocesses (``tests/support/publish_workers.py``) on this
module's own Redis database; the published file is read straight from moto (the ground truth).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from tests.support.api import OrgClient
from tests.support.chaos_s3 import ChaosS3Proxy
from tests.support.publish_workers import (
    Broker,
    chaos_proxy,
    dead,
    enqueue,
    finishing_org,
    live_file,
    object_exists,
    own_broker,
    ready,
    rows,
    wait_final,
    widget_row,
    workers,
)
from worker.models import utcnow
from worker.processes import wait_until

pytestmark = pytest.mark.e2e

# This module's own Redis database: unique across tests/ (grep BROKER_DB; the session uses 0).
BROKER_DB = 6


@pytest.fixture
def broker(services: dict[str, Any]) -> Iterator[Broker]:
    yield from own_broker(services["broker"], BROKER_DB)


@pytest.fixture
def proxy(services: dict[str, Any]) -> Iterator[ChaosS3Proxy]:
    yield from chaos_proxy(services["moto_url"])


@pytest.fixture
def chaos_org(org: OrgClient) -> Iterator[OrgClient]:
    yield from finishing_org(org)


def test_hard_time_limit_after_the_upload_ends_with_db_agreeing_with_s3(
    sqlite_database, chaos_org, broker, proxy, s3, tmp_path
):
    """The upload lands on S3, its response never comes back, the hard time limit kills the
    child; the requeued message's delivery finds its own file and records ``success``.

    The 4 s limit is the message's own (``time_limit``/``soft_time_limit`` of ``send_task``), not
    ``celery worker --time-limit 4``: the app's configured limits (45 s soft, 60 s hard) become
    the task's defaults, which Celery prefers to the worker's command-line limits; and the
    prefork pool arms the hard timer only when the soft one fires, so the soft limit must not be
    above the hard one. With both at 4 s the pool signals the soft limit and kills the child
    right after, before the child can finish the task (its upload's response is held)."""
    org = chaos_org
    with workers(tmp_path, broker, proxy) as start:
        worker = start("--concurrency", "1", wait_ready=False)
        w = org.widget([org.purpose()])
        key = org.container_key(w["id"])
        ready(broker, worker)
        (child,) = worker.children()
        proxy.hold_responses("PUT")
        try:
            (dep_id,) = enqueue(broker, org, w["id"], time_limit=4, soft_time_limit=4)
            assert proxy.wait_held(60), f"the deploy never uploaded:\n{worker.log(6000)}"
            wait_until(lambda: object_exists(s3, key), 10, "the held upload to land on moto")
            assert proxy.held == 1, "the upload's response must still be held"
            started = rows([dep_id])[dep_id]
            assert (started.status, started.attempts) == ("running", 1)
            assert started.started_at is not None
            wait_until(lambda: dead(child), 30, "the hard time limit to kill the child")
            killed_after = utcnow() - started.started_at
            assert proxy.held == 1, "the child must die while its upload's response is held"
        finally:
            proxy.release()
        deps = wait_final([dep_id], 60, [worker], proxy)
        log = worker.log()
    assert killed_after >= timedelta(seconds=3.5), killed_after
    assert re.search(r"Hard time limit \(4(\.0)?s\) exceeded", log), log[-6000:]
    dep = deps[dep_id]
    assert dep.status == "success", (dep.status, dep.error, log[-6000:])
    assert dep.attempts >= 2, (dep.attempts, log[-6000:])
    widget = widget_row(w["id"])
    body, meta, etag = live_file(s3, key)
    assert widget.live_deployment_id == dep_id
    assert meta["deployment-id"] == dep_id
    assert (widget.live_seq, widget.live_etag) == (dep.sequence, etag)
    assert body == dep.config
    # One write: the redelivery looked first (HEAD), found its own file and recorded it.
    assert proxy.count("PUT", key=key, status=200) == 1
    assert proxy.count("HEAD", key=key, status=200) >= 1


def test_killed_child_mid_upload_loses_nothing(
    sqlite_database, chaos_org, broker, proxy, s3, tmp_path
):
    org = chaos_org
    with workers(tmp_path, broker, proxy) as start:
        worker = start("--concurrency", "2", wait_ready=False)
        purpose = org.purpose()
        widgets = [org.widget([purpose], name=f"killed-{i}") for i in range(10)]
        ready(broker, worker)
        before = worker.children()
        assert len(before) == 2
        proxy.hold_responses("PUT")
        try:
            dep_ids = [enqueue(broker, org, w["id"])[0] for w in widgets]
            # Both children are frozen after their upload landed: either one is mid-upload.
            assert proxy.wait_held(60, count=2), f"uploads not held:\n{worker.log(6000)}"
            assert proxy.held == 2
            victim = before[0]
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: dead(victim), 10, "the pool child to die")
        finally:
            proxy.release()
        deps = wait_final(dep_ids, 90, [worker], proxy)
        log = worker.log()
    assert "WorkerLostError" in log or "SIGKILL" in log, log[-6000:]
    assert {d.status for d in deps.values()} == {"success"}, [
        (d.deployment_id, d.status, d.error) for d in deps.values()
    ]
    redelivered = [d for d in deps.values() if d.attempts >= 2]
    assert redelivered, "the killed child's deployment was not redelivered"
    for w, dep_id in zip(widgets, dep_ids, strict=True):
        dep = deps[dep_id]
        body, meta, etag = live_file(s3, org.container_key(w["id"]))
        assert body == dep.config and body["widget"]["name"] == w["name"]
        assert meta["deployment-id"] == dep_id and int(meta["sequence"]) == dep.sequence
        assert dep.live_deployment_id == dep_id
        widget = widget_row(w["id"])
        assert (widget.live_deployment_id, widget.live_etag) == (dep_id, etag)
        # Exactly one write per file: the redelivery adopted the upload that had landed.
        assert proxy.count("PUT", key=org.container_key(w["id"]), status=200) == 1, dep_id
