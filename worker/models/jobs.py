"""Job records: deployments, archive jobs, and the archived copies of widgets."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Index
from sqlmodel import Field, SQLModel

from worker.ids import new_id
from worker.models.types import PortableJSON, UTCDateTime, utcnow

# ``cancelled``: a scheduled deployment cancelled before it was due (it never publishes).
FINAL_STATUSES: frozenset[str] = frozenset({"success", "failure", "cancelled"})
# Waiting for its ``publish_at`` (snapshot frozen): sent by beat when due, then ``ready``.
SCHEDULED = "scheduled"
# Where a deployment publishes: the container file websites load, or the widget's preview file.
TARGETS = ("production", "preview")
# Who asked for a job (``created_by``): an API key's id, the admin, or a Celery producer that
# sent the message without the API.
CREATED_BY_PRODUCER = "producer"
CREATED_BY_ADMIN = "admin"
MAX_REASON_LENGTH = 500


class Deployment(SQLModel, table=True):
    """One request to publish a widget. Never deleted: it keeps the frozen configuration.

    ``deployment_id`` is the idempotency key (a producer may pick it), unique **per
    organization**: another tenant may use the same one, so every lookup by it names the
    organization too. It is also written into the published file. ``live_deployment_id`` says
    which deployment's file was live when this one finished (itself, or the one that overtook it
    or already had the same content).
    """

    __tablename__ = "deployments"
    __table_args__ = (
        # The idempotency key is unique within an organization only (one tenant's keys must
        # neither collide with nor reveal another's); lookups by it use this index.
        Index("ix_deployments_org_deployment_id", "organization_id", "deployment_id", unique=True),
        Index("ix_deployments_org_widget_created", "organization_id", "widget_id", "created_at"),
        # List pages sorted by either timestamp (the id is the tie-break).
        Index("ix_deployments_org_created", "organization_id", "created_at", "id"),
        Index("ix_deployments_org_updated", "organization_id", "updated_at", "id"),
        # The reconciler's scan of stale jobs, oldest first.
        Index("ix_deployments_status_created", "status", "created_at"),
        # Publish order: one sequence number per snapshot of a widget.
        Index("ix_deployments_widget_sequence", "widget_id", "sequence", unique=True),
        # A bulk redeploy creates at most one deployment per widget, however often it resumes.
        Index("ix_deployments_bulk_widget", "bulk_id", "widget_id", unique=True),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    deployment_id: str = Field(default_factory=new_id, max_length=64)
    organization_id: str = Field(foreign_key="organizations.id", index=True, max_length=64)
    # Deliberately no foreign key: deployments outlive their widget.
    widget_id: str = Field(max_length=64)
    target: str = Field(
        default="production", max_length=16, sa_column_kwargs={"server_default": "production"}
    )
    config: dict[str, Any] | None = Field(default=None, sa_type=PortableJSON)
    status: str = Field(default="ready", max_length=16, index=True)
    error: str | None = None
    attempts: int = 0
    requeues: int = 0  # times the reconciler re-sent it
    widget_version: int | None = None
    # The widget's publish sequence given when the snapshot was frozen (strictly increasing per
    # widget); the published file carries it, and a file never replaces one of a higher sequence.
    sequence: int | None = None
    s3_key: str | None = Field(default=None, max_length=512)
    checksum: str | None = Field(default=None, max_length=64)
    content_checksum: str | None = Field(default=None, max_length=64)
    live_deployment_id: str | None = Field(default=None, max_length=64)
    # A ``failure`` that may have sent a write S3 had not answered: checked once the longest
    # time such a request can still land has passed (worker.services.late_writes).
    late_write_checked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # A scheduled deployment's time (worker.services.schedule); None: published at once.
    publish_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # A rollback republishes this earlier deployment's snapshot (same bytes, its own id).
    source_deployment_id: str | None = Field(default=None, max_length=64)
    bulk_id: str | None = Field(default=None, max_length=64)
    created_by: str = Field(default=CREATED_BY_PRODUCER, max_length=64)
    reason: str | None = Field(default=None, max_length=MAX_REASON_LENGTH)
    enqueued_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ArchiveJob(SQLModel, table=True):
    """One request to archive a widget; ``result`` is ``deleted`` (draft) or ``archived``."""

    __tablename__ = "archive_jobs"
    __table_args__ = (Index("ix_archive_jobs_status_created", "status", "created_at"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    organization_id: str = Field(foreign_key="organizations.id", index=True, max_length=64)
    widget_id: str = Field(max_length=64, index=True)
    status: str = Field(default="ready", max_length=16, index=True)
    result: str | None = Field(default=None, max_length=16)
    error: str | None = None
    attempts: int = 0
    requeues: int = 0  # times the reconciler re-sent it
    created_by: str = Field(default=CREATED_BY_PRODUCER, max_length=64)
    reason: str | None = Field(default=None, max_length=MAX_REASON_LENGTH)
    enqueued_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # The container key deleted again once no write sent before the archive can still land
    # (worker.services.late_writes).
    swept_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class BulkJob(SQLModel, table=True):
    """A redeploy of many widgets: one deployment each (``deployments.bulk_id``), fanned out in
    batches by ``widgets.bulk_deploy``; ``cursor`` is the last widget id handled, so a resumed
    fan-out continues where it stopped. Progress is counted from its deployments."""

    __tablename__ = "bulk_jobs"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    organization_id: str = Field(foreign_key="organizations.id", index=True, max_length=64)
    selector: dict[str, Any] = Field(default_factory=dict, sa_type=PortableJSON)
    created_by: str = Field(default=CREATED_BY_PRODUCER, max_length=64)
    reason: str | None = Field(default=None, max_length=MAX_REASON_LENGTH)
    cursor: str | None = Field(default=None, max_length=64)
    fanned_out_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # When the job was seen ended (fanned out, every deployment final) and its bulk.completed
    # webhook event recorded (worker.services.bulk_completion).
    completed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    error: str | None = None
    attempts: int = 0
    requeues: int = 0
    enqueued_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ArchivedWidget(SQLModel, table=True):
    """What is kept of a published widget once archived (the Didomi ``archived_widgets`` shape)."""

    __tablename__ = "archived_widgets"
    __table_args__ = (
        Index("ix_archived_widgets_org_created", "organization_id", "created_at", "id"),
        Index("ix_archived_widgets_org_updated", "organization_id", "updated_at", "id"),
    )

    id: str = Field(primary_key=True, max_length=64)  # the widget's id
    organization_id: str = Field(foreign_key="organizations.id", index=True, max_length=64)
    name: str = Field(max_length=255)
    format: str = Field(max_length=32)
    template_id: str = Field(max_length=64)
    last_domain_used: str | None = Field(default=None, max_length=255)
    widget_created_at: datetime = Field(sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
