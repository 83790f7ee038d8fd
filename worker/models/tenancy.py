"""Organizations (tenants) and their API keys."""

from __future__ import annotations

import secrets
from datetime import datetime

from sqlmodel import Field, SQLModel

from worker.ids import new_id
from worker.models.types import UTCDateTime, utcnow


def new_public_api_key() -> str:
    """The public SDK key that names an organization's folder on S3 (a safe identifier)."""
    return secrets.token_hex(16)


class Organization(SQLModel, table=True):
    __tablename__ = "organizations"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    name: str = Field(max_length=255)
    api_key: str = Field(default_factory=new_public_api_key, unique=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ApiKey(SQLModel, table=True):
    """A key/secret pair exchanged at ``POST /sessions`` for a token; only a hash is kept."""

    __tablename__ = "api_keys"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    organization_id: str = Field(foreign_key="organizations.id", index=True, max_length=64)
    secret_hash: str = Field(max_length=128)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
