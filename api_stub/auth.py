"""Didomi's session flow: an API key/secret pair is exchanged for a signed, short-lived token."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta
from typing import Any

import jwt

from worker.models import utcnow

TOKEN_LIFETIME = timedelta(hours=1)
TOKEN_ALGORITHM = "HS256"  # noqa: S105 - an algorithm name, not a secret


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    # The secret is 256 random bits, so a fast hash is enough (no dictionary to attack).
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def issue_token(organization_id: str, key_id: str, signing_key: str) -> str:
    now = utcnow()
    claims = {"sub": key_id, "org": organization_id, "iat": now, "exp": now + TOKEN_LIFETIME}
    return jwt.encode(claims, signing_key, algorithm=TOKEN_ALGORITHM)


def read_token(token: str, signing_key: str) -> dict[str, Any] | None:
    """The token's claims, or None if it is forged, malformed or expired."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            signing_key,
            algorithms=[TOKEN_ALGORITHM],
            options={"require": ["exp", "org", "sub"]},
        )
    except jwt.InvalidTokenError:
        return None
    return claims
