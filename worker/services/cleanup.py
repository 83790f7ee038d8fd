"""Scheduled cleanup: archive draft widgets nobody has edited for ``DRAFT_RETENTION_DAYS``.

Candidates are drafts (never published), not archived, not edited inside the window, with no
deployment in flight. Each is re-checked under its row lock and marked archived in the same
transaction, so two cleanups running at once archive every widget exactly once. The archives
themselves are the normal archive jobs, sent after each batch's commit in chunk messages
(``widgets.archive_chunk``, :mod:`worker.services.archive_chunk`): claimed in one transaction
per chunk and run concurrently by the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from worker.db import is_postgres, unit_of_work
from worker.models import Deployment, Widget, utcnow
from worker.services.archive import mark_archived

IN_FLIGHT = ("ready", "running")


@dataclass
class CleanupReport:
    candidates: list[str] = field(default_factory=list)
    archived: list[tuple[str, str, str]] = field(default_factory=list)  # (org, widget, job)


def _stale_drafts(
    session: Session, cutoff: datetime, limit: int, lock: bool = False
) -> list[Widget]:
    in_flight = select(Deployment.widget_id).where(col(Deployment.status).in_(IN_FLIGHT))
    stmt = (
        select(Widget)
        .where(
            col(Widget.published_version).is_(None),
            col(Widget.archived_at).is_(None),
            col(Widget.updated_at) < cutoff,
            col(Widget.id).not_in(in_flight),
        )
        .order_by(col(Widget.updated_at), col(Widget.id))
        .limit(limit)
    )
    if lock and is_postgres(session):
        # Another cleanup holding a row skips it instead of waiting; it archives that one.
        stmt = stmt.with_for_update(skip_locked=True, of=Widget)
    return list(session.exec(stmt).all())


def _in_flight(session: Session, widget_ids: list[str]) -> set[str]:
    if not widget_ids:
        return set()
    stmt = select(Deployment.widget_id).where(
        col(Deployment.widget_id).in_(widget_ids), col(Deployment.status).in_(IN_FLIGHT)
    )
    return set(session.exec(stmt).all())


def find_stale_drafts(retention_days: int, limit: int, now: datetime | None = None) -> list[Widget]:
    """What a cleanup would archive now (the dry run)."""
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    with unit_of_work() as session:
        return _stale_drafts(session, cutoff, limit)


ArchiveJobs = list[tuple[str, str, str]]  # (organization_id, widget_id, archive_job_id)


def archive_stale_drafts(
    retention_days: int,
    batch_size: int,
    max_batches: int = 50,
    now: datetime | None = None,
    on_batch_committed: Callable[[ArchiveJobs], None] | None = None,
) -> CleanupReport:
    """Mark stale drafts archived, one transaction per batch, and return the archive jobs.

    ``on_batch_committed`` receives each batch's jobs right after its commit (the task sends
    them there), so workers start copying the first batch while later ones are selected,
    instead of after the whole run; a cleanup killed half-way has sent what it committed.
    """
    report = CleanupReport()
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    for _ in range(max_batches):
        committed: ArchiveJobs = []
        with unit_of_work() as session:
            batch = _stale_drafts(session, cutoff, batch_size, lock=True)
            # Re-checked after the locks are held: a deploy accepted while the selection ran
            # is visible to this fresh statement.
            busy = _in_flight(session, [w.id for w in batch])
            for widget in (w for w in batch if w.id not in busy):
                report.candidates.append(widget.id)
                job = mark_archived(session, widget)
                committed.append((widget.organization_id, widget.id, job.id))
        report.archived.extend(committed)
        if on_batch_committed is not None and committed:
            on_batch_committed(committed)
        if len(batch) < batch_size:
            break
    return report
