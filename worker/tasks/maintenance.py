"""Periodic tasks run by celery beat: ``widgets.cleanup_drafts`` and ``widgets.reconcile``."""

from __future__ import annotations

from typing import Any

from worker import constants as c
from worker import producer
from worker.celery import app
from worker.services import cleanup, reconcile
from worker.settings import get_settings


@app.task(name=c.CLEANUP_TASK, acks_late=True)
def cleanup_drafts() -> dict[str, Any]:
    settings = get_settings()
    report = cleanup.archive_stale_drafts(
        settings.draft_retention_days, settings.cleanup_batch_size
    )
    for org_id, widget_id, job_id in report.archived:
        producer.send_archive(org_id, widget_id, job_id)
    return {"archived": len(report.archived), "widget_ids": report.candidates}


@app.task(name=c.RECONCILE_TASK, acks_late=True)
def reconcile_jobs() -> dict[str, Any]:
    report = reconcile.reconcile(queue_sizes=producer.queue_sizes())
    for org_id, widget_id, dep_id in report.deployments:
        producer.send_deploy(org_id, widget_id, dep_id)
    for org_id, widget_id, job_id in report.archives:
        producer.send_archive(org_id, widget_id, job_id)
    return {
        "deployments": len(report.deployments),
        "archives": len(report.archives),
        "failed": report.failed,
    }
