"""Archiving a chunk of widgets at once: the path of the scheduled draft cleanup.

The cleanup (:mod:`worker.services.cleanup`) marks a batch of stale drafts archived in one
transaction, then sends their archive jobs in chunks of at most
:data:`worker.services.chunking.CHUNK` per organization (one ``widgets.archive_chunk`` message
each) instead of one message per widget. One delivery of a chunk:

1. **claims** every job of the chunk in one transaction (``archive.claim_chunk``), in widget-id
   order, each exactly as a single archive's claim does (:func:`archive.claim_in`: the widget
   locked, the plan fixed, the attempt counted);
2. **takes down** the claimed jobs' objects concurrently on this process's threads
   (:mod:`worker.services.chunking`), each through the single archive's
   :func:`archive.take_down_objects` (assets, anything under the widget's prefix, the container
   file), after one read of the organization's ``api_key`` and of which widgets have asset rows;
3. **removes** the rows and records every ``success`` in one transaction
   (``archive.finish_chunk``: :func:`archive.remove_in` and :func:`archive.finish_in` per job);
4. **hands back** every job that reached no outcome for a reason a single archive retries (a
   transient S3 error, a lost database connection, a whole claim that failed) as a single
   ``widgets.archive`` message, which has the retries and the attempts cap. A permanent error
   fails the job as a single archive's task would (:func:`archive.record_failure`).

Each job takes the same steps as a single archive in the same order (objects before rows), so
it keeps the same guarantees (resumable at any line, idempotent); only the transactions are
shared. A claim or a finish that fails commits nothing (the finish's jobs are then handed back:
their objects are gone already, deleting them again is harmless); a delivery that dies is
redelivered (``acks_late``) and resumes each job from its stored plan. A hand-back whose send
fails leaves the job for the reconciler, which reads chunk messages as holding their jobs
(:func:`worker.producer.jobs_in_broker`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from worker.db import read_session, unit_of_work
from worker.ids import require_safe_id
from worker.models import ArchiveJob, Organization, Widget, WidgetAsset
from worker.s3 import S3Error, S3Store
from worker.services import archive, job_state
from worker.services.chunking import (
    TRANSIENT_ERRORS,
    ChunkReport,
    HandBack,
    Item,
    MapFn,
    concurrently,
)
from worker.services.deploy import InvalidJobError
from worker.services.job_state import readable

log = logging.getLogger(__name__)


def _claim_chunk(organization_id: str, items: Sequence[Item]) -> dict[str, ArchiveJob]:
    claimed: dict[str, ArchiveJob] = {}
    with unit_of_work("archive.claim_chunk") as session:
        for widget_id, job_id in sorted(items):
            claimed[job_id] = archive.claim_in(session, organization_id, widget_id, job_id)
    return claimed


def _outcome_of(job_id: str) -> archive.ArchiveOutcome:
    with read_session("archive.read_outcome") as session:
        job = session.get(ArchiveJob, job_id)
        assert job is not None
        return archive.job_outcome(job)


def run_chunk(
    organization_id: str,
    items: Sequence[Item],
    store: Callable[[], S3Store],
    hand_back: HandBack,
    map_fn: MapFn = concurrently,
) -> ChunkReport[archive.ArchiveOutcome]:
    """One delivery of a chunk; safe to run any number of times (see the module docstring)."""
    require_safe_id(organization_id, "organization_id")
    for widget_id, job_id in items:
        require_safe_id(widget_id, "widget_id")
        require_safe_id(job_id, "archive_job_id")
    report: ChunkReport[archive.ArchiveOutcome] = ChunkReport(
        organization_id, items, hand_back, "archive job"
    )
    try:
        claimed = _claim_chunk(organization_id, items)
    except (SQLAlchemyError, InvalidJobError) as exc:
        return report.hand_back_all(exc)
    open_jobs = {j: job for j, job in claimed.items() if not job_state.is_final(job)}
    report.outcomes.extend(
        archive.job_outcome(job) for job in claimed.values() if job.id not in open_jobs
    )
    if not open_jobs:
        return report
    api_key, with_assets, with_preview = _read_chunk(
        organization_id, [job.widget_id for job in open_jobs.values()]
    )
    taken_down: list[str] = []
    lock = threading.Lock()  # taken_down only

    def take_down(item: Item) -> None:
        widget_id, job_id = item
        try:
            archive.take_down_objects(
                open_jobs[job_id],
                api_key,
                store,
                has_assets=widget_id in with_assets,
                has_preview=widget_id in with_preview,
            )
        except TRANSIENT_ERRORS as exc:
            report.hand_back(job_id, exc)
            return
        except (S3Error, SQLAlchemyError) as exc:
            # Failed as a single archive's task fails it.
            log.warning("archive job %s failed: %s", job_id, exc)
            archive.record_failure(organization_id, widget_id, job_id, readable(exc))
            report.add(_outcome_of(job_id))
            return
        with lock:
            taken_down.append(job_id)

    map_fn(take_down, sorted(item for item in items if item[1] in open_jobs))
    if taken_down:
        in_widget_order = sorted(taken_down, key=lambda j: open_jobs[j].widget_id)
        _finish_chunk(in_widget_order, report)
    return report


def _read_chunk(organization_id: str, widget_ids: list[str]) -> tuple[str, set[str], set[str]]:
    """The organization's ``api_key``, which of the widgets have asset rows and which may have
    a preview file: one read for the chunk instead of three per job."""
    with read_session("archive.read_chunk") as session:
        org = session.get(Organization, organization_id)
        assert org is not None  # the claim found it
        with_assets = session.exec(
            select(WidgetAsset.widget_id)
            .where(
                WidgetAsset.organization_id == organization_id,
                col(WidgetAsset.widget_id).in_(widget_ids),
            )
            .distinct()
        ).all()
        with_preview = session.exec(
            select(Widget.id).where(
                Widget.organization_id == organization_id,
                col(Widget.id).in_(widget_ids),
                col(Widget.preview_seq).is_not(None),
            )
        ).all()
        return org.api_key, set(with_assets), set(with_preview)


def _finish_chunk(job_ids: list[str], report: ChunkReport[archive.ArchiveOutcome]) -> None:
    """Step 4 and the status of every job whose objects are down, in one transaction (widget-id
    order, as the claim locked them). If it fails, nothing of it is committed: each job goes
    the single way (its objects are gone already; deleting them again is harmless)."""
    try:
        with unit_of_work("archive.finish_chunk") as session:
            done = []
            for job_id in job_ids:
                archive.remove_in(session, job_id)
                done.append(archive.finish_in(session, job_id))
    except TRANSIENT_ERRORS as exc:
        for job_id in job_ids:
            report.hand_back(job_id, exc)
        return
    report.outcomes.extend(done)
