"""``widgets.dispatch_webhooks`` (beat's tick) and ``widgets.deliver_webhooks`` (one attempt of
each of an endpoint's deliveries):
thin wrappers around :mod:`worker.services.webhook_delivery`."""

from __future__ import annotations

import logging
from typing import Any

from worker import constants as c
from worker import producer
from worker.celery import app
from worker.ids import require_safe_id
from worker.models import utcnow
from worker.services import bulk_completion, chunking, webhook_delivery
from worker.settings import get_settings

log = logging.getLogger(__name__)


@app.task(name=c.DISPATCH_WEBHOOKS_TASK, acks_late=True)
def dispatch_webhooks() -> dict[str, Any]:
    """Record the bulk jobs that ended (``bulk.completed``), then claim the due deliveries and
    send one message each. One the broker does not take is claimed again when its lease runs
    out."""
    bulk_completion.record_completed(utcnow())
    claimed = webhook_delivery.claim_due(utcnow())
    sent = unsent = 0
    for endpoint_id, webhook_ids in claimed.items():
        for batch in chunking.chunks(webhook_ids, webhook_delivery.BATCH):
            if producer.send_webhook_deliveries(endpoint_id, batch):
                sent += len(batch)
            else:
                unsent += len(batch)
    if unsent:
        log.warning("%d webhook deliveries not sent (claimed again later)", unsent)
    return {"sent": sent, "unsent": unsent}


@app.task(
    name=c.DELIVER_WEBHOOKS_TASK,
    acks_late=True,
    soft_time_limit=c.TASK_SOFT_TIME_LIMIT,
    time_limit=c.TASK_TIME_LIMIT,
)
def deliver_webhooks(endpoint_id: str, webhook_ids: list[str]) -> dict[str, str]:
    """One attempt of each of an endpoint's deliveries; the outcomes are recorded by the
    service, never retried by Celery (each delivery's own schedule decides its next attempt).
    Returns each delivery's status after it."""
    require_safe_id(endpoint_id, "endpoint_id")
    if not isinstance(webhook_ids, list) or len(webhook_ids) > webhook_delivery.BATCH:
        raise ValueError(f"webhook_ids must be a list of at most {webhook_delivery.BATCH} ids")
    for webhook_id in webhook_ids:
        require_safe_id(webhook_id, "webhook_id")
    return webhook_delivery.deliver(endpoint_id, webhook_ids, get_settings())
