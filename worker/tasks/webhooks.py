"""``widgets.dispatch_webhooks`` (beat's tick) and ``widgets.deliver_webhook`` (one attempt):
thin wrappers around :mod:`worker.services.webhook_delivery`."""

from __future__ import annotations

import logging
from typing import Any

from worker import constants as c
from worker import producer
from worker.celery import app
from worker.ids import require_safe_id
from worker.models import utcnow
from worker.services import bulk_completion, webhook_delivery
from worker.settings import get_settings

log = logging.getLogger(__name__)


@app.task(name=c.DISPATCH_WEBHOOKS_TASK, acks_late=True)
def dispatch_webhooks() -> dict[str, Any]:
    """Record the bulk jobs that ended (``bulk.completed``), then claim the due deliveries and
    send one message each. One the broker does not take is claimed again when its lease runs
    out."""
    bulk_completion.record_completed(utcnow())
    claimed = webhook_delivery.claim_due(utcnow())
    unsent = [key for key in claimed if not producer.send_webhook_delivery(*key)]
    if unsent:
        log.warning("%d webhook deliveries not sent (claimed again later)", len(unsent))
    return {"sent": len(claimed) - len(unsent), "unsent": len(unsent)}


@app.task(
    name=c.DELIVER_WEBHOOK_TASK,
    acks_late=True,
    soft_time_limit=c.TASK_SOFT_TIME_LIMIT,
    time_limit=c.TASK_TIME_LIMIT,
)
def deliver_webhook(webhook_id: str, endpoint_id: str) -> dict[str, Any]:
    """One attempt of one delivery; its outcome is recorded by the service, never retried by
    Celery (the delivery's own schedule decides the next attempt)."""
    require_safe_id(endpoint_id, "endpoint_id")
    require_safe_id(webhook_id, "webhook_id")
    done = webhook_delivery.deliver(webhook_id, endpoint_id, get_settings())
    answer = done.answer
    return {
        "status": done.status,
        "status_code": answer.status_code if answer else None,
        "latency_ms": answer.latency_ms if answer else None,
    }
