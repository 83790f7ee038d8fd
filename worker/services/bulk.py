"""Bulk redeploys: one deployment per selected widget, fanned out in bounded slices.

A bulk job is a job like the others: the API (or ``python -m worker.cli redeploy``) commits the
:class:`BulkJob` with ``enqueued_at`` set, then sends one ``widgets.bulk_deploy`` message. Each
message runs **one slice** of the fan-out (:func:`fan_out`): at most :data:`SLICE_BATCHES`
batches of :data:`BATCH` widgets (in id order), and no new batch once :data:`SLICE_SECONDS` have
passed, so a slice fits well inside the task's soft time limit (``TASK_SOFT_TIME_LIMIT``)
whatever the selector's size: at ~2.3 ms per widget a slice is ~10,000 widgets or ~15 s, and a
selector of 100,000 widgets is about ten messages. Per batch: insert the batch's missing
deployments and commit (the unique ``(bulk_id, widget_id)`` index makes a second one
impossible), send the batch's ``ready`` deployments in chunks (``widgets.deploy_chunk``, one
message per :data:`worker.services.chunking.CHUNK`: frozen together, uploaded
concurrently), then move the cursor forward (commit).
When widgets remain, the task records ``enqueued_at`` (:func:`note_continuation`, committed)
and only then sends the next message, and acknowledges its own last (``acks_late``).

Invariants:

* **Resumable at any line.** A crash re-runs from the last committed cursor: re-sending a
  deploy is harmless (deploys are idempotent), a second deployment of a widget cannot happen,
  and the cursor only moves forward (compared in SQL), so two messages of one job (a
  redelivery and a re-send) only repeat work.
* **Never stranded.** A job not finished (``fanned_out_at`` and ``error`` both unset) has a
  message in the broker (queued, or held by the worker running its slice), or had one sent
  less than ``RESEND_AFTER`` ago; otherwise the reconciler (:mod:`worker.services.reconcile`)
  re-sends it: a send that failed (broker down: the API answered 202), a continuation whose
  send failed, a lost message. A killed worker's message is redelivered by the broker.
* **Ends.** ``fanned_out_at`` when every selected widget has its deployment, or ``error`` when
  given up: by the reconciler after ``MAX_REQUEUES`` re-sends, or here after
  :data:`MAX_ATTEMPTS` slice deliveries in a row that moved nothing (a poison slice).
  :func:`progress` derives the status: ``failure`` for a job given up, once its deployments so
  far are final.

``attempts`` counts the slice deliveries since the cursor last moved (reset by each batch).

Steps (:mod:`worker.steps`) of one message: ``bulk.start_slice``; per batch ``bulk.batch``
(insert, commit), the deploy sends, ``bulk.advance``; then, if widgets remain,
``bulk.note_continuation`` and the send of the next message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, update
from sqlmodel import Session, col, select

from worker.db import unit_of_work
from worker.models import BulkJob, Deployment, Widget, utcnow
from worker.services.catalog_impact import embedding_widgets
from worker.services.chunking import chunks

BATCH = 500  # widgets per batch: one insert transaction, then their messages
SLICE_BATCHES = 20  # batches per slice (per message) at most
SLICE_SECONDS = 15.0  # no new batch after this long: a third of the 45 s soft time limit
MAX_ATTEMPTS = 12  # slice deliveries in a row without progress before giving up (as deploys)
SELECTOR_KEYS = ("widget_ids", "purpose_id", "preference_id", "publication_status")
MAX_WIDGET_IDS = 10_000

# Sends one chunk of deployments (organization_id, [(widget_id, deployment_id), ...]).
SendChunk = Callable[[str, list[tuple[str, str]]], object]


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
        enqueued_at=utcnow(),  # "sent now": the reconciler gives the send RESEND_AFTER s
    )
    session.add(job)
    return job


def is_finished(job: BulkJob) -> bool:
    """Fanned out, or given up: no message is needed any more."""
    return job.fanned_out_at is not None or job.error is not None


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


def _lock(session: Session, bulk_id: str) -> BulkJob:
    job = session.get(BulkJob, bulk_id, with_for_update=True)
    if job is None:
        raise ValueError(f"unknown bulk job {bulk_id}")
    return job


def _start_slice(bulk_id: str) -> bool:
    """Count this delivery; False if there is nothing to do (finished, or now given up)."""
    with unit_of_work("bulk.start_slice") as session:
        job = _lock(session, bulk_id)
        if is_finished(job):
            return False
        job.updated_at = utcnow()
        if job.attempts >= MAX_ATTEMPTS:
            job.error = (
                f"gave up after {job.attempts} runs of the fan-out in a row without progress "
                f"(last widget done: {job.cursor or 'none'})"
            )
            return False
        job.attempts += 1
        return True


def _advance(bulk_id: str, cursor: str) -> None:
    """Move the cursor forward (never back: another message of the job may be ahead)."""
    with unit_of_work("bulk.advance") as session:
        session.connection().execute(
            update(BulkJob)
            .where(
                col(BulkJob.id) == bulk_id,
                or_(col(BulkJob.cursor).is_(None), col(BulkJob.cursor) < cursor),
            )
            .values(cursor=cursor, attempts=0, updated_at=utcnow())
        )


@dataclass(frozen=True)
class Slice:
    sent: int  # deploy messages sent by this slice
    batches: int  # batches handled
    done: bool  # True: the job is finished (no next message); False: send a continuation


def fan_out(
    bulk_id: str,
    send: SendChunk,
    batch: int | None = None,
    max_batches: int | None = None,
    budget: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Slice:
    """Run one slice of the job's fan-out: at most ``max_batches`` batches of ``batch`` widgets,
    none started after ``budget`` seconds (module defaults, read at call time). ``done`` False
    means widgets remain: the caller records :func:`note_continuation`, then sends the job."""
    batch = batch or BATCH
    max_batches = max_batches or SLICE_BATCHES
    deadline = clock() + (SLICE_SECONDS if budget is None else budget)
    if not _start_slice(bulk_id):
        return Slice(0, 0, True)
    sent = batches = 0
    while batches < max_batches:
        with unit_of_work("bulk.batch") as session:
            job = _lock(session, bulk_id)
            if is_finished(job):
                return Slice(sent, batches, True)
            ready, cursor = _next_batch(session, job, batch)
            if cursor is None:
                job.fanned_out_at = job.updated_at = utcnow()
                return Slice(sent, batches, True)
            organization_id = job.organization_id
        for chunk in chunks(ready):  # after the commit, outside any transaction
            send(organization_id, chunk)
            sent += len(chunk)
        _advance(bulk_id, cursor)
        batches += 1
        if clock() >= deadline:
            break
    return Slice(sent, batches, False)


def note_continuation(bulk_id: str) -> None:
    """The next slice's message is about to be sent: record when (the reconciler's clock)."""
    with unit_of_work("bulk.note_continuation") as session:
        session.connection().execute(
            update(BulkJob).where(col(BulkJob.id) == bulk_id).values(enqueued_at=utcnow())
        )


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
    error: str | None  # set when the fan-out was given up (the status ends ``failure``)
    created_at: datetime
    updated_at: datetime


def progress(session: Session, job: BulkJob) -> Progress:
    """Counts by status in one query, so every poll is consistent.

    ``ready`` until the fan-out starts; ``running`` while it goes on or any deployment is not
    final; then ``failure`` if any deployment failed or the fan-out was given up (``error``),
    else ``success``."""
    rows = session.exec(
        select(Deployment.status, func.count(), func.max(Deployment.updated_at))
        .where(Deployment.bulk_id == job.id)
        .group_by(col(Deployment.status))
    ).all()
    counts = {status: int(n) for status, n, _ in rows}
    latest = max([job.updated_at] + [ts for _, _, ts in rows if ts is not None])
    pending = counts.get("ready", 0) + counts.get("running", 0)
    if not is_finished(job):
        status = "ready" if job.cursor is None and not counts else "running"
    elif pending:
        status = "running"
    else:
        failed = counts.get("failure", 0) or job.error is not None
        status = "failure" if failed else "success"
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
        error=job.error,
        created_at=job.created_at,
        updated_at=latest,
    )
