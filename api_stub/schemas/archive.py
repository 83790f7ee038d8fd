"""Archive jobs, archived widgets and widget assets."""

from __future__ import annotations

from typing import Literal

from api_stub.schemas.common import OutputModel, Timestamp


class ArchiveJobPublic(OutputModel):
    id: str
    organization_id: str
    widget_id: str
    status: Literal["ready", "running", "success", "failure"]
    result: Literal["deleted", "archived"] | None
    error: str | None
    attempts: int
    # Who asked: the API key's id, or "producer" for a message sent without the API.
    created_by: str
    reason: str | None
    created_at: Timestamp
    updated_at: Timestamp


class ArchivedWidgetPublic(OutputModel):
    """Exactly the fields of Didomi's archived widgets."""

    id: str
    created_at: Timestamp
    updated_at: Timestamp
    name: str
    widget_created_at: Timestamp
    organization_id: str
    format: str
    last_domain_used: str | None
    template_id: str


class AssetPublic(OutputModel):
    id: str
    organization_id: str
    widget_id: str
    filename: str
    content_type: str
    size: int
    s3_key: str
    checksum: str
    created_at: Timestamp
    updated_at: Timestamp
