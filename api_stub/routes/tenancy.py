"""Admin routes (organizations, API keys) and ``POST /sessions``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, status
from sqlmodel import select

from api_stub.auth import hash_secret, issue_token, new_secret, secret_matches
from api_stub.deps import AdminDep, SessionDep, SettingsDep, require_safe_path_id
from api_stub.errors import ApiError, not_found
from api_stub.query import ListQuery, fetch_page, list_query
from api_stub.schemas.common import Page
from api_stub.schemas.widgets import (
    ApiKeyPublic,
    ApiKeyRevoked,
    OrganizationCreate,
    OrganizationPublic,
    SessionCreate,
    SessionPublic,
)
from worker.ids import is_safe_id
from worker.models import ApiKey, Organization

router = APIRouter()


@router.post("/organizations", status_code=status.HTTP_201_CREATED, tags=["admin"])
def create_organization(
    body: OrganizationCreate, session: SessionDep, _: AdminDep
) -> OrganizationPublic:
    org = Organization(name=body.name)
    session.add(org)
    session.commit()
    return OrganizationPublic.model_validate(org)


@router.get("/organizations", tags=["admin"])
def list_organizations(
    session: SessionDep, _: AdminDep, query: Annotated[ListQuery, Depends(list_query())]
) -> Page[OrganizationPublic]:
    stmt = select(Organization)
    return fetch_page(
        session,
        stmt,
        Organization,
        query,
        lambda rows: [OrganizationPublic.model_validate(o) for o in rows],
    )


@router.get("/organizations/{organization_id}", tags=["admin"])
def get_organization(organization_id: str, session: SessionDep, _: AdminDep) -> OrganizationPublic:
    org = session.get(Organization, require_safe_path_id(organization_id))
    if org is None:
        raise not_found("organization", organization_id)
    return OrganizationPublic.model_validate(org)


@router.post(
    "/organizations/{organization_id}/api-keys",
    status_code=status.HTTP_201_CREATED,
    tags=["admin"],
)
def create_api_key(organization_id: str, session: SessionDep, _: AdminDep) -> ApiKeyPublic:
    """A new key/secret pair. The secret is shown here once and stored only as a hash."""
    org = session.get(Organization, require_safe_path_id(organization_id))
    if org is None:
        raise not_found("organization", organization_id)
    secret = new_secret()
    key = ApiKey(organization_id=org.id, secret_hash=hash_secret(secret))
    session.add(key)
    session.commit()
    return ApiKeyPublic(
        key=key.id, secret=secret, organization_id=org.id, created_at=key.created_at
    )


@router.delete("/organizations/{organization_id}/api-keys/{key}", tags=["admin"])
def revoke_api_key(
    organization_id: str, key: str, session: SessionDep, _: AdminDep
) -> ApiKeyRevoked:
    """Delete the key: no new session, and its access tokens stop working at once (every
    request checks that the token's key still exists)."""
    require_safe_path_id(organization_id, "organization_id")
    row = session.get(ApiKey, require_safe_path_id(key, "key"))
    if row is None or row.organization_id != organization_id:
        raise not_found("API key", key)
    revoked = ApiKeyRevoked(
        key=row.id, organization_id=row.organization_id, created_at=row.created_at
    )
    session.delete(row)
    session.commit()
    return revoked


@router.post("/sessions", status_code=status.HTTP_201_CREATED, tags=["auth"])
def create_session(
    body: SessionCreate, session: SessionDep, settings: SettingsDep
) -> SessionPublic:
    key = session.get(ApiKey, body.key) if is_safe_id(body.key) else None
    if key is None or not secret_matches(body.secret, key.secret_hash):
        raise ApiError(401, "Invalid API key or secret")
    return SessionPublic(
        access_token=issue_token(key.organization_id, key.id, settings.signing_key)
    )
