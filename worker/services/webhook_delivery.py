"""Delivering webhook events: at least once, signed per Standard Webhooks, never blocking a deploy.

A delivery row (:mod:`worker.services.webhook_outbox`) is ``pending`` with a ``next_attempt_at``.
Beat's tick (``widgets.dispatch_webhooks``) **claims** the due ones, one conditional ``UPDATE``
that pushes their ``next_attempt_at`` a lease ahead (:data:`LEASE_SECONDS`, longer than an
attempt can take), and sends a ``widgets.deliver_webhook`` message for each after the commit.
The task makes one attempt, with no transaction open during the request, then records it in
one transaction: ``succeeded`` on a 2xx; on a 410 ``failed`` and the endpoint disabled; else
the next attempt after the schedule's wait (±20 % jitter), or ``failed`` when the schedule is
spent. A message lost, or a worker killed mid-attempt, only delays the delivery: the lease runs
out and the tick claims it again. A receiver may therefore see an event twice, always with the
same ``webhook-id`` (its idempotency key), never a different one.

The body is ``{"type", "timestamp", "data"}``; the headers ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of
id.timestamp.body>``, signed with the ``standardwebhooks`` library), with a second signature by
the previous secret while a rotation's overlap lasts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, update
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
from worker.webhook_http import Answer, post

# A claimed delivery is not claimed again for this long: more than an attempt can take.
LEASE_SECONDS = 60.0
DUE_BATCH = 200
JITTER = 0.2
GONE = 410

Key = tuple[str, str]  # webhook_id, endpoint_id


def claim_due(now: datetime, limit: int = DUE_BATCH) -> list[Key]:
    """The deliveries due at ``now``, leased to this tick: the caller sends them after commit."""
    lease = now + timedelta(seconds=LEASE_SECONDS)
    with unit_of_work("webhooks.claim_due") as session:
        due = session.exec(
            select(WebhookDelivery.webhook_id, WebhookDelivery.endpoint_id)
            .where(
                col(WebhookDelivery.status) == "pending",
                col(WebhookDelivery.next_attempt_at) <= now,
            )
            .order_by(col(WebhookDelivery.next_attempt_at))
            .limit(limit)
        ).all()
        claimed: list[Key] = []
        for webhook_id, endpoint_id in due:
            result = session.connection().execute(
                update(WebhookDelivery)
                .where(
                    col(WebhookDelivery.webhook_id) == webhook_id,
                    col(WebhookDelivery.endpoint_id) == endpoint_id,
                    col(WebhookDelivery.status) == "pending",
                    col(WebhookDelivery.next_attempt_at) <= now,
                )
                .values(next_attempt_at=lease)
            )
            if result.rowcount:
                claimed.append((webhook_id, endpoint_id))
        return claimed


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


@dataclass(frozen=True)
class Attempted:
    status: str  # the delivery's status after the attempt
    answer: Answer | None  # None: nothing was sent (not pending any more, endpoint gone)


def deliver(webhook_id: str, endpoint_id: str, settings: Settings) -> Attempted:
    """One attempt of one delivery (a ``widgets.deliver_webhook`` message)."""
    with read_session("webhooks.read_delivery") as session:
        delivery = session.get(WebhookDelivery, (webhook_id, endpoint_id))
        endpoint = session.get(WebhookEndpoint, endpoint_id)
    if delivery is None or delivery.status != "pending":
        return Attempted(delivery.status if delivery else "gone", None)
    if endpoint is None or not endpoint.enabled:
        why = endpoint.disabled_reason if endpoint else None
        with unit_of_work("webhooks.record_attempt") as session:
            _finish(session, delivery, "failed", f"endpoint disabled: {why or 'by its owner'}")
        return Attempted("failed", None)
    body = body_of(delivery)
    answer = post(endpoint.url, body, headers_for(endpoint, webhook_id, body), settings)
    with unit_of_work("webhooks.record_attempt") as session:
        return Attempted(_record(session, delivery, endpoint, answer, settings), answer)


def _record(
    session: Session,
    delivery: WebhookDelivery,
    endpoint: WebhookEndpoint,
    answer: Answer,
    settings: Settings,
) -> str:
    """The attempt in the log, and what follows from it: one transaction."""
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
    if answer.status_code == GONE:
        disable(session, endpoint.id, "the receiver answered 410 Gone")
        return _finish(session, delivery, "failed", error, answer.status_code, attempts)
    schedule = settings.webhook_retry_schedule_seconds
    if attempts > len(schedule):
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
