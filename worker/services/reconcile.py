"""Reconciler: jobs accepted but never started, and jobs stuck ``running``.

* ``ready`` for longer than :data:`READY_STALE_AFTER` seconds while its queue is empty: the
  message was never sent (API died between commit and enqueue) or was lost (broker lost its
  data). Re-send it. The bound is above the visibility timeout, so a delivered message would
  have been redelivered by then, and above the longest retry countdown, so a job waiting to
  retry is left alone. While the queue still holds messages the job is presumed to be in that
  backlog: re-sending would only add duplicates (and the cap below would fail it).
* ``running`` for longer than :data:`RUNNING_STALE_AFTER` seconds: its worker was killed past
  the hard time limit without a redelivery. Back to ``ready`` and re-send.

Each re-send is counted; past :data:`MAX_REQUEUES` the job ends ``failure`` instead of looping.
Tasks are idempotent, so a duplicate message caused by a race here is harmless.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from sqlmodel import Session, col, or_, select

from worker import constants as c
from worker.db import is_postgres, unit_of_work
from worker.models import ArchiveJob, Deployment, utcnow
from worker.services import job_state

READY_STALE_AFTER = c.VISIBILITY_TIMEOUT + 30
RUNNING_STALE_AFTER = c.TASK_TIME_LIMIT + 30
MAX_REQUEUES = 5
BATCH = 500

J = TypeVar("J", Deployment, ArchiveJob)


@dataclass
class ReconcileReport:
    deployments: list[tuple[str, str, str]] = field(default_factory=list)  # org, widget, dep id
    archives: list[tuple[str, str, str]] = field(default_factory=list)  # org, widget, job id
    failed: list[str] = field(default_factory=list)


def _stale(session: Session, model: type[J], now: datetime) -> list[J]:
    ready_cutoff = now - timedelta(seconds=READY_STALE_AFTER)
    running_cutoff = now - timedelta(seconds=RUNNING_STALE_AFTER)
    stmt = (
        select(model)
        .where(
            or_(
                (col(model.status) == "ready")
                & (col(model.enqueued_at).is_(None) | (col(model.enqueued_at) < ready_cutoff)),
                (col(model.status) == "running") & (col(model.started_at) < running_cutoff),
            )
        )
        .order_by(col(model.created_at))
        .limit(BATCH)
    )
    if is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    return list(session.exec(stmt).all())


def _requeue_or_fail(job: Deployment | ArchiveJob, now: datetime) -> bool:
    """True if the job should be re-sent; otherwise it is now ``failure``."""
    if job.requeues >= MAX_REQUEUES:
        reason = f"gave up after {job.requeues} re-enqueues by the reconciler: {job.error or ''}"
        job_state.finish(job, "failure", reason)
        return False
    job.requeues += 1
    job_state.back_to_ready(job)
    job.enqueued_at = job.updated_at = now
    return True


def _in_backlog(job: Deployment | ArchiveJob, queue: str, sizes: Mapping[str, int]) -> bool:
    return job.status == "ready" and sizes.get(queue, 0) > 0


def reconcile(
    now: datetime | None = None, queue_sizes: Mapping[str, int] | None = None
) -> ReconcileReport:
    """Find and update stale jobs; the caller sends the returned ones after this commit.

    ``queue_sizes`` are the broker's waiting messages per queue (unknown = treated as empty).
    """
    now = now or utcnow()
    sizes = queue_sizes or {}
    report = ReconcileReport()
    with unit_of_work() as session:
        stale: list[tuple[list[Deployment] | list[ArchiveJob], str, list[tuple[str, str, str]]]]
        stale = [
            (_stale(session, Deployment, now), c.DEPLOY_QUEUE, report.deployments),
            (_stale(session, ArchiveJob, now), c.ARCHIVE_QUEUE, report.archives),
        ]
        for jobs, queue, resend in stale:
            for job in jobs:
                if _in_backlog(job, queue, sizes):
                    continue
                key = job.deployment_id if isinstance(job, Deployment) else job.id
                if _requeue_or_fail(job, now):
                    resend.append((job.organization_id, job.widget_id, key))
                else:
                    report.failed.append(key)
                session.add(job)
    return report
