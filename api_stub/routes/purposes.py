"""``/metadata/purposes``: create, list, get, patch, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response, status
from sqlmodel import Session, select

from api_stub.actor import ActorDep
from api_stub.deps import OrgDep, SessionDep, check_body_org, get_owned
from api_stub.query import ListQuery, fetch_page, list_query
from api_stub.routes.bulk import RedeployQuery, after_catalog_edit
from api_stub.schemas.catalog import PurposeCreate, PurposePublic, PurposeUpdate
from api_stub.schemas.catalog_edits import PurposeEdited
from api_stub.schemas.common import Page
from worker.models import Organization, Purpose, utcnow

router = APIRouter(prefix="/metadata/purposes", tags=["purposes"])


def _get(session: Session, org: Organization, purpose_id: str) -> Purpose:
    return get_owned(session, Purpose, org, purpose_id, "purpose")


@router.post("", status_code=status.HTTP_201_CREATED)
def create_purpose(body: PurposeCreate, org: OrgDep, session: SessionDep) -> PurposePublic:
    check_body_org(body.organization_id, org)
    purpose = Purpose(organization_id=org.id, description=body.description, metadata_=body.metadata)
    session.add(purpose)
    session.commit()
    return PurposePublic.model_validate(purpose)


@router.get("")
def list_purposes(
    org: OrgDep, session: SessionDep, query: Annotated[ListQuery, Depends(list_query())]
) -> Page[PurposePublic]:
    stmt = select(Purpose).where(Purpose.organization_id == org.id)
    return fetch_page(
        session, stmt, Purpose, query, lambda rows: [PurposePublic.model_validate(p) for p in rows]
    )


@router.get("/{purpose_id}")
def get_purpose(purpose_id: str, org: OrgDep, session: SessionDep) -> PurposePublic:
    return PurposePublic.model_validate(_get(session, org, purpose_id))


@router.patch("/{purpose_id}")
def update_purpose(
    purpose_id: str,
    body: PurposeUpdate,
    org: OrgDep,
    actor: ActorDep,
    session: SessionDep,
    response: Response,
    redeploy: RedeployQuery = False,
) -> PurposeEdited:
    """Widgets whose live snapshot embeds the purpose get unpublished changes (same
    transaction); ``?redeploy=true`` also republishes them."""
    purpose = _get(session, org, purpose_id)
    if body.description is not None:
        purpose.description = body.description
    if body.metadata is not None:
        purpose.metadata_ = body.metadata
    purpose.updated_at = utcnow()
    session.add(purpose)
    public = PurposePublic.model_validate(purpose)
    affected, job = after_catalog_edit(
        session, org, {"purpose_id": purpose.id}, redeploy, actor, response
    )
    return PurposeEdited(
        **public.model_dump(), affected_widgets=affected, redeploy_bulk_id=job.id if job else None
    )


@router.delete("/{purpose_id}")
def delete_purpose(
    purpose_id: str,
    org: OrgDep,
    actor: ActorDep,
    session: SessionDep,
    response: Response,
    redeploy: RedeployQuery = False,
) -> PurposeEdited:
    """Widgets whose live snapshot embeds it get unpublished changes (their next snapshot
    omits it); ``?redeploy=true`` republishes them without it."""
    purpose = _get(session, org, purpose_id)
    removed = PurposePublic.model_validate(purpose)
    session.delete(purpose)
    affected, job = after_catalog_edit(
        session, org, {"purpose_id": purpose_id}, redeploy, actor, response
    )
    return PurposeEdited(
        **removed.model_dump(), affected_widgets=affected, redeploy_bulk_id=job.id if job else None
    )
