"""Reconciler: jobs accepted but never started, and jobs stuck ``running``.

* ``ready`` with **no message in the broker** (``in_broker``: what
  :func:`worker.producer.jobs_in_broker` read just before), for longer than
  :data:`RESEND_AFTER` seconds since it was last sent: its send failed (broker down or hung:
  the API answered 202 anyway), the process died between commit and send, or the broker lost
  the message (restart without persistence, ``FLUSHALL``). Re-send it. A job whose message is
  still waiting in a queue, however long the backlog, or is held by a worker (a retry waiting
  for its countdown, a task waiting for a free pool process) has a message, and is left alone.
  :data:`RESEND_AFTER` only has to cover the send itself (bounded: ``worker.producer``) so that
  a job being sent right now is not sent twice; a duplicate would be harmless anyway (tasks are
  idempotent).
* ``running`` for longer than :data:`RUNNING_STALE_AFTER` seconds: its worker was killed past
  the hard time limit without a redelivery. Back to ``ready`` and re-send.

Without a broker view (``in_broker=None``, e.g. the CLI's older call) the reconciler falls back
to time alone: ``ready`` for longer than :data:`READY_STALE_AFTER` while its queue is empty.

Each re-send is counted; past :data:`MAX_REQUEUES` the job ends ``failure`` instead of looping.
No broker call happens inside a database transaction: the caller scans the broker first and
sends the returned jobs after this function committed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

from sqlalchemy import ColumnElement
from sqlmodel import Session, col, or_, select

from worker import constants as c
from worker.db import is_postgres, read_only_engine, unit_of_work
from worker.models import ArchiveJob, Deployment, utcnow
from worker.services import job_state

# Without a broker view: past the visibility timeout a delivered message would have come back.
READY_STALE_AFTER = c.VISIBILITY_TIMEOUT + 30
# With a broker view: a job sent this long ago has its message in the broker, or never will.
RESEND_AFTER = 30
RUNNING_STALE_AFTER = c.TASK_TIME_LIMIT + 30
MAX_REQUEUES = 5
BATCH = 500  # jobs re-sent per run, per kind
PAGE = 1000
MAX_CHECKED = 100_000  # stale-looking rows compared with the broker per run, per kind

J = TypeVar("J", Deployment, ArchiveJob)


class BrokerView(Protocol):
    """Which jobs have a message in the broker (:class:`worker.producer.BrokerJobs`)."""

    complete: bool

    def has_deployment(self, organization_id: str, deployment_id: str) -> bool: ...

    def has_archive(self, job_id: str, widget_id: str) -> bool: ...


@dataclass
class ReconcileReport:
    deployments: list[tuple[str, str, str]] = field(default_factory=list)  # org, widget, dep id
    archives: list[tuple[str, str, str]] = field(default_factory=list)  # org, widget, job id
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Policy:
    now: datetime
    ready_cutoff: datetime
    running_cutoff: datetime
    queue_sizes: Mapping[str, int]
    in_broker: BrokerView | None


def _stale_filter(model: type[J], policy: _Policy) -> ColumnElement[bool]:
    return or_(
        (col(model.status) == "ready")
        & (col(model.enqueued_at).is_(None) | (col(model.enqueued_at) < policy.ready_cutoff)),
        (col(model.status) == "running") & (col(model.started_at) < policy.running_cutoff),
    )


def _has_message(job: Deployment | ArchiveJob, policy: _Policy) -> bool:
    """Is this ``ready`` job's message (presumably) still in the broker?"""
    if policy.in_broker is not None:
        if not policy.in_broker.complete:
            return True  # the scan stopped early: nothing is known to be missing
        if isinstance(job, Deployment):
            return policy.in_broker.has_deployment(job.organization_id, job.deployment_id)
        return policy.in_broker.has_archive(job.id, job.widget_id)
    queue = c.DEPLOY_QUEUE if isinstance(job, Deployment) else c.ARCHIVE_QUEUE
    return policy.queue_sizes.get(queue, 0) > 0  # legacy: presumed to be in the backlog


def _pages(model: type[J], policy: _Policy) -> Iterator[list[J]]:
    """Stale-looking rows, oldest first, in pages read without locks (keyset pagination)."""
    after: tuple[datetime, str] | None = None
    checked = 0
    while checked < MAX_CHECKED:
        stmt = select(model).where(_stale_filter(model, policy))
        if after is not None:
            stmt = stmt.where(
                (col(model.created_at) > after[0])
                | ((col(model.created_at) == after[0]) & (col(model.id) > after[1]))
            )
        stmt = stmt.order_by(col(model.created_at), col(model.id)).limit(PAGE)
        with Session(read_only_engine(), expire_on_commit=False) as session:
            rows = list(session.exec(stmt).all())
        if not rows:
            return
        checked += len(rows)
        yield rows
        if len(rows) < PAGE:
            return
        after = (rows[-1].created_at, rows[-1].id)


def _candidates(model: type[J], policy: _Policy) -> list[str]:
    """Row ids to re-send (or fail): stuck ``running``, or ``ready`` without a message."""
    ids: list[str] = []
    for rows in _pages(model, policy):
        for job in rows:
            if job.status == "running" or not _has_message(job, policy):
                ids.append(job.id)
                if len(ids) >= BATCH:
                    return ids
    return ids


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


def _apply(
    session: Session,
    model: type[J],
    ids: list[str],
    policy: _Policy,
    resend: list[tuple[str, str, str]],
    report: ReconcileReport,
) -> None:
    if not ids:
        return
    # Locked and checked again: a worker may have picked a job up since it was read.
    stmt = select(model).where(col(model.id).in_(ids), _stale_filter(model, policy))
    if is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    for job in session.exec(stmt.order_by(col(model.created_at))).all():
        key = job.deployment_id if isinstance(job, Deployment) else job.id
        if _requeue_or_fail(job, policy.now):
            resend.append((job.organization_id, job.widget_id, key))
        else:
            report.failed.append(key)
        session.add(job)


def reconcile(
    now: datetime | None = None,
    queue_sizes: Mapping[str, int] | None = None,
    in_broker: BrokerView | None = None,
) -> ReconcileReport:
    """Find and update stale jobs; the caller sends the returned ones after this commit.

    ``in_broker``: the jobs that have a message in the broker, read *before* this call, with
    ``now`` the time that read started. Without it, ``queue_sizes`` (the broker's waiting
    messages per queue; unknown = treated as empty) and the longer time-only bound are used.
    """
    now = now or utcnow()
    with_view = in_broker is not None
    policy = _Policy(
        now=now,
        ready_cutoff=now - timedelta(seconds=RESEND_AFTER if with_view else READY_STALE_AFTER),
        running_cutoff=now - timedelta(seconds=RUNNING_STALE_AFTER),
        queue_sizes=queue_sizes or {},
        in_broker=in_broker,
    )
    deployments = _candidates(Deployment, policy)
    archives = _candidates(ArchiveJob, policy)
    report = ReconcileReport()
    with unit_of_work() as session:
        _apply(session, Deployment, deployments, policy, report.deployments, report)
        _apply(session, ArchiveJob, archives, policy, report.archives, report)
    return report
