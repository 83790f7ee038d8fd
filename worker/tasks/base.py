"""A task base that records a job's final failure in its row: the one place failures are written."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy.exc import OperationalError

from worker import constants as c
from worker.s3 import TransientS3Error
from worker.services import chunking
from worker.services.chunking import ChunkReport, HandBack
from worker.services.job_state import readable

log = logging.getLogger(__name__)

# Retry policy of the S3-facing jobs: transient S3 errors (after botocore's own quick retries),
# database outages and soft time limits are retried with exponential backoff and full jitter;
# anything else (a permanent S3 error, an invalid message) fails at once.
RETRY_ON_TRANSIENT_ERRORS: dict[str, Any] = {
    # OperationalError: a lost database connection, or SQLite's "database is locked".
    "autoretry_for": (TransientS3Error, SoftTimeLimitExceeded, OperationalError),
    "retry_backoff": c.RETRY_BACKOFF_SECONDS,
    "retry_backoff_max": c.RETRY_BACKOFF_MAX_SECONDS,
    "retry_jitter": True,
    "max_retries": c.MAX_RETRIES,
}


class JobTask(Task):  # type: ignore[misc]
    """Subclasses implement ``record_failure`` and ``record_retry`` for their job kind."""

    abstract = True

    def record_failure(self, kwargs: dict[str, Any], error: str) -> None:
        raise NotImplementedError

    def record_retry(self, kwargs: dict[str, Any], error: str) -> None:
        raise NotImplementedError

    def on_failure(
        self,
        exc: Exception,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: ExceptionInfo,
    ) -> None:
        if isinstance(exc, TimeLimitExceeded):
            # Hard time limit: the child was killed, possibly after its upload went through.
            # Celery requeues the message (``task_acks_on_timeout=False``); the redelivery
            # decides from S3 and the database, and counts towards the attempt cap.
            log.warning("%s %s killed by the hard time limit; redelivered", self.name, task_id)
            self.record_retry(kwargs, f"killed after the {exc} s hard time limit")
            return
        log.warning("%s %s failed: %s", self.name, task_id, readable(exc))
        self.record_failure(kwargs, readable(exc))

    def on_retry(
        self,
        exc: Exception,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: ExceptionInfo,
    ) -> None:
        self.record_retry(kwargs, readable(exc))


def run_chunk_task(
    organization_id: str,
    items: list[list[str]],
    run: Callable[[list[tuple[str, str]]], ChunkReport[Any]],
    send_single: HandBack,
) -> dict[str, Any]:
    """A chunk message (``widgets.deploy_chunk``, ``widgets.archive_chunk``): ``run`` on at most
    :data:`chunking.MAX_ITEMS` of its ``[widget_id, job_id]`` items (the rest is left to the
    reconciler). No retry policy: what does not finish is handed back as single messages, which
    have one; out of time (a hung S3 call), every job is (those already final answer their
    single message at once)."""
    pairs = [(str(w), str(j)) for w, j in items][: chunking.MAX_ITEMS]
    try:
        return run(pairs).as_dict()
    except SoftTimeLimitExceeded:
        for widget_id, job_id in pairs:
            send_single(organization_id, widget_id, job_id)
        return {"jobs": len(pairs), "handed_back": [j for _, j in pairs]}
