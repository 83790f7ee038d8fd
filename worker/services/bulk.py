"""Bulk redeploys: one deployment per selected widget, fanned out in batches, with progress.

The API (or ``python -m worker.cli redeploy``) creates the :class:`BulkJob` and sends one
``widgets.bulk_deploy`` message; the task calls :func:`fan_out`, which walks the selected
widgets in id order, ``BATCH`` at a time: insert the batch's missing deployments (the unique
``(bulk_id, widget_id)`` index makes a second one impossible), commit, send the batch's
``ready`` deployments, then advance the cursor. A crash anywhere resumes at the last cursor:
re-sending a message is harmless (deploys are idempotent), a second row cannot happen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from worker.db import unit_of_work
from worker.models import BulkJob, Deployment, Widget, utcnow
from worker.services.catalog_impact import embedding_widgets

BATCH = 500
SELECTOR_KEYS = ("widget_ids", "purpose_id", "preference_id", "publication_status")
MAX_WIDGET_IDS = 10_000

Send = Callable[[str, str, str], object]  # organization_id, widget_id, deployment_id


def create(
    session: Session,
    organization_id: str,
    selector: dict[str, Any],
    created_by: str,
    reason: str | None,
) -> BulkJob:
    job = BulkJob(
        organization_id=organization_id,
        selector=selector,
        created_by=created_by,
        reason=reason,
        enqueued_at=utcnow(),
    )
    session.add(job)
    return job


def _selected(job: BulkJob) -> Any:
    """The widgets the selector names (live, of the job's organization), in id order."""
    stmt = select(Widget.id).where(
        Widget.organization_id == job.organization_id, col(Widget.archived_at).is_(None)
    )
    sel = job.selector
    if "widget_ids" in sel:
        stmt = stmt.where(col(Widget.id).in_(list(sel["widget_ids"])))
    elif "purpose_id" in sel or "preference_id" in sel:
        item = str(sel.get("purpose_id") or sel.get("preference_id"))
        stmt = stmt.where(col(Widget.id).in_(embedding_widgets(job.organization_id, item)))
    elif sel.get("publication_status") == "unpublished_changes":
        stmt = stmt.where(
            col(Widget.published_version).is_not(None),
            col(Widget.published_version) < col(Widget.version),
        )
    elif sel.get("publication_status") == "published":
        stmt = stmt.where(col(Widget.published_version) >= col(Widget.version))
    elif sel.get("publication_status") == "draft":
        stmt = stmt.where(col(Widget.published_version).is_(None))
    else:
        raise ValueError(f"unknown selector {sel}")
    return stmt.order_by(col(Widget.id))


def _next_batch(
    session: Session, job: BulkJob, size: int
) -> tuple[list[tuple[str, str]], str | None]:
    """Create the next batch's missing deployments; return the batch's ``ready`` ones
    (widget id, deployment id) and the cursor after the batch (None: nothing left)."""
    stmt = _selected(job)
    if job.cursor is not None:
        stmt = stmt.where(col(Widget.id) > job.cursor)
    widget_ids: Sequence[str] = session.exec(stmt.limit(size)).all()
    if not widget_ids:
        return [], None
    have = set(
        session.exec(
            select(Deployment.widget_id).where(
                Deployment.bulk_id == job.id, col(Deployment.widget_id).in_(widget_ids)
            )
        ).all()
    )
    now = utcnow()
    for widget_id in widget_ids:
        if widget_id not in have:
            session.add(
                Deployment(
                    organization_id=job.organization_id,
                    widget_id=widget_id,
                    bulk_id=job.id,
                    created_by=job.created_by,
                    reason=job.reason,
                    enqueued_at=now,
                )
            )
    session.flush()
    rows = session.exec(
        select(Deployment.widget_id, Deployment.deployment_id).where(
            Deployment.bulk_id == job.id,
            col(Deployment.widget_id).in_(widget_ids),
            Deployment.status == "ready",
        )
    ).all()
    return [(w, d) for w, d in rows], widget_ids[-1]


def fan_out(bulk_id: str, send: Send, batch: int = BATCH) -> int:
    """Create and send the job's deployments; returns how many messages were sent."""
    sent = 0
    while True:
        with unit_of_work() as session:
            job = session.get(BulkJob, bulk_id, with_for_update=True)
            if job is None:
                raise ValueError(f"unknown bulk job {bulk_id}")
            if job.fanned_out_at is not None:
                return sent
            ready, cursor = _next_batch(session, job, batch)
            if cursor is None:
                job.fanned_out_at = job.updated_at = utcnow()
                session.add(job)
                return sent
            organization_id = job.organization_id
        for widget_id, deployment_id in ready:  # after the commit, outside any transaction
            send(organization_id, widget_id, deployment_id)
            sent += 1
        with unit_of_work() as session:
            job = session.get(BulkJob, bulk_id)
            assert job is not None
            job.cursor, job.updated_at = cursor, utcnow()
            session.add(job)


@dataclass(frozen=True)
class Progress:
    id: str
    organization_id: str
    status: str
    total: int
    ready: int
    running: int
    success: int
    failure: int
    selector: dict[str, Any]
    created_by: str
    reason: str | None
    created_at: datetime
    updated_at: datetime


def progress(session: Session, job: BulkJob) -> Progress:
    """Counts by status in one query, so every poll is consistent."""
    rows = session.exec(
        select(Deployment.status, func.count(), func.max(Deployment.updated_at))
        .where(Deployment.bulk_id == job.id)
        .group_by(col(Deployment.status))
    ).all()
    counts = {status: int(n) for status, n, _ in rows}
    latest = max([job.updated_at] + [ts for _, _, ts in rows if ts is not None])
    pending = counts.get("ready", 0) + counts.get("running", 0)
    if job.fanned_out_at is None:
        status = "ready" if job.cursor is None and not counts else "running"
    elif pending:
        status = "running"
    else:
        status = "failure" if counts.get("failure", 0) else "success"
    return Progress(
        id=job.id,
        organization_id=job.organization_id,
        status=status,
        total=sum(counts.values()),
        ready=counts.get("ready", 0),
        running=counts.get("running", 0),
        success=counts.get("success", 0),
        failure=counts.get("failure", 0),
        selector=job.selector,
        created_by=job.created_by,
        reason=job.reason,
        created_at=job.created_at,
        updated_at=latest,
    )
