"""Purposes and preferences (with their values)."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field

from api_stub.schemas.common import (
    InputModel,
    JsonObject,
    LanguageMap,
    OrgScopedInput,
    OutputModel,
    SafeId,
    Timestamp,
)

PreferenceType = Literal["single", "multi"]
# Tables keep it as ``metadata_`` (``metadata`` is reserved by SQLAlchemy); the API says metadata.
_METADATA = AliasChoices("metadata_", "metadata")


class PurposeCreate(OrgScopedInput):
    description: LanguageMap
    metadata: JsonObject = Field(default_factory=dict)


class PurposeUpdate(InputModel):
    description: LanguageMap | None = None
    metadata: JsonObject | None = None


class PurposePublic(OutputModel):
    id: str
    organization_id: str
    description: dict[str, str]
    metadata: JsonObject = Field(validation_alias=_METADATA)
    created_at: Timestamp
    updated_at: Timestamp


class PreferenceValueIn(InputModel):
    id: SafeId | None = None  # keep an existing value (on update); omitted = a new value
    name: LanguageMap
    metadata: JsonObject = Field(default_factory=dict)
    order: int | None = None


class PreferenceValuePublic(OutputModel):
    id: str
    preference_id: str
    name: dict[str, str]
    metadata: JsonObject = Field(validation_alias=_METADATA)
    order: int
    created_at: Timestamp
    updated_at: Timestamp


class PreferenceCreate(OrgScopedInput):
    name: LanguageMap
    description: LanguageMap = Field(default_factory=dict)
    type: PreferenceType = "single"
    metadata: JsonObject = Field(default_factory=dict)
    values: list[PreferenceValueIn] = Field(default_factory=list, max_length=500)


class PreferenceUpdate(InputModel):
    name: LanguageMap | None = None
    description: LanguageMap | None = None
    type: PreferenceType | None = None
    metadata: JsonObject | None = None
    values: list[PreferenceValueIn] | None = Field(default=None, max_length=500)


class PreferencePublic(OutputModel):
    id: str
    organization_id: str
    name: dict[str, str]
    description: dict[str, str]
    type: str
    metadata: JsonObject = Field(validation_alias=_METADATA)
    values: list[PreferenceValuePublic]
    created_at: Timestamp
    updated_at: Timestamp
