"""``bulk.completed``: a bulk job's end, found by beat's webhook tick and recorded once.

A bulk job's status is derived from its deployments (:func:`worker.services.bulk.progress`), so
no single transaction sees it end: its last deployments may finish in concurrent transactions,
each seeing the others still running. Instead, each tick (``widgets.dispatch_webhooks``) looks
at the jobs not yet ``completed_at``; for one that has ended (fanned out or given up, every
deployment final, which nothing can undo), one transaction sets ``completed_at`` with a
conditional ``UPDATE ... WHERE completed_at IS NULL`` and, only if that wrote the row, records
the event (:mod:`worker.services.webhook_outbox`). Two ticks at once record it once.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime

from sqlalchemy import update
from sqlmodel import col, or_, select

from worker.db import read_session, unit_of_work
from worker.models import BulkJob
from worker.services import bulk, webhook_outbox

BATCH = 100
ENDED = ("success", "failure")


def record_completed(now: datetime, limit: int = BATCH) -> list[str]:
    """The ids of the bulk jobs whose end this call recorded."""
    with read_session("bulk.read_unfinished") as session:
        candidates = session.exec(
            select(BulkJob.id)
            .where(
                col(BulkJob.completed_at).is_(None),
                or_(col(BulkJob.fanned_out_at).is_not(None), col(BulkJob.error).is_not(None)),
            )
            .order_by(col(BulkJob.created_at))
            .limit(limit)
        ).all()
    recorded: list[str] = []
    for job_id in candidates:
        with unit_of_work("bulk.record_completed") as session:
            job = session.get(BulkJob, job_id)
            if job is None:
                continue
            progress = bulk.progress(session, job)
            if progress.status not in ENDED:
                continue
            marked = session.connection().execute(
                update(BulkJob)
                .where(col(BulkJob.id) == job_id, col(BulkJob.completed_at).is_(None))
                .values(completed_at=now)
            )
            if marked.rowcount:
                data = webhook_outbox.jsonable({**asdict(progress), "completed_at": now})
                webhook_outbox.record_event(session, job.organization_id, "bulk.completed", data)
                recorded.append(job_id)
    return recorded
