"""Purposes and preferences (with their values)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field

from api_stub.schemas.common import (
    INT32_MAX,
    INT32_MIN,
    NOT_NULL,
    InputModel,
    JsonMetadata,
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
    metadata: JsonMetadata = Field(default_factory=dict)


class PurposeUpdate(InputModel):
    """Omitted fields are left as they are; none may be null."""

    description: Annotated[LanguageMap | None, NOT_NULL] = None
    metadata: Annotated[JsonMetadata | None, NOT_NULL] = None


class PurposePublic(OutputModel):
    id: str
    organization_id: str
    description: dict[str, str]
    metadata: JsonObject = Field(validation_alias=_METADATA)
    created_at: Timestamp
    updated_at: Timestamp


class PreferenceValueCreate(InputModel):
    """A value of a new preference (it has no id yet: one given is an unknown field)."""

    name: LanguageMap
    metadata: JsonMetadata = Field(default_factory=dict)
    # Omitted or null: the value's position in the list.
    order: int | None = Field(default=None, ge=INT32_MIN, le=INT32_MAX)


class PreferenceValueIn(PreferenceValueCreate):
    """A value in a preference update: with the ``id`` of one of its values, that value is kept
    (and edited); without, a new value."""

    id: SafeId | None = None


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
    metadata: JsonMetadata = Field(default_factory=dict)
    values: list[PreferenceValueCreate] = Field(default_factory=list, max_length=500)


class PreferenceUpdate(InputModel):
    """Omitted fields are left as they are; none may be null."""

    name: Annotated[LanguageMap | None, NOT_NULL] = None
    description: Annotated[LanguageMap | None, NOT_NULL] = None
    type: Annotated[PreferenceType | None, NOT_NULL] = None
    metadata: Annotated[JsonMetadata | None, NOT_NULL] = None
    values: Annotated[list[PreferenceValueIn] | None, NOT_NULL] = Field(
        default=None, max_length=500
    )


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
