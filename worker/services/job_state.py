"""Job status transitions, shared by deployments and archive jobs: the one place they are written.

``ready`` → ``running`` (claimed) → ``success`` | ``failure`` (final, never left again);
``running`` → ``ready`` when a transient failure will be retried or the reconciler re-sends it.
A job that ends records its webhook event in the same transaction
(:mod:`worker.services.webhook_outbox`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import object_session
from sqlmodel import Session, col

from worker.models import FINAL_STATUSES, ArchiveJob, Deployment, utcnow
from worker.services import webhook_outbox

Job = Deployment | ArchiveJob


def readable(exc: BaseException) -> str:
    """An exception as a job's ``error``: its message (or its type), at most 2,000 characters."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 2000 else text[:1997] + "..."


def is_final(job: Job) -> bool:
    return job.status in FINAL_STATUSES


def count_attempt(job: Job) -> None:
    job.attempts += 1
    job.updated_at = utcnow()


def mark_running(job: Job) -> None:
    now = utcnow()
    job.status, job.started_at, job.updated_at = "running", now, now


def start(job: Job) -> None:
    count_attempt(job)
    mark_running(job)


def finish(job: Job, status: str, error: str | None = None) -> None:
    """``status`` (final) on ``job``, a row of an open session: its event is recorded there."""
    session = object_session(job)
    assert isinstance(session, Session), "a job is finished in the session that loaded it"
    now = utcnow()
    job.status, job.error, job.finished_at, job.updated_at = status, error, now, now
    webhook_outbox.record_finished(session, job, status)


def finish_unless_final(
    session: Session, job: Job, status: str, error: str | None = None, **fields: Any
) -> bool:
    """:func:`finish` as one ``UPDATE`` of the job's row (with ``fields``), which locks it, and
    only if it is not final yet: another delivery may have finished it since ``job`` was read.
    False if it was (nothing written)."""
    model = type(job)
    now = utcnow()
    result = session.connection().execute(
        update(model)
        .where(col(model.id) == job.id, col(model.status).not_in(FINAL_STATUSES))
        .values(status=status, error=error, finished_at=now, updated_at=now, **fields)
    )
    if not result.rowcount:
        return False
    webhook_outbox.record_finished(
        session, job, status, error=error, finished_at=now, updated_at=now, **fields
    )
    return True


def back_to_ready(job: Job, error: str | None = None) -> None:
    now = utcnow()
    job.status, job.enqueued_at, job.updated_at = "ready", now, now
    if error is not None:
        job.error = error


def note_retry(job: Job | None, error: str) -> None:
    """A transient failure will be retried: ``ready`` again, with the reason, until then."""
    if job is not None and not is_final(job):
        back_to_ready(job, f"retrying: {error}")


def record_failure(job: Job | None, organization_id: str, widget_id: str, error: str) -> None:
    """Out of retries or failed permanently. A message naming another organization's or widget's
    job (forged, or simply wrong) must not fail it, so the IDs have to match."""
    if job is None or is_final(job):
        return
    if job.organization_id != organization_id or job.widget_id != widget_id:
        return
    finish(job, "failure", error)


def give_up_reason(job: Job, max_attempts: int) -> str | None:
    if job.attempts >= max_attempts:
        return f"gave up after {job.attempts} attempts: {job.error or ''}"
    return None
