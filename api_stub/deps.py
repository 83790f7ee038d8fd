"""FastAPI dependencies: settings, DB session, the authenticated organization, the admin."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Protocol, TypeVar

import anyio
from fastapi import Depends, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, col, select

from api_stub.admission import admitted
from api_stub.auth import read_token
from api_stub.errors import ABANDONED_STATE, ApiError, DatabaseBusy, bad_request, not_found
from api_stub.schemas.common import SAFE_ID_PATTERN
from worker.db import api_engine, database_unavailable
from worker.ids import MAX_ID_LENGTH, is_safe_id
from worker.models import ApiKey, Organization
from worker.settings import Settings, get_settings


def settings_dep() -> Settings:
    return get_settings()


log = logging.getLogger(__name__)


def _close(session: Session) -> None:
    """Close (roll back what was not committed). A connection that died meanwhile changes
    nothing for the request: its transaction is gone with it, and the pool drops it."""
    try:
        session.close()
    except DBAPIError as exc:
        found = database_unavailable(exc)
        if found is None:
            raise
        log.warning("closing a session: %s", found.reason)


async def session_dep(request: Request) -> AsyncIterator[Session]:
    """One session per request; routes commit once, at the end of their unit of work.

    The session is admitted first (``api_stub.admission``: waited for in the event loop, 503
    past ``ADMISSION_TIMEOUT``), and closed when the route returns, before the response is sent
    (``scope="function"`` below), so an error while closing is still answered (503), never
    raised after the response started (which would make the server drop the connection). It
    commits nothing once the edge has answered the request 503 at its deadline.
    GET requests only read, so on SQLite they do not queue for the database write lock.
    """
    write = request.method not in ("GET", "HEAD")
    state = request.scope.setdefault("state", {})
    async with admitted(write=write):
        session = Session(api_engine(read_only=not write), expire_on_commit=False)

        @event.listens_for(session, "before_commit")
        def _not_after_the_deadline(_: Session) -> None:
            # The edge answered 503 at the request's deadline (api_stub.edge): commit nothing
            # (the client was told so, and retries).
            if state.get(ABANDONED_STATE):
                raise DatabaseBusy("answered 503 at the request's deadline: not committed")

        try:
            yield session
        finally:
            # In a thread (a rollback is I/O), outside the request threads' limit, as FastAPI
            # does for sync dependencies' exits: it must not wait for a busy thread pool.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_close, session, limiter=anyio.CapacityLimiter(1))


SettingsDep = Annotated[Settings, Depends(settings_dep)]
SessionDep = Annotated[Session, Depends(session_dep, scope="function")]


# Documentation of the two bearer schemes (OpenAPI ``securitySchemes``); the checks themselves
# are the functions below, run first by ``api_stub.edge`` (before any body is read) and again
# here.
ORG_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="OrganizationToken",
    bearerFormat="JWT",
    description="The access_token of POST /sessions, valid for the organization named by "
    "?organization_id= (1 hour)",
)
ADMIN_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description="The ADMIN_TOKEN of the deployment",
)
# Set by api_stub.edge once it has checked that the token's API key still exists.
KEY_CHECKED_STATE = "api_key_checked"
# ... and the organization it read with it (the token's, which is ?organization_id=).
ORGANIZATION_STATE = "organization"
ORGANIZATION_ID_QUERY = Query(
    pattern=SAFE_ID_PATTERN,
    max_length=MAX_ID_LENGTH,
    description="The organization the request is for; the access token must be for it",
)


def bearer_token(authorization: str | None) -> str:
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


def check_org_token(
    authorization: str | None, organization_id: str | None, settings: Settings
) -> dict[str, Any]:
    """The token's claims (401 if missing, forged or expired; 403 if for another organization).

    No database access: the key's existence is :func:`check_key_active`.
    """
    claims = read_token(bearer_token(authorization), settings.signing_key)
    if claims is None or not is_safe_id(claims.get("org")) or not is_safe_id(claims.get("sub")):
        raise ApiError(401, "Invalid or expired access token")
    if organization_id is not None and claims["org"] != organization_id:
        raise ApiError(403, "The access token is not valid for this organization")
    return claims


def check_key_active(session: Session, claims: dict[str, Any]) -> Organization:
    """The token's organization, read by the statement that checks that the API key which
    issued the token still exists (401 if not: revocation is immediate). A key cannot outlive
    its organization, so no organization means no key."""
    stmt = (
        select(Organization, ApiKey.id)
        .outerjoin(
            ApiKey,
            (col(ApiKey.id) == claims["sub"]) & (col(ApiKey.organization_id) == Organization.id),
        )
        .where(Organization.id == claims["org"])
    )
    row = session.exec(stmt).first()
    if row is None or row[1] is None:
        raise ApiError(401, "The access token's API key was revoked")
    return row[0]


def check_admin(authorization: str | None, settings: Settings) -> None:
    token = bearer_token(authorization)
    if hmac.compare_digest(token.encode(), settings.admin_bearer.encode()):
        return
    if read_token(token, settings.signing_key) is not None:
        raise ApiError(403, "An organization token cannot use admin routes")
    raise ApiError(401, "Invalid admin token")


def organization_dep(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    organization_id: Annotated[str, ORGANIZATION_ID_QUERY],
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(ORG_BEARER)],
) -> Organization:
    """The organization named by ``?organization_id=``, which the bearer token must be for."""
    require_safe_path_id(organization_id, "organization_id")
    claims = check_org_token(request.headers.get("authorization"), organization_id, settings)
    state = request.scope.get("state", {})
    org = state.get(ORGANIZATION_STATE)
    if state.get(KEY_CHECKED_STATE) == claims["sub"] and isinstance(org, Organization):
        return org  # read by the edge's key check, for this request
    return check_key_active(session, claims)  # the token's org is organization_id (checked)


def admin_dep(
    request: Request,
    settings: SettingsDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(ADMIN_BEARER)],
) -> None:
    check_admin(request.headers.get("authorization"), settings)


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
