"""Webhook endpoints of an organization, their subscriptions, and the outbox of deliveries."""

from __future__ import annotations

import base64
import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import Column, ForeignKey, Index, String
from sqlmodel import Field, SQLModel

from worker.ids import new_id
from worker.models.types import PortableJSON, UTCDateTime, utcnow

# Standard Webhooks: a secret is ``whsec_`` and the base64 of 24 to 64 random bytes.
SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
EVENT_TYPES = (
    "deployment.succeeded",
    "deployment.failed",
    "deployment.scheduled",
    "archive.completed",
    "bulk.completed",
)


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def new_webhook_id() -> str:
    """A message's ``webhook-id``: the same for every attempt and every endpoint of one event."""
    return "msg_" + new_id().replace("-", "")


class WebhookEndpoint(SQLModel, table=True):
    """Where an organization wants its events. ``secret`` signs every delivery; after a rotation
    the previous one signs too until ``previous_secret_expires_at`` (receivers switch over)."""

    __tablename__ = "webhook_endpoints"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    organization_id: str = Field(foreign_key="organizations.id", index=True, max_length=64)
    url: str = Field(max_length=2048)
    description: str | None = Field(default=None, max_length=500)
    event_types: list[str] = Field(default_factory=list, sa_type=PortableJSON)
    enabled: bool = True
    # Why the service disabled it (a receiver answering 410 Gone); None when enabled by hand.
    disabled_reason: str | None = Field(default=None, max_length=500)
    secret: str = Field(default_factory=new_secret, max_length=128)
    previous_secret: str | None = Field(default=None, max_length=128)
    previous_secret_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class WebhookSubscription(SQLModel, table=True):
    """One event type an enabled endpoint receives: the outbox finds the endpoints of an event
    with one indexed join (:mod:`worker.services.webhook_outbox`). Rewritten with the endpoint;
    an endpoint disabled (by hand or by a 410) has none."""

    __tablename__ = "webhook_subscriptions"
    __table_args__ = (Index("ix_webhook_subscriptions_org_type", "organization_id", "event_type"),)

    endpoint_id: str = Field(
        sa_column=Column(
            String(64), ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), primary_key=True
        )
    )
    event_type: str = Field(primary_key=True, max_length=64)
    organization_id: str = Field(max_length=64)


class WebhookDelivery(SQLModel, table=True):
    """One event for one endpoint (the outbox row): written in the transaction of the state
    change that caused it, then delivered by ``widgets.deliver_webhooks`` until it succeeds or
    its retry schedule ends (``failed``)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at"),
    )

    webhook_id: str = Field(primary_key=True, max_length=64)
    endpoint_id: str = Field(
        sa_column=Column(
            String(64), ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), primary_key=True
        )
    )
    organization_id: str = Field(max_length=64)
    event_type: str = Field(max_length=64)
    # The body's ``data``: the resource as it was when the event happened.
    data: dict[str, Any] = Field(default_factory=dict, sa_type=PortableJSON)
    status: str = Field(default="pending", max_length=16)  # pending | succeeded | failed
    attempts: int = 0
    next_attempt_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, max_length=500)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class WebhookAttempt(SQLModel, table=True):
    """One HTTP attempt of a delivery: the delivery log."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_delivery", "endpoint_id", "webhook_id"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    webhook_id: str = Field(max_length=64)
    endpoint_id: str = Field(
        sa_column=Column(
            String(64), ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=False
        )
    )
    attempted_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    status_code: int | None = None
    latency_ms: int = 0
    error: str | None = Field(default=None, max_length=500)
