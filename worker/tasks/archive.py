"""``widgets.archive``: keyword arguments ``organization_id``, ``widget_id`` and, when the job
was accepted through the API, ``archive_job_id``; ``widgets.archive_chunk`` (the cleanup's
archive jobs, several at once)."""

from __future__ import annotations

from typing import Any

from worker import constants as c
from worker import producer
from worker.celery import app
from worker.ids import is_safe_id
from worker.s3 import get_store
from worker.services import archive as service
from worker.services import archive_chunk
from worker.tasks.base import RETRY_ON_TRANSIENT_ERRORS, JobTask, run_chunk_task


def _ids(kwargs: dict[str, Any]) -> tuple[str, str, str | None] | None:
    org, widget, job = (kwargs.get(k) for k in ("organization_id", "widget_id", "archive_job_id"))
    if not (is_safe_id(org) and is_safe_id(widget)) or (job is not None and not is_safe_id(job)):
        return None
    return org, widget, job  # type: ignore[return-value]


class ArchiveTask(JobTask):
    def record_failure(self, kwargs: dict[str, Any], error: str) -> None:
        ids = _ids(kwargs)
        if ids is not None:
            service.record_failure(*ids, error)

    def record_retry(self, kwargs: dict[str, Any], error: str) -> None:
        ids = _ids(kwargs)
        if ids is not None and ids[2] is not None:
            service.note_retry(ids[2], error)


@app.task(
    bind=True,
    base=ArchiveTask,
    name=c.ARCHIVE_TASK,
    **RETRY_ON_TRANSIENT_ERRORS,
)
def archive(
    self: ArchiveTask, organization_id: str, widget_id: str, archive_job_id: str | None = None
) -> dict[str, Any]:
    outcome = service.run_archive(organization_id, widget_id, archive_job_id, store=get_store)
    return outcome.as_dict()


@app.task(name=c.ARCHIVE_CHUNK_TASK, acks_late=True)
def archive_chunk_task(organization_id: str, items: list[list[str]]) -> dict[str, Any]:
    """``widgets.archive_chunk``: keyword arguments ``organization_id`` and ``items``, a list of
    ``[widget_id, archive_job_id]`` (:mod:`worker.services.archive_chunk`)."""
    return run_chunk_task(
        organization_id,
        items,
        lambda pairs: archive_chunk.run_chunk(
            organization_id, pairs, store=get_store, hand_back=producer.send_archive
        ),
        producer.send_archive,
    )
