"""widgets.reconcile: jobs accepted but never started (enqueue lost, broker lost the message),
jobs stuck ``running``, and the cap that ends a poison job ``failure``. With a view of the broker
(``worker.producer.jobs_in_broker``) a ``ready`` job without a message is re-sent within
``RESEND_AFTER`` seconds, however long the backlog in front of it. A re-send is counted only once
the broker took it (``count_resent``, after the sends); a frozen deployment past the cap is given
up only after S3 was checked (its bytes may be live). Bulk jobs: ``test_bulk_reconcile.py``.

Service-level tests run on both backends and look only at rows of their own organizations (the
database is shared by the session); their leftovers are made final so no later reconcile sends
them. End-to-end tests use the real in-process worker and Redis.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from sqlmodel import col, select

from tests.conftest import BUCKET
from tests.support.jobs import poll, scratch_org
from tests.support.reliability import environment
from worker import constants as c
from worker import producer
from worker.celery import app
from worker.db import unit_of_work
from worker.ids import new_id
from worker.models import FINAL_STATUSES, ArchiveJob, BulkJob, Deployment, Widget, utcnow
from worker.processes import free_port
from worker.services.reconcile import (
    MAX_REQUEUES,
    READY_STALE_AFTER,
    RESEND_AFTER,
    RUNNING_STALE_AFTER,
    ReconcileReport,
    count_resent,
    reconcile,
)
from worker.tasks.maintenance import reconcile_and_resend

Job = Deployment | ArchiveJob
READY_OLD = timedelta(seconds=READY_STALE_AFTER + 30)
RUNNING_OLD = timedelta(seconds=RUNNING_STALE_AFTER + 30)


def job_key(job: Job) -> str:
    """What the report names a job by: ``deployment_id`` or the archive job's ``id``."""
    return job.deployment_id if isinstance(job, Deployment) else job.id


def add_job(model: type[Job], org_id: str, **fields: Any) -> Job:
    job = model(organization_id=org_id, widget_id=fields.pop("widget_id", new_id()), **fields)
    with unit_of_work() as s:
        s.add(job)
    return job


def load(job: Job) -> Job:
    with unit_of_work() as s:
        row = s.get(type(job), job.id)
        assert row is not None
        return row


def update(job: Job, **fields: Any) -> None:
    with unit_of_work() as s:
        row = s.get(type(job), job.id)
        assert row is not None
        for k, v in fields.items():
            setattr(row, k, v)
        s.add(row)


def resent(report: Any, org_id: str) -> set[str]:
    return {ident for o, _, ident in report.deployments + report.archives if o == org_id}


def count_mine(report: ReconcileReport, org_id: str) -> None:
    """What the caller does once the broker took the re-sends: count them (this org's only; the
    service-level tests send nothing)."""
    count_resent(
        ReconcileReport(
            deployments=[d for d in report.deployments if d[0] == org_id],
            archives=[a for a in report.archives if a[0] == org_id],
            bulks=[b for b in report.bulks if b[0] == org_id],
        )
    )


@pytest.fixture
def fresh_org() -> Iterator[str]:
    """A scratch organization; its unfinished jobs, bulk jobs included, are finished after."""
    scratch = scratch_org("reconcile")
    org_id = next(scratch)
    yield org_id
    with unit_of_work() as s:
        stmt = select(BulkJob).where(
            BulkJob.organization_id == org_id, col(BulkJob.fanned_out_at).is_(None)
        )
        for job in s.exec(stmt).all():
            job.fanned_out_at = utcnow()
            s.add(job)
    next(scratch, None)


def add_bulk(org_id: str, **fields: Any) -> BulkJob:
    job = BulkJob(organization_id=org_id, selector={"widget_ids": [new_id()]}, **fields)
    with unit_of_work() as s:
        s.add(job)
    return job


@pytest.mark.parametrize("model", [Deployment, ArchiveJob])
def test_picks_up_lost_and_stuck_jobs_only(database, fresh_org, model):
    now = utcnow()
    lost = add_job(model, fresh_org, status="ready", enqueued_at=now - READY_OLD)
    never_enqueued = add_job(model, fresh_org, status="ready", enqueued_at=None)
    stuck = add_job(
        model, fresh_org, status="running", started_at=now - RUNNING_OLD, attempts=1, requeues=2
    )
    left_alone = {
        "just enqueued": add_job(model, fresh_org, enqueued_at=now - timedelta(seconds=5)),
        "waiting for a retry": add_job(
            model, fresh_org, enqueued_at=now - timedelta(seconds=READY_STALE_AFTER - 30)
        ),
        "running within the limit": add_job(
            model, fresh_org, status="running", started_at=now - timedelta(seconds=30)
        ),
        "succeeded long ago": add_job(
            model, fresh_org, status="success", enqueued_at=now - READY_OLD * 10
        ),
        "failed long ago": add_job(
            model, fresh_org, status="failure", started_at=now - RUNNING_OLD * 10
        ),
    }
    before = {name: load(job) for name, job in left_alone.items()}

    report = reconcile(now=now)

    assert resent(report, fresh_org) == {job_key(j) for j in (lost, never_enqueued, stuck)}
    other = report.archives if model is Deployment else report.deployments
    assert [t for t in other if t[0] == fresh_org] == []
    for job, requeues in ((lost, 0), (never_enqueued, 0), (stuck, 2)):  # not counted yet
        assert load(job).requeues == requeues
    count_mine(report, fresh_org)
    for job, requeues in ((lost, 1), (never_enqueued, 1), (stuck, 3)):
        row = load(job)
        assert (row.status, row.requeues, row.enqueued_at) == ("ready", requeues, now), row
    for name, job in left_alone.items():
        row = load(job)
        assert row.model_dump() == before[name].model_dump(), name

    # Re-sent jobs are fresh again: a second pass right away sends nothing of this org.
    assert resent(reconcile(now=now + timedelta(seconds=1)), fresh_org) == set()


@pytest.mark.parametrize("model", [Deployment, ArchiveJob])
def test_poison_job_ends_failure_after_max_requeues(database, fresh_org, model):
    job = add_job(model, fresh_org, status="ready", enqueued_at=None, error="retrying: boom")
    for n in range(1, MAX_REQUEUES + 1):
        report = reconcile(now=utcnow())
        assert resent(report, fresh_org) == {job_key(job)}, n
        count_mine(report, fresh_org)
        assert load(job).requeues == n
        # Lost again: the re-sent message never started either.
        update(job, enqueued_at=utcnow() - READY_OLD)

    report = reconcile(now=utcnow())
    assert resent(report, fresh_org) == set()
    assert job_key(job) in report.failed
    row = load(job)
    assert (row.status, row.requeues) == ("failure", MAX_REQUEUES)
    assert row.finished_at is not None
    assert "gave up" in (row.error or "")
    assert job_key(job) not in reconcile(now=utcnow() + READY_OLD * 10).failed


@pytest.mark.parametrize("model", [Deployment, ArchiveJob])
def test_stuck_running_job_at_the_cap_fails(database, fresh_org, model):
    now = utcnow()
    job = add_job(
        model, fresh_org, status="running", started_at=now - RUNNING_OLD, requeues=MAX_REQUEUES
    )
    report = reconcile(now=now)
    assert job_key(job) in report.failed
    assert resent(report, fresh_org) == set()
    row = load(job)
    assert row.status == "failure" and "gave up" in (row.error or "")


def test_a_frozen_deployment_at_the_cap_is_left_for_the_s3_check(database, fresh_org):
    """It may have written its file: the transaction does not fail it, the caller does, after
    looking at S3 (``test_give_up_of_frozen_deployments_looks_at_s3_first``)."""
    now = utcnow()
    job = add_job(
        Deployment,
        fresh_org,
        status="running",
        started_at=now - RUNNING_OLD,
        requeues=MAX_REQUEUES,
        sequence=3,
        s3_key="configs/k/containers/w.json",
    )
    before = load(job)
    report = reconcile(now=now)
    assert job_key(job) not in report.failed and job_key(job) not in resent(report, fresh_org)
    (gave_up,) = [g for g in report.give_up if g.organization_id == fresh_org]
    assert (gave_up.widget_id, gave_up.deployment_id) == (job.widget_id, job.deployment_id)
    assert "gave up after 5 re-enqueues" in gave_up.reason
    assert load(job).model_dump() == before.model_dump()  # untouched


def test_reconciler_leaves_backlogged_ready_jobs_alone(database, fresh_org):
    now = utcnow()
    old_ready = now - timedelta(seconds=READY_STALE_AFTER + 30)
    old_running = now - timedelta(seconds=RUNNING_STALE_AFTER + 30)
    dep = add_job(Deployment, fresh_org, status="ready", enqueued_at=old_ready)
    archive = add_job(ArchiveJob, fresh_org, status="ready", enqueued_at=old_ready)
    stuck = add_job(Deployment, fresh_org, status="running", started_at=old_running, attempts=1)

    report = reconcile(now=now, queue_sizes={"deployments": 3, "archives": 0})
    # The ready deployment is presumably in the backlog; the stuck one is not a queued message.
    assert resent(report, fresh_org) == {archive.id, stuck.deployment_id}
    count_mine(report, fresh_org)
    row = load(dep)
    assert (row.status, row.requeues, row.enqueued_at) == ("ready", 0, old_ready)
    assert (load(stuck).status, load(archive).requeues) == ("ready", 1)

    report = reconcile(now=now, queue_sizes={"deployments": 0})
    assert resent(report, fresh_org) == {dep.deployment_id}
    count_mine(report, fresh_org)
    assert (load(dep).status, load(dep).requeues) == ("ready", 1)


def _final(job: Job) -> Job | None:
    row = load(job)
    return row if row.status in FINAL_STATUSES else None


def test_reconcile_task_resends_jobs_whose_enqueue_was_lost(
    sqlite_database, org, celery_worker, s3
):
    # The API committed these rows and died before sending anything.
    live, doomed = org.widget(), org.widget()
    dep = add_job(
        Deployment, org.id, widget_id=live["id"], status="ready", enqueued_at=utcnow() - READY_OLD
    )
    with unit_of_work() as s:
        w = s.get(Widget, doomed["id"])
        assert w is not None
        w.archived_at = utcnow()
        s.add(w)
    archive = add_job(ArchiveJob, org.id, widget_id=doomed["id"], status="ready", enqueued_at=None)

    app.send_task(c.RECONCILE_TASK, queue=c.MAINTENANCE_QUEUE)

    done = poll(lambda: _final(dep), 60, "the re-sent deployment")
    assert (done.status, done.requeues) == ("success", 1), done.error
    obj = s3.get_object(Bucket=BUCKET, Key=org.container_key(live["id"]))
    assert obj["Metadata"]["deployment-id"] == done.deployment_id
    archived = poll(lambda: _final(archive), 60, "the re-sent archive job")
    assert (archived.status, archived.result, archived.requeues) == ("success", "deleted", 1)
    with unit_of_work() as s:
        assert s.get(Widget, doomed["id"]) is None


def test_deploy_whose_broker_message_was_lost_is_resent(
    request: pytest.FixtureRequest, sqlite_database, org, s3
):
    broker = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
    # If the session's worker is already up, it must not take the message before we lose it.
    paused = app.control.cancel_consumer(c.DEPLOY_QUEUE, reply=True, timeout=2)
    try:
        w = org.widget()
        dep = org.deploy(w["id"])

        def queued() -> bool:
            return any(
                dep["deployment_id"] in m.decode() for m in broker.lrange(c.DEPLOY_QUEUE, 0, -1)
            )

        poll(queued, 30, "the deploy message in Redis")
        broker.delete(c.DEPLOY_QUEUE)  # the broker lost its data
        request.getfixturevalue("celery_worker")
        if paused:
            app.control.add_consumer(c.DEPLOY_QUEUE, reply=True, timeout=5)
            paused = []
        assert org.req("GET", f"/widgets/deployments/{dep['id']}").json()["status"] == "ready"

        # Not yet stale: a message that still existed would have been redelivered by then.
        early = reconcile(now=utcnow() + timedelta(seconds=READY_STALE_AFTER - 60))
        assert dep["deployment_id"] not in resent(early, org.id)

        report = reconcile(now=utcnow() + timedelta(seconds=READY_STALE_AFTER + 5))
        assert resent(report, org.id) == {dep["deployment_id"]}
        for org_id, widget_id, dep_id in report.deployments:
            if org_id == org.id:
                assert producer.send_deploy(org_id, widget_id, dep_id)

        done = org.wait_deployment(dep["id"])
        assert done["status"] == "success", done
        body = s3.get_object(Bucket=BUCKET, Key=org.container_key(w["id"]))["Body"].read()
        assert dep["deployment_id"].encode() in body
    finally:
        if paused:
            app.control.add_consumer(c.DEPLOY_QUEUE, reply=True, timeout=5)


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


# -- with a view of the broker -------------------------------------------------------------------

BACKLOG_DB = 14
BACKLOG = 2000


@pytest.fixture
def backlog_broker(services: dict[str, Any]) -> Iterator[str]:
    """A Redis database of its own, with no worker on it; this process's producer points at it."""
    from tests.support.reliability import environment

    url = services["broker"].rsplit("/", 1)[0] + f"/{BACKLOG_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        with environment(CELERY_BROKER_URL=url):
            yield url
    finally:
        client.flushdb()
        client.close()


def _send_raw(conn: Any, task: str, queue: str, **kwargs: Any) -> None:
    app.send_task(task, kwargs=kwargs, queue=queue, connection=conn)


def test_ready_jobs_without_a_message_are_resent_even_behind_a_backlog(
    database, fresh_org, backlog_broker
):
    from kombu.connection import Connection

    now = utcnow()
    old = now - timedelta(seconds=RESEND_AFTER + 5)
    in_backlog = add_job(Deployment, fresh_org, status="ready", enqueued_at=old)
    held = add_job(Deployment, fresh_org, status="ready", enqueued_at=old, error="retrying: x")
    never_sent = add_job(Deployment, fresh_org, status="ready", enqueued_at=old)
    in_chunk = add_job(Deployment, fresh_org, status="ready", enqueued_at=old)  # a bulk's
    being_sent = add_job(Deployment, fresh_org, status="ready", enqueued_at=now)
    archive_lost = add_job(ArchiveJob, fresh_org, status="ready", enqueued_at=old)
    archive_queued = add_job(ArchiveJob, fresh_org, status="ready", enqueued_at=old)
    stuck = add_job(
        Deployment,
        fresh_org,
        status="running",
        started_at=now - RUNNING_OLD,
        attempts=1,
    )
    bulk_queued = add_bulk(fresh_org, enqueued_at=old)
    bulk_held = add_bulk(fresh_org, enqueued_at=old, cursor="m")  # a slice running now
    bulk_lost = add_bulk(fresh_org, enqueued_at=old, cursor="m")  # its worker's message lost
    bulk_done = add_bulk(fresh_org, enqueued_at=old, fanned_out_at=now)

    with Connection(backlog_broker) as conn:
        for queue in (c.DEPLOY_QUEUE, c.ARCHIVE_QUEUE, c.MAINTENANCE_QUEUE):
            app.amqp.queues[queue](conn.default_channel).declare()
        _send_raw(
            conn,
            c.BULK_DEPLOY_TASK,
            c.DEPLOY_QUEUE,
            organization_id=fresh_org,
            bulk_id=bulk_queued.id,
        )
        _send_raw(
            conn,
            c.BULK_DEPLOY_TASK,
            c.MAINTENANCE_QUEUE,
            organization_id=fresh_org,
            bulk_id=bulk_held.id,
        )
        for i in range(BACKLOG):
            if i == BACKLOG // 2:
                _send_raw(conn, c.DEPLOY_TASK, c.DEPLOY_QUEUE, **_deploy_kwargs(in_backlog))
            _send_raw(
                conn,
                c.DEPLOY_TASK,
                c.DEPLOY_QUEUE,
                organization_id=new_id(),
                widget_id=new_id(),
                deployment_id=new_id(),
            )
        # One message for several deployments (a bulk redeploy's chunk) holds each of them.
        _send_raw(
            conn,
            c.DEPLOY_CHUNK_TASK,
            c.DEPLOY_QUEUE,
            organization_id=fresh_org,
            items=[[new_id(), new_id()], [in_chunk.widget_id, in_chunk.deployment_id]],
        )
        # Delivered to a worker that holds it (a retry waiting for its countdown): unacked.
        _send_raw(conn, c.DEPLOY_TASK, c.ARCHIVE_QUEUE, **_deploy_kwargs(held))
        # An archive sent by a producer that gives only the widget.
        _send_raw(
            conn,
            c.ARCHIVE_TASK,
            c.ARCHIVE_QUEUE,
            organization_id=fresh_org,
            widget_id=archive_queued.widget_id,
        )
        channel = conn.default_channel
        delivered = channel.basic_get(c.ARCHIVE_QUEUE, no_ack=False)
        running_slice = channel.basic_get(c.MAINTENANCE_QUEUE, no_ack=False)
        assert delivered is not None and running_slice is not None
        view = producer.jobs_in_broker()
        assert view.complete and view.scanned >= BACKLOG + 6
        assert view.has_bulk(bulk_queued.id) and view.has_bulk(bulk_held.id)
        report = reconcile(now=utcnow(), in_broker=view)
        delivered.ack()
        running_slice.ack()

    assert resent(report, fresh_org) == {
        never_sent.deployment_id,
        archive_lost.id,
        stuck.deployment_id,
    }
    assert [b for b in report.bulks if b[0] == fresh_org] == [(fresh_org, bulk_lost.id)]
    count_mine(report, fresh_org)
    for job in (in_backlog, in_chunk, held, being_sent, archive_queued):
        assert (load(job).status, load(job).requeues) == ("ready", 0), job
    for job in (never_sent, archive_lost, stuck):
        assert (load(job).status, load(job).requeues) == ("ready", 1), job
    with unit_of_work() as s:
        stmt = select(BulkJob).where(BulkJob.organization_id == fresh_org)
        requeues = {b.id: b.requeues for b in s.exec(stmt).all()}
    assert requeues == {
        bulk_queued.id: 0,
        bulk_held.id: 0,
        bulk_lost.id: 1,
        bulk_done.id: 0,
    }


def _deploy_kwargs(job: Deployment) -> dict[str, str]:
    return {
        "organization_id": job.organization_id,
        "widget_id": job.widget_id,
        "deployment_id": job.deployment_id,
    }


def test_an_incomplete_view_of_the_broker_resends_no_ready_job(
    database, fresh_org, backlog_broker, monkeypatch
):
    from kombu.connection import Connection

    old = utcnow() - timedelta(seconds=RESEND_AFTER + 5)
    lost = add_job(Deployment, fresh_org, status="ready", enqueued_at=old)
    # Scaled down, not mocked: the cap is 100,000 messages; 12 real messages stand for a backlog
    # past it.
    monkeypatch.setattr(producer, "MAX_SCAN", 5)
    monkeypatch.setattr(producer, "SCAN_CHUNK", 5)
    with Connection(backlog_broker) as conn:
        app.amqp.queues[c.DEPLOY_QUEUE](conn.default_channel).declare()
        for _ in range(12):
            _send_raw(
                conn,
                c.DEPLOY_TASK,
                c.DEPLOY_QUEUE,
                organization_id=new_id(),
                widget_id=new_id(),
                deployment_id=new_id(),
            )
    view = producer.jobs_in_broker()
    assert not view.complete
    assert resent(reconcile(now=utcnow(), in_broker=view), fresh_org) == set()
    assert load(lost).requeues == 0


# -- giving up and counting, through the reconciler's real run ---------------------------------


def test_give_up_of_frozen_deployments_looks_at_s3_first(database, org, celery_worker, s3):
    published, never_written = org.widget(), org.widget()
    done = org.wait_deployment(org.deploy(published["id"])["id"])
    assert done["status"] == "success", done
    # Its worker wrote the file, then died before recording the outcome (the row and the
    # widget's live record are as they were before that transaction); every re-send since was
    # lost too, up to the cap.
    with unit_of_work() as s:
        dep = s.get(Deployment, done["id"])
        widget = s.get(Widget, published["id"])
        assert dep is not None and widget is not None
        dep.status, dep.finished_at, dep.live_deployment_id = "running", None, None
        dep.started_at, dep.requeues = utcnow() - RUNNING_OLD, MAX_REQUEUES
        widget.live_seq = widget.live_etag = widget.live_deployment_id = None
        widget.published_version = None
        s.add(dep)
        s.add(widget)
    # Frozen (a sequence) but its file never written, at the cap as well.
    lost = add_job(
        Deployment,
        org.id,
        widget_id=never_written["id"],
        status="ready",
        enqueued_at=utcnow() - READY_OLD,
        requeues=MAX_REQUEUES,
        sequence=1,
        s3_key=org.container_key(never_written["id"]),
        error="retrying: boom",
    )

    report = reconcile_and_resend()

    given_up = {g.deployment_id for g in report.give_up}
    assert {done["deployment_id"], lost.deployment_id} <= given_up
    assert not {done["deployment_id"], lost.deployment_id} & set(report.failed)
    with unit_of_work() as s:
        row = s.get(Deployment, done["id"])
        assert row is not None
    # Its bytes are live: success, recorded live, never failure.
    assert (row.status, row.live_deployment_id, row.error) == ("success", row.deployment_id, None)
    obj = s3.head_object(Bucket=BUCKET, Key=org.container_key(published["id"]))
    assert obj["Metadata"]["deployment-id"] == row.deployment_id
    got = org.req("GET", f"/widgets/{published['id']}").json()
    assert got["publication_status"] == "published", got
    row = load(lost)
    assert row.status == "failure" and "gave up after 5 re-enqueues" in (row.error or "")


def test_a_resend_the_broker_does_not_take_is_not_counted(database, fresh_org, monkeypatch):
    old = utcnow() - timedelta(seconds=RESEND_AFTER + 5)
    dep = add_job(Deployment, fresh_org, status="ready", enqueued_at=old)
    archive = add_job(ArchiveJob, fresh_org, status="ready", enqueued_at=old)
    stuck = add_job(Deployment, fresh_org, status="running", started_at=utcnow() - RUNNING_OLD)
    bulk_job = add_bulk(fresh_org, enqueued_at=old)
    # The broker answered the scan, then went away before the sends: the scan's result is kept,
    # and the sends go to a port nothing listens on (they fail for real).
    view = producer.jobs_in_broker()
    monkeypatch.setattr(producer, "jobs_in_broker", lambda: view)
    with environment(CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0"):
        report = reconcile_and_resend()
    mine = {dep.deployment_id, archive.id, stuck.deployment_id, bulk_job.id}
    assert mine <= set(report.unsent), report.unsent
    for job in (dep, archive, stuck):
        row = load(job)
        # Not counted, still ready (a stuck one too): the next run sends it.
        assert (row.status, row.requeues) == ("ready", 0), row
    with unit_of_work() as s:
        row_bulk = s.get(BulkJob, bulk_job.id)
        assert row_bulk is not None and (row_bulk.requeues, row_bulk.error) == (0, None)

    # The broker answers again; RESEND_AFTER later the next run sends them, counted once.
    monkeypatch.undo()
    for job in (dep, archive, stuck):
        update(job, enqueued_at=old)
    with unit_of_work() as s:
        row_bulk = s.get(BulkJob, bulk_job.id)
        assert row_bulk is not None
        row_bulk.enqueued_at = old
        s.add(row_bulk)
    report = reconcile_and_resend()
    assert not mine & set(report.unsent)
    assert mine <= {j[-1] for j in report.deployments + report.archives + report.bulks}
    for job in (dep, archive, stuck):
        assert load(job).requeues == 1
    with unit_of_work() as s:
        row_bulk = s.get(BulkJob, bulk_job.id)
        assert row_bulk is not None and row_bulk.requeues == 1
