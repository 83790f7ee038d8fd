"""Reconciler: jobs accepted but never started, jobs stuck ``running``, stranded bulk fan-outs.

* A deployment or archive job ``ready`` with **no message in the broker** (``in_broker``: what
  :func:`worker.producer.jobs_in_broker` read just before), for longer than
  :data:`RESEND_AFTER` seconds since it was last sent: its send failed (broker down or hung:
  the API answered 202 anyway), the process died between commit and send, or the broker lost
  the message (restart without persistence, ``FLUSHALL``). Re-send it. A job whose message is
  still waiting in a queue, however long the backlog, or is held by a worker (a retry waiting
  for its countdown, a task waiting for a free pool process) has a message, and is left alone.
  :data:`RESEND_AFTER` only has to cover the send itself (bounded: ``worker.producer``) so that
  a job being sent right now is not sent twice; a duplicate would be harmless anyway (tasks are
  idempotent).
* A deployment or archive job ``running`` for longer than :data:`RUNNING_STALE_AFTER` seconds:
  its worker was killed past the hard time limit without a redelivery. Back to ``ready`` and
  re-send.
* A **bulk job** not finished (``fanned_out_at`` and ``error`` unset) with no
  ``widgets.bulk_deploy`` message, last sent more than :data:`RESEND_AFTER` seconds ago: its
  first send failed (the API and the CLI answered anyway), the send of its next slice failed, or
  the broker lost the message. Re-send it: the fan-out resumes at its committed cursor
  (:mod:`worker.services.bulk`). A slice running now holds its message (unacknowledged), and
  a killed worker's message is redelivered by the broker, so neither is re-sent.

Without a broker view (``in_broker=None``, e.g. the CLI's older call) the reconciler falls back
to time alone: ``ready`` (or a bulk job last sent) longer than :data:`READY_STALE_AFTER` ago
while its queue is empty.

**Giving up.** Past :data:`MAX_REQUEUES` counted re-sends a job is given up, never looped:

* a deployment that has a ``sequence`` (frozen, so an earlier run may have written its file) is
  *not* failed here: it is returned in ``report.give_up`` and, after the commit, the caller
  records it through :func:`worker.services.deploy.record_failure`, which looks at S3 first
  (``success`` if its bytes, or a newer sequence's, are live). A deployment is never recorded
  ``failure`` while its bytes may be live. At most :data:`GIVE_UP_BATCH` per run (each costs an
  S3 call); the rest are found again by the next run, untouched;
* a deployment without a sequence (never written) and an archive job end ``failure`` here;
* a bulk job gets its ``error`` (its status reads ``failure`` once its deployments are final).

**Counting re-sends.** The transaction only marks the jobs it will re-send (``ready``,
``enqueued_at`` = now, so a concurrent run leaves them alone for :data:`RESEND_AFTER`). The
caller sends them after the commit and then counts, in a second short transaction
(:func:`count_resent`), only the sends the broker took. A failed send is not counted: the job
stays ``ready`` and is re-sent by a later run, so a broker outage, however long, never makes a
job fail. A crash between a send and its count under-counts by one: the cap errs towards one
more re-send, never towards a false give-up.

No broker or S3 call happens inside a database transaction: the caller scans the broker first,
sends and checks S3 after this module's transactions committed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

from sqlalchemy import ColumnElement, update
from sqlmodel import Session, col, or_, select

from worker import constants as c
from worker.db import is_postgres, read_only_engine, unit_of_work
from worker.models import ArchiveJob, BulkJob, Deployment, utcnow
from worker.services import job_state

# Without a broker view: past the visibility timeout a delivered message would have come back.
READY_STALE_AFTER = c.VISIBILITY_TIMEOUT + 30
# With a broker view: a job sent this long ago has its message in the broker, or never will.
RESEND_AFTER = 30
RUNNING_STALE_AFTER = c.TASK_TIME_LIMIT + 30
MAX_REQUEUES = 5
BATCH = 500  # jobs re-sent per run, per kind
GIVE_UP_BATCH = 50  # frozen deployments given up (each checked on S3) per run
PAGE = 1000
MAX_CHECKED = 100_000  # stale-looking rows compared with the broker per run, per kind

J = TypeVar("J", Deployment, ArchiveJob, BulkJob)
D = TypeVar("D", Deployment, ArchiveJob)
Job = Deployment | ArchiveJob | BulkJob


class BrokerView(Protocol):
    """Which jobs have a message in the broker (:class:`worker.producer.BrokerJobs`)."""

    complete: bool

    def has_deployment(self, organization_id: str, deployment_id: str) -> bool: ...

    def has_archive(self, job_id: str, widget_id: str) -> bool: ...

    def has_bulk(self, bulk_id: str) -> bool: ...


@dataclass(frozen=True)
class GiveUp:
    """A frozen deployment past the re-send cap: to be failed only after an S3 check."""

    organization_id: str
    widget_id: str
    deployment_id: str
    reason: str


@dataclass
class ReconcileReport:
    deployments: list[tuple[str, str, str]] = field(default_factory=list)  # org, widget, dep id
    archives: list[tuple[str, str, str]] = field(default_factory=list)  # org, widget, job id
    bulks: list[tuple[str, str]] = field(default_factory=list)  # org, bulk id
    failed: list[str] = field(default_factory=list)  # ended failure (bulk: error) here
    give_up: list[GiveUp] = field(default_factory=list)
    unsent: list[str] = field(default_factory=list)  # re-sends the broker did not take (caller)


@dataclass(frozen=True)
class _Policy:
    now: datetime
    ready_cutoff: datetime
    running_cutoff: datetime
    queue_sizes: Mapping[str, int]
    in_broker: BrokerView | None


def _filter(model: type[Job], policy: _Policy) -> ColumnElement[bool]:
    if issubclass(model, BulkJob):
        return (
            col(BulkJob.fanned_out_at).is_(None)
            & col(BulkJob.error).is_(None)
            & (
                col(BulkJob.enqueued_at).is_(None)
                | (col(BulkJob.enqueued_at) < policy.ready_cutoff)
            )
        )
    return or_(
        (col(model.status) == "ready")
        & (col(model.enqueued_at).is_(None) | (col(model.enqueued_at) < policy.ready_cutoff)),
        (col(model.status) == "running") & (col(model.started_at) < policy.running_cutoff),
    )


def _has_message(job: Job, policy: _Policy) -> bool:
    """Is this job's message (presumably) still in the broker?"""
    if policy.in_broker is not None:
        if not policy.in_broker.complete:
            return True  # the scan stopped early: nothing is known to be missing
        if isinstance(job, Deployment):
            return policy.in_broker.has_deployment(job.organization_id, job.deployment_id)
        if isinstance(job, BulkJob):
            return policy.in_broker.has_bulk(job.id)
        return policy.in_broker.has_archive(job.id, job.widget_id)
    queue = c.ARCHIVE_QUEUE if isinstance(job, ArchiveJob) else c.DEPLOY_QUEUE
    return policy.queue_sizes.get(queue, 0) > 0  # legacy: presumed to be in the backlog


def _pages(model: type[J], policy: _Policy) -> Iterator[list[J]]:
    """Stale-looking rows, oldest first, in pages read without locks (keyset pagination)."""
    after: tuple[datetime, str] | None = None
    checked = 0
    while checked < MAX_CHECKED:
        stmt = select(model).where(_filter(model, policy))
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
    """Row ids to re-send (or give up): stuck ``running``, or without a message."""
    ids: list[str] = []
    for rows in _pages(model, policy):
        for job in rows:
            stuck = not isinstance(job, BulkJob) and job.status == "running"
            if stuck or not _has_message(job, policy):
                ids.append(job.id)
                if len(ids) >= BATCH:
                    return ids
    return ids


def _locked(session: Session, model: type[J], ids: list[str], policy: _Policy) -> list[J]:
    """Locked and checked again: a worker may have picked a job up since it was read."""
    stmt = select(model).where(col(model.id).in_(ids), _filter(model, policy))
    if is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    return list(session.exec(stmt.order_by(col(model.created_at))).all())


def _gave_up(requeues: int, error: str | None) -> str:
    return f"gave up after {requeues} re-enqueues by the reconciler: {error or ''}"


def _apply_jobs(
    session: Session,
    model: type[D],
    ids: list[str],
    policy: _Policy,
    resend: list[tuple[str, str, str]],
    report: ReconcileReport,
) -> None:
    for job in _locked(session, model, ids, policy) if ids else []:
        key = job.deployment_id if isinstance(job, Deployment) else job.id
        if job.requeues < MAX_REQUEUES:
            job_state.back_to_ready(job)
            job.enqueued_at = job.updated_at = policy.now
            resend.append((job.organization_id, job.widget_id, key))
        elif isinstance(job, Deployment) and job.sequence is not None:
            # It may have written its file: the caller checks S3 before any failure.
            if len(report.give_up) < GIVE_UP_BATCH:
                reason = _gave_up(job.requeues, job.error)
                report.give_up.append(GiveUp(job.organization_id, job.widget_id, key, reason))
            continue  # the row is left as it is
        else:
            job_state.finish(job, "failure", _gave_up(job.requeues, job.error))
            report.failed.append(key)
        session.add(job)


def _apply_bulks(
    session: Session, ids: list[str], policy: _Policy, report: ReconcileReport
) -> None:
    for job in _locked(session, BulkJob, ids, policy) if ids else []:
        if job.requeues < MAX_REQUEUES:
            job.enqueued_at = job.updated_at = policy.now
            report.bulks.append((job.organization_id, job.id))
        else:
            job.error = (
                f"gave up after {job.requeues} re-enqueues by the reconciler: the fan-out's "
                f"message was lost each time (last widget done: {job.cursor or 'none'})"
            )
            job.updated_at = policy.now
            report.failed.append(job.id)
        session.add(job)


def reconcile(
    now: datetime | None = None,
    queue_sizes: Mapping[str, int] | None = None,
    in_broker: BrokerView | None = None,
) -> ReconcileReport:
    """Find and update stale jobs; the caller sends the returned ones after this commit, then
    counts the sends that succeeded (:func:`count_resent`) and records ``give_up``.

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
    bulks = _candidates(BulkJob, policy)
    report = ReconcileReport()
    with unit_of_work("reconcile.apply") as session:
        _apply_jobs(session, Deployment, deployments, policy, report.deployments, report)
        _apply_jobs(session, ArchiveJob, archives, policy, report.archives, report)
        _apply_bulks(session, bulks, policy, report)
    return report


def _chunks(items: list[str], size: int = BATCH) -> Iterable[list[str]]:
    return (items[i : i + size] for i in range(0, len(items), size))


def count_resent(sent: ReconcileReport) -> None:
    """Second transaction, after the sends: ``requeues + 1`` for each job in ``sent`` (the jobs
    of a report whose re-send the broker took)."""
    by_org: dict[str, list[str]] = {}
    for org_id, _, dep_id in sent.deployments:
        by_org.setdefault(org_id, []).append(dep_id)
    archive_ids = [job_id for _, _, job_id in sent.archives]
    bulk_ids = [bulk_id for _, bulk_id in sent.bulks]
    if not (by_org or archive_ids or bulk_ids):
        return
    with unit_of_work("reconcile.count_resent") as session:
        conn = session.connection()
        for org_id, dep_ids in by_org.items():
            for chunk in _chunks(dep_ids):
                conn.execute(
                    update(Deployment)
                    .where(
                        col(Deployment.organization_id) == org_id,
                        col(Deployment.deployment_id).in_(chunk),
                    )
                    .values(requeues=col(Deployment.requeues) + 1)
                )
        for model, ids in ((ArchiveJob, archive_ids), (BulkJob, bulk_ids)):
            for chunk in _chunks(ids):
                conn.execute(
                    update(model)
                    .where(col(model.id).in_(chunk))
                    .values(requeues=col(model.requeues) + 1)
                )
