"""Writes that land late: the last check, once no request sent earlier can still reach S3.

A worker that gives up on an S3 call (its deadline passed, its process was killed) cannot know
whether the request will still reach S3: it may be held up in the network and land minutes
later. S3 refuses a signed request once its signature is 15 minutes old, and a write is sent at
the latest by the task's hard time limit, so after ``late_write_horizon_seconds`` none can land
any more. Two outcomes are checked once more at that point, by beat (``widgets.check_late_writes``):

* an **archived** widget: a deploy's ``If-None-Match: *`` write held up past the archive finds
  the key free and brings the file back. The container and preview keys are deleted once more
  (:func:`sweep_archived`); nothing can legitimately write it after the archive.
* a deployment that ended ``failure`` after being frozen: a write of its held up past the
  failure makes its bytes live. If the file is still its, the recorded snapshot is put back (or
  the file taken down when nothing is recorded), conditionally on that file's ETag
  (:func:`check_failed_deployments`).

Each row is checked once (``swept_at``, ``late_write_checked_at``); a crash before the mark is
harmless (both actions are idempotent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlmodel import col, select

from worker.db import read_session, unit_of_work
from worker.models import ArchiveJob, Deployment, Organization, utcnow
from worker.services.publish import Store, observe, restore_record
from worker.storage_keys import container_key, preview_key

BATCH = 200
MAX_BATCHES = 5  # per tick: 1,000 rows of each kind, inside the task's soft time limit


@dataclass
class LateWriteReport:
    swept: list[str] = field(default_factory=list)  # archive job ids
    checked: list[str] = field(default_factory=list)  # deployment ids
    restored: list[str] = field(default_factory=list)  # deployments whose late write was undone


def sweep_archived(now: datetime, horizon: float, store: Store, report: LateWriteReport) -> int:
    cutoff = now - timedelta(seconds=horizon)
    with read_session("late_writes.read_archives") as session:
        rows = session.exec(
            select(ArchiveJob.id, ArchiveJob.widget_id, Organization.api_key)
            .join(Organization, col(Organization.id) == col(ArchiveJob.organization_id))
            .where(
                col(ArchiveJob.status) == "success",
                col(ArchiveJob.swept_at).is_(None),
                col(ArchiveJob.finished_at) < cutoff,
            )
            .order_by(col(ArchiveJob.finished_at))
            .limit(BATCH)
        ).all()
    for job_id, widget_id, api_key in rows:
        store().delete(preview_key(api_key, widget_id))
        store().delete(container_key(api_key, widget_id))
        with unit_of_work("late_writes.mark_swept") as session:
            job = session.get(ArchiveJob, job_id)
            if job is not None:
                job.swept_at = utcnow()
        report.swept.append(job_id)
    return len(rows)


def check_failed_deployments(
    now: datetime, horizon: float, store: Store, report: LateWriteReport
) -> int:
    cutoff = now - timedelta(seconds=horizon)
    with read_session("late_writes.read_failures") as session:
        deps = list(
            session.exec(
                select(Deployment)
                .where(
                    col(Deployment.status) == "failure",
                    col(Deployment.sequence).is_not(None),
                    col(Deployment.late_write_checked_at).is_(None),
                    col(Deployment.finished_at) < cutoff,
                )
                .order_by(col(Deployment.finished_at))
                .limit(BATCH)
            ).all()
        )
    for dep in deps:
        assert dep.s3_key is not None
        file = observe(store, dep.s3_key)
        if file.deployment_id == dep.deployment_id:
            restore_record(dep, file, store)
            report.restored.append(dep.deployment_id)
        with unit_of_work("late_writes.mark_checked") as session:
            row = session.get(Deployment, dep.id)
            if row is not None:
                row.late_write_checked_at = utcnow()
        report.checked.append(dep.deployment_id)
    return len(deps)


def check_late_writes(
    now: datetime, horizon: float, store: Store, max_batches: int = MAX_BATCHES
) -> LateWriteReport:
    """Everything that became due, in batches of :data:`BATCH` (at most ``max_batches`` of each
    kind per call; the next tick goes on where this one stopped)."""
    report = LateWriteReport()
    for _ in range(max_batches):
        if sweep_archived(now, horizon, store, report) < BATCH:
            break
    for _ in range(max_batches):
        if check_failed_deployments(now, horizon, store, report) < BATCH:
            break
    return report
