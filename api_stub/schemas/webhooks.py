"""Webhook endpoints, their deliveries and attempts (the delivery log)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from api_stub.schemas.common import NOT_NULL, InputModel, JsonObject, OutputModel, Timestamp
from worker.webhook_http import MAX_URL_LENGTH

EventType = Literal[
    "deployment.succeeded",
    "deployment.failed",
    "deployment.scheduled",
    "archive.completed",
    "bulk.completed",
]
Url = Annotated[str, StringConstraints(min_length=1, max_length=MAX_URL_LENGTH)]
Description = Annotated[str, StringConstraints(max_length=500)]
EventTypes = Annotated[list[EventType], Field(min_length=1, max_length=16)]


class WebhookEndpointCreate(InputModel):
    """``url``: https on a public address (unless ``WEBHOOK_ALLOW_PRIVATE_NETWORKS``)."""

    url: Url
    event_types: EventTypes
    enabled: bool = True
    description: Description | None = None


class WebhookEndpointUpdate(InputModel):
    """Omitted fields are left as they are; none may be null. Enabling an endpoint the service
    disabled (a 410) clears ``disabled_reason``."""

    url: Annotated[Url | None, NOT_NULL] = None
    event_types: Annotated[EventTypes | None, NOT_NULL] = None
    enabled: Annotated[bool | None, NOT_NULL] = None
    description: Description | None = None


class WebhookEndpointPublic(OutputModel):
    id: str
    organization_id: str
    url: str
    event_types: list[str]
    enabled: bool
    # Why the service disabled it (the receiver answered 410 Gone); null otherwise.
    disabled_reason: str | None
    description: str | None
    # When the previous secret stops signing (after a rotation); null when there is none.
    previous_secret_expires_at: Timestamp | None
    created_at: Timestamp
    updated_at: Timestamp


class WebhookEndpointWithSecret(WebhookEndpointPublic):
    """The answer of a create or a rotation: the only time the secret is shown."""

    secret: str


class WebhookAttemptPublic(OutputModel):
    attempted_at: Timestamp
    # null: no HTTP answer (refused, timed out, an address that may not be reached)
    status_code: int | None
    latency_ms: int
    error: str | None


class WebhookDeliveryPublic(OutputModel):
    # The message's webhook-id: the same on every attempt (the receiver's idempotency key).
    id: str
    endpoint_id: str
    event_type: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    next_attempt_at: Timestamp | None
    last_status_code: int | None
    last_error: str | None
    data: JsonObject
    attempt_log: list[WebhookAttemptPublic]
    created_at: Timestamp
    updated_at: Timestamp
