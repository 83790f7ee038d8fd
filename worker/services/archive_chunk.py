"""Archiving a chunk of widgets at once: the path of the scheduled draft cleanup.

The cleanup (:mod:`worker.services.cleanup`) marks a batch of stale drafts archived in one
transaction, then sends their archive jobs in chunks of at most
:data:`worker.services.chunking.CHUNK` per organization (one ``widgets.archive_chunk`` message
each) instead of one message per widget. One delivery of a chunk:

1. **claims** every job of the chunk in one transaction (``archive.claim_chunk``), in widget-id
   order, each exactly as a single archive's claim does (:func:`archive.claim_in`: the widget
   locked, the plan fixed, the attempt counted);
2. **runs** the claimed jobs concurrently on this process's threads
   (:mod:`worker.services.chunking`), each through the single archive's
   :func:`archive.finish_claimed` (assets, the container file, the row, the job's status);
3. **hands back** every job that reached no outcome for a reason a single archive retries (a
   transient S3 error, a lost database connection, a whole claim that failed) as a single
   ``widgets.archive`` message, which has the retries and the attempts cap. A permanent error
   fails the job as a single archive's task would (:func:`archive.record_failure`).

Each job takes the same steps as a single archive, so it keeps the same guarantees (resumable at
any line, idempotent); only the claim's transaction is shared. A claim that fails commits
nothing; a delivery that dies after it is redelivered (``acks_late``) and resumes each job from
its stored plan. A hand-back whose send fails leaves the job for the reconciler, which reads
chunk messages as holding their jobs (:func:`worker.producer.jobs_in_broker`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from sqlalchemy.exc import OperationalError, SQLAlchemyError

from worker.db import read_session, unit_of_work
from worker.ids import require_safe_id
from worker.models import ArchiveJob
from worker.s3 import S3Error, S3Store, TransientS3Error
from worker.services import archive
from worker.services.chunking import ChunkReport, MapFn, concurrently
from worker.services.deploy import InvalidJobError
from worker.services.job_state import readable

log = logging.getLogger(__name__)

Item = tuple[str, str]  # (widget_id, archive_job_id)
HandBack = Callable[[str, str, str], object]  # organization_id, widget_id, archive_job_id

# What a single archive retries (worker.tasks.base): handed back to one.
TRANSIENT_ERRORS = (TransientS3Error, OperationalError)


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
    report: ChunkReport[archive.ArchiveOutcome] = ChunkReport()
    widget_of = {job_id: widget_id for widget_id, job_id in items}
    lock = threading.Lock()  # the report's lists only: no send is made holding it

    def give_back(job_id: str, why: object) -> None:
        log.info("archive job %s handed back to a single archive: %s", job_id, why)
        with lock:
            report.handed_back.append(job_id)
        hand_back(organization_id, widget_of[job_id], job_id)

    try:
        claimed = _claim_chunk(organization_id, items)
    except (SQLAlchemyError, InvalidJobError) as exc:
        report.whole_chunk_handed_back = True
        for _, job_id in items:
            give_back(job_id, exc)
        return report

    def finish(item: Item) -> None:
        widget_id, job_id = item
        try:
            done = archive.finish_claimed(claimed[job_id], store)
        except TRANSIENT_ERRORS as exc:
            give_back(job_id, exc)
            return
        except (S3Error, SQLAlchemyError) as exc:
            log.warning("archive job %s failed: %s", job_id, exc)
            archive.record_failure(organization_id, widget_id, job_id, readable(exc))
            done = _outcome_of(job_id)
        with lock:
            report.outcomes.append(done)

    map_fn(finish, sorted(items))
    return report
