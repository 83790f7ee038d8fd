"""Delivering webhook events: at least once, signed per Standard Webhooks, never blocking a deploy.

A delivery row (:mod:`worker.services.webhook_outbox`) is ``pending`` with a ``next_attempt_at``.
Beat's tick (``widgets.dispatch_webhooks``) **claims** the due ones, one conditional ``UPDATE`` that
pushes their ``next_attempt_at`` a lease ahead (:data:`LEASE_SECONDS`, longer than an attempt can
take), and sends a ``widgets.deliver_webhooks`` message per endpoint and batch (:data:`BATCH`) after
the commit. The task makes one attempt of each, concurrently, with no transaction open during the
requests, then records them in one transaction: ``succeeded`` on a 2xx; on a 410 ``failed`` and the
endpoint disabled; else the next attempt after the schedule's wait (±20 % jitter), or ``failed``
when the schedule is spent. A message lost, or a worker killed mid-attempt, only delays the
delivery: the lease runs out and the tick claims it again. A receiver may therefore see an event
twice, always with the same ``webhook-id`` (its idempotency key), never a different one.

The body is ``{"type", "timestamp", "data"}``; the headers ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of
id.timestamp.body>``, signed with the ``standardwebhooks`` library), with a second signature by
the previous secret while a rotation's overlap lasts.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, tuple_, update
from sqlmodel import Session, col, select
from standardwebhooks.webhooks import Webhook

from worker.db import read_session, unit_of_work
from worker.models import utcnow
from worker.models.webhooks import (
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookSubscription,
)
from worker.settings import Settings
from worker.webhook_http import Answer, Request, post_all

# A claimed delivery is not claimed again for this long: more than an attempt can take.
LEASE_SECONDS = 60.0
DUE_BATCH = 500
# Deliveries of one endpoint per message: sent at once, so a batch takes one timeout at most.
BATCH = 16
JITTER = 0.2
GONE = 410


def claim_due(now: datetime, limit: int = DUE_BATCH) -> dict[str, list[str]]:
    """The deliveries due at ``now``, leased to this tick in one ``UPDATE ... RETURNING``, by
    endpoint: the caller sends them after the commit."""
    lease = now + timedelta(seconds=LEASE_SECONDS)
    key = tuple_(col(WebhookDelivery.webhook_id), col(WebhookDelivery.endpoint_id))
    is_due = (col(WebhookDelivery.status) == "pending") & (
        col(WebhookDelivery.next_attempt_at) <= now
    )
    due = (
        select(WebhookDelivery.webhook_id, WebhookDelivery.endpoint_id)
        .where(is_due)
        .order_by(col(WebhookDelivery.next_attempt_at))
        .limit(limit)
    )
    with unit_of_work("webhooks.claim_due") as session:
        rows = session.execute(
            update(WebhookDelivery)
            .where(is_due, key.in_(due))
            .values(next_attempt_at=lease)
            .returning(col(WebhookDelivery.webhook_id), col(WebhookDelivery.endpoint_id)),
            execution_options={"synchronize_session": False},
        ).all()
    by_endpoint: dict[str, list[str]] = {}
    for webhook_id, endpoint_id in rows:
        by_endpoint.setdefault(endpoint_id, []).append(webhook_id)
    return by_endpoint


def body_of(delivery: WebhookDelivery) -> bytes:
    """What is signed and sent: the same bytes for every attempt of one delivery."""
    event = {
        "type": delivery.event_type,
        "timestamp": delivery.created_at.isoformat().replace("+00:00", "Z"),
        "data": delivery.data,
    }
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()


def signature(endpoint: WebhookEndpoint, webhook_id: str, timestamp: datetime, body: bytes) -> str:
    """``v1,<sig>``; during a rotation's overlap, space-separated with the previous secret's."""
    secrets = [endpoint.secret]
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret and expires is not None and timestamp < expires:
        secrets.append(endpoint.previous_secret)
    return " ".join(Webhook(s).sign(webhook_id, timestamp, body) for s in secrets)


def headers_for(endpoint: WebhookEndpoint, webhook_id: str, body: bytes) -> dict[str, str]:
    now = utcnow()
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature(endpoint, webhook_id, now, body),
    }


def deliver(endpoint_id: str, webhook_ids: list[str], settings: Settings) -> dict[str, str]:
    """One attempt of each of an endpoint's deliveries (a ``widgets.deliver_webhooks``
    message), sent concurrently and recorded in one transaction. Their statuses after it."""
    with read_session("webhooks.read_deliveries") as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        deliveries = session.exec(
            select(WebhookDelivery).where(
                col(WebhookDelivery.endpoint_id) == endpoint_id,
                col(WebhookDelivery.webhook_id).in_(webhook_ids),
                col(WebhookDelivery.status) == "pending",
            )
        ).all()
    if not deliveries:
        return {}
    if endpoint is None or not endpoint.enabled:
        why = f"endpoint disabled: {(endpoint and endpoint.disabled_reason) or 'by its owner'}"
        with unit_of_work("webhooks.record_attempts") as session:
            return {d.webhook_id: _finish(session, d, "failed", why) for d in deliveries}
    requests = []
    for delivery in deliveries:
        body = body_of(delivery)
        headers = headers_for(endpoint, delivery.webhook_id, body)
        requests.append(Request(endpoint.url, body, headers))
    answers = post_all(requests, settings)
    with unit_of_work("webhooks.record_attempts") as session:
        statuses = {
            d.webhook_id: _record(session, d, a, settings)
            for d, a in zip(deliveries, answers, strict=True)
        }
        if any(a.status_code == GONE for a in answers):
            disable(session, endpoint.id, "the receiver answered 410 Gone")
        return statuses


def _record(session: Session, delivery: WebhookDelivery, answer: Answer, settings: Settings) -> str:
    """The attempt in the log, and what follows from it, in the caller's transaction."""
    session.add(
        WebhookAttempt(
            webhook_id=delivery.webhook_id,
            endpoint_id=delivery.endpoint_id,
            status_code=answer.status_code,
            latency_ms=answer.latency_ms,
            error=answer.error,
        )
    )
    attempts = delivery.attempts + 1
    error = answer.error or (None if answer.ok else f"HTTP {answer.status_code}")
    if answer.ok:
        return _finish(session, delivery, "succeeded", None, answer.status_code, attempts)
    schedule = settings.webhook_retry_schedule_seconds
    if answer.status_code == GONE or attempts > len(schedule):
        return _finish(session, delivery, "failed", error, answer.status_code, attempts)
    wait = schedule[attempts - 1] * random.uniform(1 - JITTER, 1 + JITTER)
    _update(
        session,
        delivery,
        attempts=attempts,
        last_status_code=answer.status_code,
        last_error=error,
        next_attempt_at=utcnow() + timedelta(seconds=wait),
    )
    return "pending"


def _update(session: Session, delivery: WebhookDelivery, **values: Any) -> None:
    session.connection().execute(
        update(WebhookDelivery)
        .where(
            col(WebhookDelivery.webhook_id) == delivery.webhook_id,
            col(WebhookDelivery.endpoint_id) == delivery.endpoint_id,
            col(WebhookDelivery.status) == "pending",
        )
        .values(updated_at=utcnow(), **values)
    )


def _finish(
    session: Session,
    delivery: WebhookDelivery,
    status: str,
    error: str | None,
    status_code: int | None = None,
    attempts: int | None = None,
) -> str:
    _update(
        session,
        delivery,
        status=status,
        last_error=error,
        last_status_code=status_code,
        attempts=delivery.attempts if attempts is None else attempts,
        next_attempt_at=None,
    )
    return status


def disable(session: Session, endpoint_id: str, reason: str | None) -> None:
    """No new events for the endpoint (its subscriptions go); pending deliveries fail when
    their next attempt finds it disabled."""
    session.connection().execute(
        update(WebhookEndpoint)
        .where(col(WebhookEndpoint.id) == endpoint_id)
        .values(enabled=False, disabled_reason=reason, updated_at=utcnow())
    )
    session.connection().execute(
        delete(WebhookSubscription).where(col(WebhookSubscription.endpoint_id) == endpoint_id)
    )


def retry(session: Session, delivery: WebhookDelivery) -> None:
    """``POST .../retry``: pending again and due now (one more attempt, then the schedule's)."""
    session.connection().execute(
        update(WebhookDelivery)
        .where(
            col(WebhookDelivery.webhook_id) == delivery.webhook_id,
            col(WebhookDelivery.endpoint_id) == delivery.endpoint_id,
        )
        .values(status="pending", next_attempt_at=utcnow(), updated_at=utcnow())
    )
