"""Periodic tasks run by celery beat: ``widgets.cleanup_drafts``, ``widgets.reconcile``,
``widgets.check_late_writes`` and ``widgets.send_due_deployments``."""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from worker import constants as c
from worker import producer
from worker.celery import app
from worker.models import utcnow
from worker.s3 import S3Error, get_store
from worker.services import chunking, cleanup, deploy, reconcile, schedule
from worker.settings import get_settings

log = logging.getLogger(__name__)

# The S3-checked give-ups of one run stop being started after this long (the rest are found
# again by the next run): the whole run stays well inside the 45 s soft time limit.
GIVE_UP_SECONDS = 20.0


def send_archives(jobs: cleanup.ArchiveJobs) -> None:
    """A batch's archive jobs, in chunk messages (per organization): claimed together and run
    concurrently by the worker (:mod:`worker.services.archive_chunk`)."""
    by_org: dict[str, list[tuple[str, str]]] = {}
    for org_id, widget_id, job_id in jobs:
        by_org.setdefault(org_id, []).append((widget_id, job_id))
    for org_id, items in by_org.items():
        for chunk in chunking.chunks(items):
            producer.send_archive_chunk(org_id, chunk)


@app.task(name=c.SEND_DUE_TASK, acks_late=True)
def send_due_deployments() -> dict[str, Any]:
    """Beat's tick: the scheduled deployments now due become ``ready`` and are sent. One that
    the broker does not take stays ``ready``; the reconciler sends it later."""
    due = schedule.take_due(utcnow())
    unsent = [dep_id for org_id, widget_id, dep_id in due
              if not producer.send_deploy(org_id, widget_id, dep_id)]  # fmt: skip
    if unsent:
        log.warning("%d due deployments not sent (the reconciler will): %s", len(unsent), unsent)
    return {"sent": len(due) - len(unsent), "unsent": unsent}


@app.task(name=c.CLEANUP_TASK, acks_late=True)
def cleanup_drafts() -> dict[str, Any]:
    settings = get_settings()
    report = cleanup.archive_stale_drafts(
        settings.draft_retention_days,
        settings.cleanup_batch_size,
        on_batch_committed=send_archives,
    )
    return {"archived": len(report.archived), "widget_ids": report.candidates}


def _resend(report: reconcile.ReconcileReport) -> reconcile.ReconcileReport:
    """Send the report's jobs (after its commit); return those the broker took, and note the
    others in ``report.unsent`` (still ``ready``: a later run sends them, uncounted)."""
    sent = reconcile.ReconcileReport()
    for dep in report.deployments:
        if producer.send_deploy(*dep):
            sent.deployments.append(dep)
        else:
            report.unsent.append(dep[2])
    for archive in report.archives:
        if producer.send_archive(*archive):
            sent.archives.append(archive)
        else:
            report.unsent.append(archive[2])
    for bulk_job in report.bulks:
        if producer.send_bulk(*bulk_job):
            sent.bulks.append(bulk_job)
        else:
            report.unsent.append(bulk_job[1])
    if report.unsent:
        log.warning("%d re-send(s) failed: not counted, sent by a later run", len(report.unsent))
    return sent


def _give_up(jobs: list[reconcile.GiveUp], budget: float = GIVE_UP_SECONDS) -> None:
    """Frozen deployments past the re-send cap: ``failure`` unless S3 shows their bytes (or a
    newer sequence's) are live (:func:`worker.services.deploy.record_failure`)."""
    deadline = time.monotonic() + budget
    for job in jobs:
        if time.monotonic() > deadline:
            log.warning("give-ups left for the next run: time budget of %.0f s spent", budget)
            return
        try:
            deploy.record_failure(
                job.organization_id, job.widget_id, job.deployment_id, job.reason, store=get_store
            )
        except (SQLAlchemyError, S3Error) as exc:  # left as it is: the next run tries again
            log.warning("could not give up deployment %s: %s", job.deployment_id, exc)


def reconcile_and_resend() -> reconcile.ReconcileReport:
    """Read which jobs have a message in the broker, then (after) the stale rows; re-send the
    ones without a message and the stuck running ones after their rows are committed, count the
    re-sends the broker took, then give up the frozen deployments past the cap, S3 first."""
    started = utcnow()
    in_broker = producer.jobs_in_broker()
    if not in_broker.complete:
        log.warning(
            "broker backlog over %d messages: ready jobs are not checked for lost messages",
            producer.MAX_SCAN,
        )
    report = reconcile.reconcile(now=started, in_broker=in_broker)
    reconcile.count_resent(_resend(report))
    _give_up(report.give_up)
    return report


@app.task(name=c.RECONCILE_TASK, acks_late=True)
def reconcile_jobs() -> dict[str, Any]:
    report = reconcile_and_resend()
    return {
        "deployments": len(report.deployments),
        "archives": len(report.archives),
        "bulks": len(report.bulks),
        "unsent": len(report.unsent),
        "failed": report.failed,
        "given_up": [g.deployment_id for g in report.give_up],
    }
