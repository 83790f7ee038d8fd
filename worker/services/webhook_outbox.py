"""The webhook outbox: an event is written in the transaction of the state change that causes it.

:func:`record_event` is one ``INSERT ... SELECT``: a delivery row (``pending``, due now) for
each endpoint of the organization subscribed to the event type, found through
``webhook_subscriptions`` (enabled endpoints only). It runs in the caller's transaction, so the
event exists if and only if the change committed: a crash can lose neither, and no network call
is made here. Beat's tick then sends the due deliveries (:mod:`worker.services.webhook_delivery`).
The statuses are written, and the events recorded, in one place: :mod:`worker.services.job_state`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert, literal, select
from sqlmodel import Session, col

from worker.models import ArchiveJob, Deployment, utcnow
from worker.models.types import PortableJSON, UTCDateTime
from worker.models.webhooks import WebhookDelivery, WebhookSubscription, new_webhook_id

DEPLOYMENT_EVENTS = {"success": "deployment.succeeded", "failure": "deployment.failed"}
ARCHIVE_EVENTS = {"success": "archive.completed"}


def record_event(
    session: Session, organization_id: str, event_type: str, data: dict[str, Any]
) -> None:
    """Deliveries of one event to every subscribed endpoint, in ``session``'s transaction."""
    now = utcnow()
    sub = WebhookSubscription
    rows = select(
        literal(new_webhook_id()),
        col(sub.endpoint_id),
        literal(organization_id),
        literal(event_type),
        literal(data, PortableJSON),
        literal("pending"),
        literal(0),
        literal(now, UTCDateTime),
        literal(now, UTCDateTime),
        literal(now, UTCDateTime),
    ).where(col(sub.organization_id) == organization_id, col(sub.event_type) == event_type)
    columns = [
        "webhook_id",
        "endpoint_id",
        "organization_id",
        "event_type",
        "data",
        "status",
        "attempts",
        "next_attempt_at",
        "created_at",
        "updated_at",
    ]
    session.connection().execute(insert(WebhookDelivery).from_select(columns, rows))


def jsonable(fields: dict[str, Any]) -> dict[str, Any]:
    """Timestamps as the API writes them (ISO 8601 UTC, ``Z``)."""
    return {
        k: v.isoformat().replace("+00:00", "Z") if isinstance(v, datetime) else v
        for k, v in fields.items()
    }


def deployment_data(dep: Deployment, **changed: Any) -> dict[str, Any]:
    """The deployment as a webhook's ``data`` (its snapshot left out: fetch it by ``id``), with
    the fields this transaction changes."""
    fields = {
        "id": dep.id,
        "deployment_id": dep.deployment_id,
        "organization_id": dep.organization_id,
        "widget_id": dep.widget_id,
        "target": dep.target,
        "status": dep.status,
        "error": dep.error,
        "sequence": dep.sequence,
        "s3_key": dep.s3_key,
        "checksum": dep.checksum,
        "live_deployment_id": dep.live_deployment_id,
        "source_deployment_id": dep.source_deployment_id,
        "bulk_id": dep.bulk_id,
        "publish_at": dep.publish_at,
        "created_at": dep.created_at,
        "finished_at": dep.finished_at,
        **changed,
    }
    return jsonable(fields)


def archive_data(job: ArchiveJob, **changed: Any) -> dict[str, Any]:
    fields = {
        "id": job.id,
        "organization_id": job.organization_id,
        "widget_id": job.widget_id,
        "status": job.status,
        "result": job.result,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        **changed,
    }
    return jsonable(fields)


def record_finished(
    session: Session, job: Deployment | ArchiveJob, status: str, **changed: Any
) -> None:
    """The event of ``job`` ending ``status`` (if that status has one)."""
    if isinstance(job, Deployment):
        event = DEPLOYMENT_EVENTS.get(status)
        if event is not None:
            data = deployment_data(job, status=status, **changed)
            record_event(session, job.organization_id, event, data)
        return
    event = ARCHIVE_EVENTS.get(status)
    if event is not None:
        data = archive_data(job, status=status, **changed)
        record_event(session, job.organization_id, event, data)
