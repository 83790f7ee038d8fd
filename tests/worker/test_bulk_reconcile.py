"""The reconciler and bulk jobs: a bulk job is a job like the others.

* accepted while the broker is down (the API answered 202, the send failed): the reconciler
  sends it, and it completes;
* a fan-out whose message was lost after a slice (worker died, broker lost it): the reconciler
  re-sends it, the fan-out resumes at its cursor and completes with one deployment per widget;
* lost again and again: given up after ``MAX_REQUEUES`` counted re-sends, and it reads
  ``failure`` with its error (no endless ``running``).

A job is re-sent once it was last sent ``RESEND_AFTER`` (30 s) ago and has no message; rather than
wait 30 s, the tests move the job's ``enqueued_at`` back by that much (what waiting would leave).
The broker, the worker and the database are the session's real ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlmodel import col, select

from tests.support.jobs import poll, scratch_org
from tests.support.reliability import environment
from worker import producer
from worker.db import unit_of_work
from worker.models import BulkJob, Deployment, utcnow
from worker.processes import free_port
from worker.services import bulk
from worker.services.reconcile import (
    MAX_REQUEUES,
    RESEND_AFTER,
    ReconcileReport,
    count_resent,
    reconcile,
)
from worker.tasks.maintenance import reconcile_and_resend


def load(bulk_id: str) -> BulkJob:
    with unit_of_work() as s:
        job = s.get(BulkJob, bulk_id)
        assert job is not None
        return job


def backdate(bulk_id: str) -> None:
    """As if RESEND_AFTER seconds had passed since the job was last sent."""
    with unit_of_work() as s:
        job = s.get(BulkJob, bulk_id)
        assert job is not None
        job.enqueued_at = utcnow() - timedelta(seconds=RESEND_AFTER + 5)
        s.add(job)


def wait_final(org: Any, bulk_id: str) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        cur = org.req("GET", f"/widgets/deployments/bulk/{bulk_id}").json()
        return cur if cur["status"] in ("success", "failure") else None

    result: dict[str, Any] = poll(final, 90, f"bulk job {bulk_id}")
    return result


def deployments(bulk_id: str) -> list[Deployment]:
    with unit_of_work() as s:
        return list(s.exec(select(Deployment).where(Deployment.bulk_id == bulk_id)).all())


def test_a_bulk_job_accepted_while_the_broker_is_down_is_sent_by_the_reconciler(
    database, org, celery_worker
):
    widgets = [org.widget()["id"] for _ in range(3)]
    # Nothing listens on this port: the API's send fails for real, the request still answers.
    with environment(CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0"):
        r = org.req("POST", "/widgets/deployments/bulk", json={"widget_ids": widgets})
    assert r.status_code == 202, r.text
    bulk_id = r.json()["id"]
    assert r.json()["status"] == "ready"
    assert not producer.jobs_in_broker().has_bulk(bulk_id)  # no message anywhere

    # Just sent (or being sent): left alone for RESEND_AFTER seconds.
    assert (org.id, bulk_id) not in reconcile_and_resend().bulks
    backdate(bulk_id)
    report = reconcile_and_resend()
    assert (org.id, bulk_id) in report.bulks and bulk_id not in report.unsent

    final = wait_final(org, bulk_id)
    assert (final["status"], final["total"], final["success"]) == ("success", 3, 3), final
    assert sorted(d.widget_id for d in deployments(bulk_id)) == sorted(widgets)
    assert load(bulk_id).requeues == 1


def test_a_fan_out_whose_message_was_lost_after_a_slice_is_resumed(database, org, celery_worker):
    widgets = [org.widget()["id"] for _ in range(5)]
    with unit_of_work() as s:
        bulk_id = bulk.create(s, org.id, {"widget_ids": widgets}, "test", "resume").id
    # One slice of two widgets, run here as a worker would (its deploys are sent for real);
    # then its worker died and the broker lost the message: no next slice was ever sent.
    first = bulk.fan_out(bulk_id, producer.send_deploy_chunk, batch=2, max_batches=1)
    assert (first.sent, first.done) == (2, False)
    assert not producer.jobs_in_broker().has_bulk(bulk_id)
    assert len(deployments(bulk_id)) == 2

    backdate(bulk_id)
    report = reconcile_and_resend()
    assert (org.id, bulk_id) in report.bulks

    final = wait_final(org, bulk_id)
    assert (final["status"], final["total"], final["success"]) == ("success", 5, 5), final
    made = deployments(bulk_id)
    assert sorted(d.widget_id for d in made) == sorted(widgets)  # one each, none twice
    job = load(bulk_id)
    assert job.fanned_out_at is not None and job.requeues == 1


@pytest.fixture
def bulk_org() -> Iterator[str]:
    """A scratch organization whose bulk jobs are also finished at teardown (no later run of
    the reconciler sends them)."""
    scratch = scratch_org("bulk-reconcile")
    org_id = next(scratch)
    yield org_id
    with unit_of_work() as s:
        for job in s.exec(
            select(BulkJob).where(
                BulkJob.organization_id == org_id, col(BulkJob.fanned_out_at).is_(None)
            )
        ).all():
            job.fanned_out_at = utcnow()
            s.add(job)
    next(scratch, None)


def add_bulk(org_id: str, **fields: Any) -> BulkJob:
    job = BulkJob(organization_id=org_id, selector={"widget_ids": ["w"]}, **fields)
    with unit_of_work() as s:
        s.add(job)
    return job


def test_a_bulk_job_lost_again_and_again_is_given_up_and_reads_failure(database, bulk_org):
    empty = producer.BrokerJobs()  # a complete view of a broker holding none of its messages
    job = add_bulk(bulk_org, enqueued_at=utcnow() - timedelta(seconds=RESEND_AFTER + 5))
    sent_recently = add_bulk(bulk_org, enqueued_at=utcnow())
    finished = add_bulk(bulk_org, enqueued_at=None, fanned_out_at=utcnow())
    for n in range(1, MAX_REQUEUES + 1):
        report = reconcile(now=utcnow(), in_broker=empty)
        mine = [b for b in report.bulks if b[0] == bulk_org]
        assert mine == [(bulk_org, job.id)], n
        assert load(job.id).requeues == n - 1  # counted only once the broker took it
        count_resent(ReconcileReport(bulks=mine))
        assert load(job.id).requeues == n
        # Just re-sent: left alone for RESEND_AFTER; then its message is lost again.
        assert (bulk_org, job.id) not in reconcile(now=utcnow(), in_broker=empty).bulks
        backdate(job.id)

    report = reconcile(now=utcnow(), in_broker=empty)
    assert job.id in report.failed and (bulk_org, job.id) not in report.bulks
    row = load(job.id)
    assert row.fanned_out_at is None and "gave up after 5 re-enqueues" in (row.error or "")
    with unit_of_work() as s:
        state = bulk.progress(s, row)
    assert (state.status, state.error) == ("failure", row.error)
    assert job.id not in reconcile(now=utcnow(), in_broker=empty).failed  # once only
    for other in (sent_recently, finished):
        assert (load(other.id).requeues, load(other.id).error) == (0, None)


def test_given_up_bulk_job_reads_failure_through_the_api(database, org):
    with unit_of_work() as s:
        bulk_id = bulk.create(s, org.id, {"widget_ids": [org.widget()["id"]]}, "t", None).id
    with unit_of_work() as s:
        row = s.get(BulkJob, bulk_id)
        assert row is not None
        row.requeues = MAX_REQUEUES
        row.enqueued_at = utcnow() - timedelta(seconds=RESEND_AFTER + 5)
        s.add(row)
    assert bulk_id in reconcile(now=utcnow(), in_broker=producer.BrokerJobs()).failed
    got = org.req("GET", f"/widgets/deployments/bulk/{bulk_id}").json()
    assert (got["status"], got["total"]) == ("failure", 0), got
