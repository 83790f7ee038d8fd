"""A task base that records a job's final failure in its row: the one place failures are written."""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy.exc import OperationalError

from worker import constants as c
from worker.s3 import TransientS3Error
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
