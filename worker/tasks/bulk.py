"""``widgets.bulk_deploy``: keyword arguments ``organization_id``, ``bulk_id``."""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import OperationalError

from worker import constants as c
from worker import producer
from worker.celery import app
from worker.db import unit_of_work
from worker.ids import require_safe_id
from worker.models import BulkJob
from worker.services import bulk


@app.task(
    name=c.BULK_DEPLOY_TASK,
    acks_late=True,
    autoretry_for=(OperationalError,),
    retry_backoff=c.RETRY_BACKOFF_SECONDS,
    retry_backoff_max=c.RETRY_BACKOFF_MAX_SECONDS,
    retry_jitter=True,
    max_retries=c.MAX_RETRIES,
)
def bulk_deploy(organization_id: str, bulk_id: str) -> dict[str, Any]:
    require_safe_id(organization_id, "organization_id")
    require_safe_id(bulk_id, "bulk_id")
    with unit_of_work() as session:
        job = session.get(BulkJob, bulk_id)
        if job is None or job.organization_id != organization_id:
            return {"bulk_id": bulk_id, "error": "unknown bulk job"}
    sent = bulk.fan_out(bulk_id, send=producer.send_deploy)
    return {"bulk_id": bulk_id, "sent": sent}
