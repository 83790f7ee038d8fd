"""Who is asking, for the audit fields (``created_by``): the caller's API key id."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api_stub.auth import read_token
from api_stub.deps import OrgDep, SettingsDep


def actor_dep(_org: OrgDep, settings: SettingsDep, request: Request) -> str:
    """The API key id (``sub``) of the bearer token, read once the organization dependency has
    validated that token."""
    token = (request.headers.get("authorization") or "").partition(" ")[2].strip()
    claims = read_token(token, settings.signing_key) or {}
    return str(claims.get("sub") or "unknown")


ActorDep = Annotated[str, Depends(actor_dep)]
