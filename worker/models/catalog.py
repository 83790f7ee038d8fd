"""Purposes, preferences and preference values: what a widget selects and a deployment snapshots."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Column, ForeignKey, String
from sqlmodel import Field, SQLModel

from worker.ids import new_id
from worker.models.types import PortableJSON, UTCDateTime, utcnow


def _metadata_column() -> Any:
    # "metadata" is reserved on SQLAlchemy models, so the attribute is metadata_.
    return Field(default_factory=dict, sa_column=Column("metadata", PortableJSON, nullable=False))


class Purpose(SQLModel, table=True):
    __tablename__ = "purposes"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    organization_id: str = Field(foreign_key="organizations.id", index=True, max_length=64)
    description: dict[str, str] = Field(default_factory=dict, sa_type=PortableJSON)
    metadata_: dict[str, Any] = _metadata_column()
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Preference(SQLModel, table=True):
    __tablename__ = "preferences"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    organization_id: str = Field(foreign_key="organizations.id", index=True, max_length=64)
    name: dict[str, str] = Field(default_factory=dict, sa_type=PortableJSON)
    description: dict[str, str] = Field(default_factory=dict, sa_type=PortableJSON)
    type: str = Field(default="single", max_length=16)
    metadata_: dict[str, Any] = _metadata_column()
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class PreferenceValue(SQLModel, table=True):
    __tablename__ = "preference_values"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    preference_id: str = Field(
        sa_column=Column(
            String(64), ForeignKey("preferences.id", ondelete="CASCADE"), index=True, nullable=False
        )
    )
    name: dict[str, str] = Field(default_factory=dict, sa_type=PortableJSON)
    metadata_: dict[str, Any] = _metadata_column()
    order: int = 0
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
