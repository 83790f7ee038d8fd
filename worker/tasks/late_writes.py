"""``widgets.check_late_writes`` (beat): the last check of archived widgets' keys and of failed
deployments' files, once no write sent before can land (:mod:`worker.services.late_writes`)."""

from __future__ import annotations

from typing import Any

from worker import constants as c
from worker.celery import app
from worker.models import utcnow
from worker.s3 import get_store
from worker.services import late_writes
from worker.settings import get_settings


@app.task(name=c.LATE_WRITES_TASK, acks_late=True)
def check_late_writes() -> dict[str, Any]:
    horizon = get_settings().late_write_horizon_seconds
    report = late_writes.check_late_writes(utcnow(), horizon, get_store)
    return {
        "swept": len(report.swept),
        "checked": len(report.checked),
        "restored": report.restored,
    }
