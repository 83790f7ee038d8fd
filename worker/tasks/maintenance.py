"""Periodic tasks run by celery beat: ``widgets.cleanup_drafts`` and ``widgets.reconcile``."""

from __future__ import annotations

import logging
from typing import Any

from worker import constants as c
from worker import producer
from worker.celery import app
from worker.models import utcnow
from worker.services import cleanup, reconcile
from worker.settings import get_settings

log = logging.getLogger(__name__)


def send_archives(jobs: cleanup.ArchiveJobs) -> None:
    for org_id, widget_id, job_id in jobs:
        producer.send_archive(org_id, widget_id, job_id)


@app.task(name=c.CLEANUP_TASK, acks_late=True)
def cleanup_drafts() -> dict[str, Any]:
    settings = get_settings()
    report = cleanup.archive_stale_drafts(
        settings.draft_retention_days,
        settings.cleanup_batch_size,
        on_batch_committed=send_archives,
    )
    return {"archived": len(report.archived), "widget_ids": report.candidates}


def reconcile_and_resend() -> reconcile.ReconcileReport:
    """Read which jobs have a message in the broker, then (after) the stale rows; re-send the
    ready ones without a message and the stuck running ones, after their rows are committed."""
    started = utcnow()
    in_broker = producer.jobs_in_broker()
    if not in_broker.complete:
        log.warning(
            "broker backlog over %d messages: ready jobs are not checked for lost messages",
            producer.MAX_SCAN,
        )
    report = reconcile.reconcile(now=started, in_broker=in_broker)
    for org_id, widget_id, dep_id in report.deployments:
        producer.send_deploy(org_id, widget_id, dep_id)
    for org_id, widget_id, job_id in report.archives:
        producer.send_archive(org_id, widget_id, job_id)
    return report


@app.task(name=c.RECONCILE_TASK, acks_late=True)
def reconcile_jobs() -> dict[str, Any]:
    report = reconcile_and_resend()
    return {
        "deployments": len(report.deployments),
        "archives": len(report.archives),
        "failed": report.failed,
    }
