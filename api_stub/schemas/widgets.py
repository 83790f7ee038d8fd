"""Widgets and the tenancy admin bodies."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from api_stub.schemas.common import (
    NOT_NULL,
    InputModel,
    JsonComponents,
    JsonObject,
    LanguageCode,
    OrgScopedInput,
    OutputModel,
    SafeId,
    Timestamp,
)

WidgetFormat = Literal["embeddable", "hosted"]
TemplateId = Literal["sections", "sections_and_save", "full_preference_center", "dsar_form"]
Language = LanguageCode


class WidgetCreate(OrgScopedInput):
    name: str = Field(min_length=1, max_length=255)
    format: WidgetFormat = "embeddable"
    template_id: TemplateId = "sections"
    headless: bool = False
    layout_shape: str | None = Field(default=None, max_length=64)
    theme_id: str | None = Field(default=None, max_length=64)
    enabled_languages: list[Language] = Field(default_factory=lambda: ["en"], max_length=200)
    default_language: Language = "en"
    domain: str | None = Field(default=None, max_length=255)
    last_domain_used: str | None = Field(default=None, max_length=255)
    selected_purposes_ids: list[SafeId] = Field(default_factory=list, max_length=1000)
    selected_preferences_ids: list[SafeId] = Field(default_factory=list, max_length=1000)
    components: JsonComponents = Field(default_factory=dict)


class WidgetUpdate(InputModel):
    """Omitted fields are left as they are; ``null`` is allowed only where the widget can hold
    it (``layout_shape``, ``theme_id``, ``domain``, ``last_domain_used``)."""

    name: Annotated[str | None, NOT_NULL] = Field(default=None, min_length=1, max_length=255)
    format: Annotated[WidgetFormat | None, NOT_NULL] = None
    template_id: Annotated[TemplateId | None, NOT_NULL] = None
    headless: Annotated[bool | None, NOT_NULL] = None
    layout_shape: str | None = Field(default=None, max_length=64)
    theme_id: str | None = Field(default=None, max_length=64)
    enabled_languages: Annotated[list[Language] | None, NOT_NULL] = Field(
        default=None, max_length=200
    )
    default_language: Annotated[Language | None, NOT_NULL] = None
    domain: str | None = Field(default=None, max_length=255)
    last_domain_used: str | None = Field(default=None, max_length=255)
    selected_purposes_ids: Annotated[list[SafeId] | None, NOT_NULL] = Field(
        default=None, max_length=1000
    )
    selected_preferences_ids: Annotated[list[SafeId] | None, NOT_NULL] = Field(
        default=None, max_length=1000
    )
    components: Annotated[JsonComponents | None, NOT_NULL] = None


class WidgetPublic(OutputModel):
    id: str
    organization_id: str
    name: str
    format: str
    template_id: str
    headless: bool
    layout_shape: str | None
    theme_id: str | None
    enabled_languages: list[str]
    default_language: str
    domain: str | None
    last_domain_used: str | None
    selected_purposes_ids: list[str]
    selected_preferences_ids: list[str]
    components: JsonObject
    publication_status: Literal["draft", "published", "unpublished_changes"]
    version: int
    published_version: int | None
    created_at: Timestamp
    updated_at: Timestamp


class OrganizationCreate(InputModel):
    name: str = Field(min_length=1, max_length=255)


class OrganizationPublic(OutputModel):
    id: str
    name: str
    api_key: str
    created_at: Timestamp
    updated_at: Timestamp


class ApiKeyPublic(OutputModel):
    key: str
    secret: str
    organization_id: str
    created_at: Timestamp


class ApiKeyRevoked(OutputModel):
    """A revoked key (its secret was never stored); its tokens no longer work."""

    key: str
    organization_id: str
    created_at: Timestamp


class SessionCreate(InputModel):
    type: Literal["api-key"]
    key: str = Field(min_length=1, max_length=128)
    secret: str = Field(min_length=1, max_length=256)


class SessionPublic(OutputModel):
    access_token: str
