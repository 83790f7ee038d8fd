"""FastAPI dependencies: settings, DB session, the authenticated organization, the admin."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated, Protocol, TypeVar

from fastapi import Depends, Header, Query, Request
from sqlmodel import Session

from api_stub.auth import read_token
from api_stub.errors import ApiError, bad_request, not_found
from worker.db import get_engine, read_only_engine
from worker.ids import is_safe_id
from worker.models import Organization
from worker.settings import Settings, get_settings


def settings_dep() -> Settings:
    return get_settings()


def session_dep(request: Request) -> Iterator[Session]:
    """One session per request; routes commit once, at the end of their unit of work.

    GET requests only read, so on SQLite they do not queue for the database write lock.
    """
    engine = read_only_engine() if request.method in ("GET", "HEAD") else get_engine()
    with Session(engine, expire_on_commit=False) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(settings_dep)]
SessionDep = Annotated[Session, Depends(session_dep)]


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise ApiError(401, "Authentication required: send 'Authorization: Bearer <token>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "Authorization must be 'Bearer <token>'")
    return token.strip()


def require_safe_path_id(value: str, name: str = "id") -> str:
    if not is_safe_id(value):
        raise bad_request(f"{name} is not a valid id", {name: "invalid id"})
    return value


def organization_dep(
    session: SessionDep,
    settings: SettingsDep,
    organization_id: Annotated[str | None, Query()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> Organization:
    """The organization named by ``?organization_id=``, which the bearer token must be for."""
    if organization_id is None:
        raise bad_request(
            "organization_id query parameter is required", {"organization_id": "required"}
        )
    require_safe_path_id(organization_id, "organization_id")
    claims = read_token(_bearer(authorization), settings.signing_key)
    if claims is None:
        raise ApiError(401, "Invalid or expired access token")
    if claims.get("org") != organization_id:
        raise ApiError(403, "The access token is not valid for this organization")
    org = session.get(Organization, organization_id)
    if org is None:
        raise ApiError(404, f"No organization found for id '{organization_id}'")
    return org


def admin_dep(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    token = _bearer(authorization)
    if hmac.compare_digest(token.encode(), settings.admin_bearer.encode()):
        return
    if read_token(token, settings.signing_key) is not None:
        raise ApiError(403, "An organization token cannot use admin routes")
    raise ApiError(401, "Invalid admin token")


OrgDep = Annotated[Organization, Depends(organization_dep)]
AdminDep = Annotated[None, Depends(admin_dep)]


class _Owned(Protocol):
    organization_id: str


OwnedT = TypeVar("OwnedT", bound=_Owned)


def get_owned(
    session: Session, model: type[OwnedT], org: Organization, ident: str, what: str
) -> OwnedT:
    """Row ``ident`` of ``model`` if it belongs to ``org``; another tenant's row is a 404 too."""
    require_safe_path_id(ident)
    row = session.get(model, ident)
    if row is None or row.organization_id != org.id:
        raise not_found(what, ident)
    return row


def check_body_org(body_org: str | None, org: Organization) -> None:
    if body_org is not None and body_org != org.id:
        raise bad_request(
            "organization_id in the body does not match the query",
            {"organization_id": "does not match ?organization_id="},
        )
