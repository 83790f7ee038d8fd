"""Review fixes, each with a test that fails without it: the archive removes the container file
before the row (drafts too) and keeps the last published name; the same-content skip checks the
file really on S3; concurrent PATCHes all count; producers that name no queue are served; the
reconciler leaves jobs waiting in a backlog alone.

Real worker, Redis, moto and databases; the only fault injected is the fault proxy's 403.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import celery
import pytest
import redis
from sqlmodel import select

from tests.conftest import BUCKET
from tests.support.api import OrgClient
from tests.support.jobs import scratch_org
from worker import producer
from worker.celery import app
from worker.db import unit_of_work
from worker.ids import new_id
from worker.models import FINAL_STATUSES, ArchiveJob, Deployment, Widget, utcnow
from worker.services.reconcile import READY_STALE_AFTER, RUNNING_STALE_AFTER, reconcile
from worker.services.snapshot import _IDENTITY_KEYS


def wait_for(check: Any, timeout: float = 60, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_job(org: OrgClient, job_id: str) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        job = org.req("GET", f"/widgets/archive-jobs/{job_id}").json()
        return job if job["status"] in ("success", "failure") else None

    job = wait_for(final)
    assert job, f"archive job {job_id} never finished"
    return job


def on_s3(s3: Any, key: str) -> bool:
    return bool(s3.list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount"))


def published(org: OrgClient, **body: Any) -> dict[str, Any]:
    w = org.widget(**body)
    dep = org.wait_deployment(org.deploy(w["id"])["id"])
    assert dep["status"] == "success", dep
    return w


def widget_row(widget_id: str) -> Widget | None:
    with unit_of_work() as s:
        return s.get(Widget, widget_id)


def test_archive_keeps_the_widget_when_the_container_delete_fails(
    sqlite_database, org, celery_worker, s3, s3_faults
):
    w = published(org)
    key = org.container_key(w["id"])
    assert on_s3(s3, key)
    s3_faults.fail_next("DELETE", 403)  # no assets: the first DELETE is the container file
    first = org.req("DELETE", f"/widgets/{w['id']}")
    assert first.status_code == 202, first.text
    job = wait_job(org, first.json()["id"])
    assert job["status"] == "failure", job
    assert s3_faults.count("DELETE", 403) == 1
    row = widget_row(w["id"])
    assert row is not None and row.archived_at is not None  # still there for a retry
    assert org.req("GET", f"/widgets/{w['id']}").status_code == 404
    assert on_s3(s3, key)

    again = org.req("DELETE", f"/widgets/{w['id']}")
    assert again.status_code == 202, again.text
    assert again.json()["id"] != job["id"]
    retried = wait_job(org, again.json()["id"])
    assert (retried["status"], retried["result"]) == ("success", "archived"), retried
    assert not on_s3(s3, key)
    assert widget_row(w["id"]) is None
    assert org.req("GET", f"/widgets/archived/{w['id']}").status_code == 200


def test_archive_of_a_draft_removes_a_leftover_container_file(
    sqlite_database, org, celery_worker, s3
):
    w = org.widget()
    key = org.container_key(w["id"])
    # A first deploy killed between its upload and its commit: bytes on S3, the widget a draft.
    s3.put_object(Bucket=BUCKET, Key=key, Body=b'{"leftover": true}')
    job = wait_job(org, org.req("DELETE", f"/widgets/{w['id']}").json()["id"])
    assert (job["status"], job["result"]) == ("success", "deleted"), job
    assert not on_s3(s3, key)


def test_archived_copy_of_unpublished_changes_has_the_published_name(
    sqlite_database, org, celery_worker
):
    w = published(org, name="as-published")
    r = org.req("PATCH", f"/widgets/{w['id']}", json={"name": "edited-later"})
    assert r.json()["publication_status"] == "unpublished_changes", r.text
    job = wait_job(org, org.req("DELETE", f"/widgets/{w['id']}").json()["id"])
    assert (job["status"], job["result"]) == ("success", "archived"), job
    archived = org.req("GET", f"/widgets/archived/{w['id']}")
    assert archived.status_code == 200, archived.text
    assert archived.json()["name"] == "as-published"


def test_same_content_redeploy_rewrites_a_foreign_file(sqlite_database, org, celery_worker, s3):
    w = org.widget()
    first = org.wait_deployment(org.deploy(w["id"])["id"])
    assert first["status"] == "success", first
    key = org.container_key(w["id"])
    # A crashed deploy's upload: other bytes at the key, no commit.
    s3.put_object(Bucket=BUCKET, Key=key, Body=b'{"other": "bytes"}')

    second = org.wait_deployment(org.deploy(w["id"])["id"])
    assert second["status"] == "success", second
    body = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    assert body.get("deployment_id") in (first["deployment_id"], second["deployment_id"]), body

    def content(snapshot: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in snapshot.items() if k not in _IDENTITY_KEYS}

    assert content(body) == content(first["config"])


def test_concurrent_patches_all_bump_the_version(database, org):
    n = 6
    w = org.widget()
    before = org.req("GET", f"/widgets/{w['id']}").json()["version"]
    edits = [
        {"name": "concurrent"},
        {"domain": "concurrent.example.com"},
        {"headless": True},
        {"layout_shape": "square"},
        {"theme_id": "dark"},
        {"components": {"texts": {"title": "t"}}},
    ]
    assert len(edits) == n
    barrier = threading.Barrier(n)
    statuses: list[int] = []

    def patch(body: dict[str, Any]) -> None:
        barrier.wait(10)
        statuses.append(org.req("PATCH", f"/widgets/{w['id']}", json=body).status_code)

    threads = [threading.Thread(target=patch, args=(e,)) for e in edits]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [200] * n
    after = org.req("GET", f"/widgets/{w['id']}").json()
    assert after["version"] == before + n
    for edit in edits:  # and no edit was lost either
        ((field, value),) = edit.items()
        assert after[field] == value, field


def test_producer_naming_no_queue_is_served(sqlite_database, org, celery_worker, s3, services):
    w = org.widget()
    dep_id = new_id()
    foreign = celery.Celery(broker=services["broker"])  # no routes: Celery's default queue
    try:
        kwargs = {"organization_id": org.id, "widget_id": w["id"], "deployment_id": dep_id}
        foreign.send_task("widgets.deploy", kwargs=kwargs)
    finally:
        foreign.close()

    def finished() -> Deployment | None:
        with unit_of_work() as s:
            dep = s.exec(select(Deployment).where(Deployment.deployment_id == dep_id)).first()
            return dep if dep is not None and dep.status in FINAL_STATUSES else None

    dep = wait_for(finished, timeout=30)
    assert dep is not None, "the worker never ran a message on the default queue"
    assert dep.status == "success", dep.error
    body = json.loads(s3.get_object(Bucket=BUCKET, Key=org.container_key(w["id"]))["Body"].read())
    assert body["deployment_id"] == dep_id


@pytest.fixture
def fresh_org(database: str) -> Iterator[str]:
    yield from scratch_org("backlog")


def add_job(model: type[Any], org_id: str, **fields: Any) -> Any:
    job = model(organization_id=org_id, widget_id=new_id(), **fields)
    with unit_of_work() as s:
        s.add(job)
    return job


def load(job: Any) -> Any:
    with unit_of_work() as s:
        return s.get(type(job), job.id)


def resent(report: Any, org_id: str) -> set[str]:
    return {ident for o, _, ident in report.deployments + report.archives if o == org_id}


def test_reconciler_leaves_backlogged_ready_jobs_alone(fresh_org):
    now = utcnow()
    old_ready = now - timedelta(seconds=READY_STALE_AFTER + 30)
    old_running = now - timedelta(seconds=RUNNING_STALE_AFTER + 30)
    dep = add_job(Deployment, fresh_org, status="ready", enqueued_at=old_ready)
    archive = add_job(ArchiveJob, fresh_org, status="ready", enqueued_at=old_ready)
    stuck = add_job(Deployment, fresh_org, status="running", started_at=old_running, attempts=1)

    report = reconcile(now=now, queue_sizes={"deployments": 3, "archives": 0})
    # The ready deployment is presumably in the backlog; the stuck one is not a queued message.
    assert resent(report, fresh_org) == {archive.id, stuck.deployment_id}
    row = load(dep)
    assert (row.status, row.requeues, row.enqueued_at) == ("ready", 0, old_ready)
    assert (load(stuck).status, load(archive).requeues) == ("ready", 1)

    report = reconcile(now=now, queue_sizes={"deployments": 0})
    assert resent(report, fresh_org) == {dep.deployment_id}
    assert (load(dep).status, load(dep).requeues) == ("ready", 1)


def test_queue_sizes_counts_waiting_messages(services):
    name = f"sizes-test-{uuid.uuid4().hex[:8]}"
    empty = f"sizes-empty-{uuid.uuid4().hex[:8]}"
    broker = redis.Redis.from_url(services["broker"])
    try:
        for _ in range(2):
            app.send_task("widgets.noop-test", queue=name)
        assert producer.queue_sizes((name, empty)) == {name: 2, empty: 0}
    finally:
        broker.delete(name)
        broker.close()
