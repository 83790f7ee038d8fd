"""Who is asking, for the audit fields (``created_by``): the caller's API key id."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header

from api_stub.auth import read_token
from api_stub.deps import OrgDep, SettingsDep


def actor_dep(
    _org: OrgDep, settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> str:
    """The API key id (``sub``) of the bearer token, read once the organization dependency has
    validated that token."""
    token = (authorization or "").partition(" ")[2].strip()
    claims = read_token(token, settings.signing_key) or {}
    return str(claims.get("sub") or "unknown")


ActorDep = Annotated[str, Depends(actor_dep)]
