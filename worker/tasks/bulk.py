"""``widgets.bulk_deploy``: keyword arguments ``organization_id``, ``bulk_id``.

One message runs one slice of the job's fan-out (:func:`worker.services.bulk.fan_out`), well
inside the soft time limit; if widgets remain, it records ``enqueued_at`` and sends the next
message, then acknowledges its own (``acks_late``). Whatever happens between those lines, the
job has a message or the reconciler re-sends it (see :mod:`worker.services.bulk`):

* the worker dies mid-slice: its message is redelivered (``acks_late``), the slice resumes at
  the committed cursor;
* the continuation's send fails: this message is acknowledged without a successor; the
  reconciler finds the job unfinished, without a message, and re-sends it;
* a database error or a soft time limit: retried by Celery (a new message), then, out of
  retries, the same as a lost message.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from worker import constants as c
from worker import producer
from worker.celery import app
from worker.db import unit_of_work
from worker.ids import require_safe_id
from worker.models import BulkJob
from worker.services import bulk

log = logging.getLogger(__name__)


@app.task(
    name=c.BULK_DEPLOY_TASK,
    acks_late=True,
    autoretry_for=(OperationalError, SoftTimeLimitExceeded),
    retry_backoff=c.RETRY_BACKOFF_SECONDS,
    retry_backoff_max=c.RETRY_BACKOFF_MAX_SECONDS,
    retry_jitter=True,
    max_retries=c.MAX_RETRIES,
)
def bulk_deploy(organization_id: str, bulk_id: str) -> dict[str, Any]:
    require_safe_id(organization_id, "organization_id")
    require_safe_id(bulk_id, "bulk_id")
    with unit_of_work("bulk.load") as session:
        job = session.get(BulkJob, bulk_id)
        if job is None or job.organization_id != organization_id:
            return {"bulk_id": bulk_id, "error": "unknown bulk job"}
    done = bulk.fan_out(bulk_id, send=producer.send_deploy_chunk)
    result: dict[str, Any] = {"bulk_id": bulk_id, "sent": done.sent, "batches": done.batches}
    if done.done:
        return result
    bulk.note_continuation(bulk_id)  # committed before the send: the reconciler waits for it
    result["continued"] = producer.send_bulk(organization_id, bulk_id)
    if not result["continued"]:
        log.warning("bulk job %s: next slice not sent; the reconciler will send it", bulk_id)
    return result
