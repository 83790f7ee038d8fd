"""Widgets and their uploaded assets."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Column, ForeignKey, Index, String, text
from sqlmodel import Field, SQLModel

from worker.ids import new_id
from worker.models.types import PortableJSON, UTCDateTime, utcnow

PublicationStatus = Literal["draft", "published", "unpublished_changes"]


class Widget(SQLModel, table=True):
    """An editable widget.

    ``version`` counts content edits; ``published_version`` is the version of the last successful
    deployment. The publication status is derived from the two, never stored on its own.
    """

    __tablename__ = "widgets"
    __table_args__ = (
        # The cleanup's scan: drafts (never published), not archived, oldest edit first.
        Index(
            "ix_widgets_drafts_updated",
            "updated_at",
            "id",
            postgresql_where=text("published_version IS NULL AND archived_at IS NULL"),
            sqlite_where=text("published_version IS NULL AND archived_at IS NULL"),
        ),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    organization_id: str = Field(foreign_key="organizations.id", index=True, max_length=64)
    name: str = Field(max_length=255)
    format: str = Field(default="embeddable", max_length=32)
    template_id: str = Field(default="sections", max_length=64)
    headless: bool = False
    layout_shape: str | None = Field(default=None, max_length=64)
    theme_id: str | None = Field(default=None, max_length=64)
    enabled_languages: list[str] = Field(default_factory=lambda: ["en"], sa_type=PortableJSON)
    default_language: str = Field(default="en", max_length=16)
    domain: str | None = Field(default=None, max_length=255)
    last_domain_used: str | None = Field(default=None, max_length=255)
    selected_purposes_ids: list[str] = Field(default_factory=list, sa_type=PortableJSON)
    selected_preferences_ids: list[str] = Field(default_factory=list, sa_type=PortableJSON)
    components: dict[str, Any] = Field(default_factory=dict, sa_type=PortableJSON)

    version: int = 1
    published_version: int | None = None
    # Publish ordering (worker.services.publish): the last sequence given to a frozen snapshot,
    # and the sequence, S3 ETag and deployment of what is live. ``live_seq`` only moves forward.
    publish_seq: int = 0
    live_seq: int | None = None
    live_etag: str | None = Field(default=None, max_length=128)
    live_deployment_id: str | None = Field(default=None, max_length=64)
    # The same for the widget's preview file (worker.services.live_state.PREVIEW): sequences come
    # from the same counter; ``preview_seq`` is the last one given to a preview snapshot (None:
    # the widget never had one, so an archive has no preview file to take down).
    preview_seq: int | None = None
    preview_live_seq: int | None = None
    preview_live_etag: str | None = Field(default=None, max_length=128)
    preview_live_deployment_id: str | None = Field(default=None, max_length=64)
    archived_at: datetime | None = Field(default=None, sa_type=UTCDateTime)

    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)

    @property
    def publication_status(self) -> PublicationStatus:
        if self.published_version is None:
            return "draft"
        if self.published_version >= self.version:
            return "published"
        return "unpublished_changes"

    @property
    def is_archived(self) -> bool:
        return self.archived_at is not None

    def touch_content(self) -> None:
        """Record an edit: a new content version, so a published widget has unpublished changes."""
        self.version += 1
        self.updated_at = utcnow()


class WidgetAsset(SQLModel, table=True):
    """A file uploaded for a widget (image, favicon), stored on S3 under ``assets/``."""

    __tablename__ = "widget_assets"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    organization_id: str = Field(foreign_key="organizations.id", index=True, max_length=64)
    widget_id: str = Field(
        sa_column=Column(
            String(64), ForeignKey("widgets.id", ondelete="CASCADE"), index=True, nullable=False
        )
    )
    filename: str = Field(max_length=255)
    content_type: str = Field(max_length=128)
    size: int
    s3_key: str = Field(max_length=512)
    checksum: str = Field(max_length=64)
    # ``uploading`` while its S3 write is in flight (the row exists first, so no object is ever
    # without a record); ``stored`` once written. Lists show stored assets only.
    status: str = Field(default="stored", max_length=16)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class SnapshotCatalogRef(SQLModel, table=True):
    """A purpose or preference (with its values) embedded in a frozen snapshot of a widget.

    Written when the snapshot is frozen (with its ``sequence``), in the same transaction, and
    pruned below the live sequence when the widget's live record moves: so it holds the items of
    the live snapshot **and** of every snapshot frozen since that may still become live. A
    catalog edit finds, with one indexed query, every widget whose live or in-flight snapshot it
    makes stale (worker.services.catalog_impact).
    """

    __tablename__ = "snapshot_catalog_refs"
    __table_args__ = (Index("ix_snapshot_catalog_refs_org_item", "organization_id", "item_id"),)

    widget_id: str = Field(
        sa_column=Column(String(64), ForeignKey("widgets.id", ondelete="CASCADE"), primary_key=True)
    )
    sequence: int = Field(primary_key=True)
    item_id: str = Field(primary_key=True, max_length=64)
    organization_id: str = Field(max_length=64)
