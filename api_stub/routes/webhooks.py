"""``/webhooks``: an organization's endpoints (create, list, get, patch, delete, rotate the
secret), their deliveries (the log, with every attempt) and a manual retry."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status
from sqlalchemy import delete
from sqlmodel import Session, col, select

from api_stub.deps import OrgDep, SessionDep, get_owned
from api_stub.errors import ApiError, bad_request, not_found
from api_stub.schemas.webhooks import (
    WebhookAttemptPublic,
    WebhookDeliveryPublic,
    WebhookEndpointCreate,
    WebhookEndpointPublic,
    WebhookEndpointUpdate,
    WebhookEndpointWithSecret,
)
from worker.models import Organization, utcnow
from worker.models.webhooks import (
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookSubscription,
    new_secret,
)
from worker.services import webhook_delivery
from worker.settings import get_settings
from worker.webhook_http import UnsafeUrlError, check_url

router = APIRouter(prefix="/webhooks", tags=["webhooks"])
EndpointIdPath = Annotated[str, Path(description="The endpoint's `id`")]


def _get(session: Session, org: Organization, endpoint_id: str) -> WebhookEndpoint:
    return get_owned(session, WebhookEndpoint, org, endpoint_id, "webhook endpoint")


def _checked_url(url: str) -> str:
    try:
        check_url(url, get_settings().webhooks_may_reach_private_networks)
    except UnsafeUrlError as exc:
        raise bad_request(f"url: {exc}", {"url": str(exc)}) from None
    return url


def _subscribe(session: Session, endpoint: WebhookEndpoint) -> None:
    """The endpoint's subscription rows, rewritten: one per event type while it is enabled."""
    session.execute(
        delete(WebhookSubscription).where(col(WebhookSubscription.endpoint_id) == endpoint.id)
    )
    if endpoint.enabled:
        for event_type in sorted(set(endpoint.event_types)):
            session.add(
                WebhookSubscription(
                    endpoint_id=endpoint.id,
                    event_type=event_type,
                    organization_id=endpoint.organization_id,
                )
            )


def _with_secret(endpoint: WebhookEndpoint) -> WebhookEndpointWithSecret:
    public = WebhookEndpointPublic.model_validate(endpoint)
    return WebhookEndpointWithSecret(**public.model_dump(), secret=endpoint.secret)


@router.post("", status_code=status.HTTP_201_CREATED)
def create_endpoint(
    body: WebhookEndpointCreate, org: OrgDep, session: SessionDep
) -> WebhookEndpointWithSecret:
    """Register an endpoint. Its signing secret (``whsec_…``) is in this answer only."""
    endpoint = WebhookEndpoint(
        organization_id=org.id,
        url=_checked_url(body.url),
        event_types=sorted(set(body.event_types)),
        enabled=body.enabled,
        description=body.description,
    )
    session.add(endpoint)
    session.flush()
    _subscribe(session, endpoint)
    session.commit()
    return _with_secret(endpoint)


@router.get("")
def list_endpoints(org: OrgDep, session: SessionDep) -> list[WebhookEndpointPublic]:
    rows = session.exec(
        select(WebhookEndpoint)
        .where(WebhookEndpoint.organization_id == org.id)
        .order_by(col(WebhookEndpoint.created_at), col(WebhookEndpoint.id))
    ).all()
    return [WebhookEndpointPublic.model_validate(e) for e in rows]


@router.get("/{endpoint_id}")
def get_endpoint(
    endpoint_id: EndpointIdPath, org: OrgDep, session: SessionDep
) -> WebhookEndpointPublic:
    return WebhookEndpointPublic.model_validate(_get(session, org, endpoint_id))


@router.patch("/{endpoint_id}")
def update_endpoint(
    endpoint_id: EndpointIdPath, body: WebhookEndpointUpdate, org: OrgDep, session: SessionDep
) -> WebhookEndpointPublic:
    endpoint = _get(session, org, endpoint_id)
    if body.url is not None:
        endpoint.url = _checked_url(body.url)
    if body.event_types is not None:
        endpoint.event_types = sorted(set(body.event_types))
    if body.enabled is not None:
        endpoint.enabled = body.enabled
        if body.enabled:
            endpoint.disabled_reason = None
    if "description" in body.model_fields_set:
        endpoint.description = body.description
    endpoint.updated_at = utcnow()
    session.add(endpoint)
    _subscribe(session, endpoint)
    session.commit()
    return WebhookEndpointPublic.model_validate(endpoint)


@router.delete("/{endpoint_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_endpoint(endpoint_id: EndpointIdPath, org: OrgDep, session: SessionDep) -> Response:
    """The endpoint, its subscriptions, deliveries and their log: nothing more is sent to it."""
    endpoint = _get(session, org, endpoint_id)
    for model in (WebhookSubscription, WebhookAttempt, WebhookDelivery):
        session.execute(delete(model).where(col(model.endpoint_id) == endpoint.id))
    session.delete(endpoint)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{endpoint_id}/rotate-secret")
def rotate_secret(
    endpoint_id: EndpointIdPath, org: OrgDep, session: SessionDep
) -> WebhookEndpointWithSecret:
    """A new secret, shown once. The previous one still signs every delivery (a second
    signature) for ``WEBHOOK_SECRET_OVERLAP_SECONDS`` (24 h), so receivers can switch over."""
    endpoint = _get(session, org, endpoint_id)
    overlap = timedelta(seconds=get_settings().webhook_secret_overlap_seconds)
    now = utcnow()
    endpoint.previous_secret, endpoint.previous_secret_expires_at = endpoint.secret, now + overlap
    endpoint.secret, endpoint.updated_at = new_secret(), now
    session.add(endpoint)
    session.commit()
    return _with_secret(endpoint)


def _public(delivery: WebhookDelivery, attempts: list[WebhookAttempt]) -> WebhookDeliveryPublic:
    return WebhookDeliveryPublic(
        id=delivery.webhook_id,
        endpoint_id=delivery.endpoint_id,
        event_type=delivery.event_type,
        status=delivery.status,
        attempts=delivery.attempts,
        next_attempt_at=delivery.next_attempt_at,
        last_status_code=delivery.last_status_code,
        last_error=delivery.last_error,
        data=delivery.data,
        attempt_log=[WebhookAttemptPublic.model_validate(a) for a in attempts],
        created_at=delivery.created_at,
        updated_at=delivery.updated_at,
    )


def _attempts(
    session: Session, endpoint_id: str, webhook_ids: list[str]
) -> dict[str, list[WebhookAttempt]]:
    by_delivery: dict[str, list[WebhookAttempt]] = {w: [] for w in webhook_ids}
    if webhook_ids:
        rows = session.exec(
            select(WebhookAttempt)
            .where(
                col(WebhookAttempt.endpoint_id) == endpoint_id,
                col(WebhookAttempt.webhook_id).in_(webhook_ids),
            )
            .order_by(col(WebhookAttempt.attempted_at))
        ).all()
        for attempt in rows:
            by_delivery[attempt.webhook_id].append(attempt)
    return by_delivery


@router.get("/{endpoint_id}/deliveries")
def list_deliveries(
    endpoint_id: EndpointIdPath,
    org: OrgDep,
    session: SessionDep,
    limit: Annotated[int, Query(alias="$limit", ge=1, le=1000)] = 100,
    skip: Annotated[int, Query(alias="$skip", ge=0)] = 0,
) -> list[WebhookDeliveryPublic]:
    """Newest first: each delivery's status, attempts (status code, latency, error) and next
    attempt."""
    endpoint = _get(session, org, endpoint_id)
    rows = session.exec(
        select(WebhookDelivery)
        .where(col(WebhookDelivery.endpoint_id) == endpoint.id)
        .order_by(col(WebhookDelivery.created_at).desc(), col(WebhookDelivery.webhook_id))
        .offset(skip)
        .limit(limit)
    ).all()
    attempts = _attempts(session, endpoint.id, [d.webhook_id for d in rows])
    return [_public(d, attempts[d.webhook_id]) for d in rows]


@router.post(
    "/{endpoint_id}/deliveries/{delivery_id}/retry",
    status_code=status.HTTP_202_ACCEPTED,
    responses={409: {"description": "The endpoint is disabled"}},
)
def retry_delivery(
    endpoint_id: EndpointIdPath,
    delivery_id: Annotated[str, Path(description="The delivery's `id` (its webhook-id)")],
    org: OrgDep,
    session: SessionDep,
) -> WebhookDeliveryPublic:
    """Attempt the delivery again now (a failed one too), with the same ``webhook-id``."""
    endpoint = _get(session, org, endpoint_id)
    delivery = session.get(WebhookDelivery, (delivery_id, endpoint.id))
    if delivery is None:
        raise not_found("webhook delivery", delivery_id)
    if not endpoint.enabled:
        raise ApiError(409, f"webhook endpoint {endpoint.id} is disabled: enable it first")
    webhook_delivery.retry(session, delivery)
    session.commit()
    session.refresh(delivery)
    return _public(delivery, _attempts(session, endpoint.id, [delivery.webhook_id])[delivery_id])
