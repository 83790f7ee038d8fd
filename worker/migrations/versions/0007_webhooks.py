"""Webhooks: endpoints, their subscriptions, the outbox of deliveries and their attempts

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08

An organization's endpoints (URL, event types, signing secret and the previous one during a
rotation), one subscription row per (endpoint, event type) for the outbox's indexed join, one
delivery row per (event, endpoint) written in the transaction of the state change that caused
the event, and the log of HTTP attempts. ``bulk_jobs.completed_at`` records when a bulk job was
seen ended and its ``bulk.completed`` event written; the jobs that exist already count as
completed (no event is sent for them).
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

from worker.models.types import PortableJSON, UTCDateTime

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _str(length: int) -> sqlmodel.sql.sqltypes.AutoString:
    return sqlmodel.sql.sqltypes.AutoString(length=length)


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", _str(64), nullable=False),
        sa.Column("organization_id", _str(64), nullable=False),
        sa.Column("url", _str(2048), nullable=False),
        sa.Column("description", _str(500), nullable=True),
        sa.Column("event_types", PortableJSON, nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("disabled_reason", _str(500), nullable=True),
        sa.Column("secret", _str(128), nullable=False),
        sa.Column("previous_secret", _str(128), nullable=True),
        sa.Column("previous_secret_expires_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["organization_id"], ["organizations.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_webhook_endpoints_organization_id", "webhook_endpoints", ["organization_id"]
    )
    op.create_table(
        "webhook_subscriptions",
        sa.Column("endpoint_id", sa.String(length=64), nullable=False),
        sa.Column("event_type", _str(64), nullable=False),
        sa.Column("organization_id", _str(64), nullable=False),
        sa.ForeignKeyConstraint(["endpoint_id"], ["webhook_endpoints.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("endpoint_id", "event_type"),
    )
    op.create_index(
        "ix_webhook_subscriptions_org_type",
        "webhook_subscriptions",
        ["organization_id", "event_type"],
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("webhook_id", _str(64), nullable=False),
        sa.Column("endpoint_id", sa.String(length=64), nullable=False),
        sa.Column("organization_id", _str(64), nullable=False),
        sa.Column("event_type", _str(64), nullable=False),
        sa.Column("data", PortableJSON, nullable=False),
        sa.Column("status", _str(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", _str(500), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["endpoint_id"], ["webhook_endpoints.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("webhook_id", "endpoint_id"),
    )
    op.create_index(
        "ix_webhook_deliveries_due", "webhook_deliveries", ["status", "next_attempt_at"]
    )
    op.create_index(
        "ix_webhook_deliveries_endpoint_created",
        "webhook_deliveries",
        ["endpoint_id", "created_at"],
    )
    op.create_table(
        "webhook_attempts",
        sa.Column("id", _str(64), nullable=False),
        sa.Column("webhook_id", _str(64), nullable=False),
        sa.Column("endpoint_id", sa.String(length=64), nullable=False),
        sa.Column("attempted_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        sa.Column("error", _str(500), nullable=True),
        sa.ForeignKeyConstraint(["endpoint_id"], ["webhook_endpoints.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_webhook_attempts_delivery", "webhook_attempts", ["endpoint_id", "webhook_id"]
    )
    with op.batch_alter_table("bulk_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("completed_at", UTCDateTime(timezone=True), nullable=True))
    op.execute("UPDATE bulk_jobs SET completed_at = updated_at")


def downgrade() -> None:
    with op.batch_alter_table("bulk_jobs", schema=None) as batch_op:
        batch_op.drop_column("completed_at")
    op.drop_index("ix_webhook_attempts_delivery", table_name="webhook_attempts")
    op.drop_table("webhook_attempts")
    op.drop_index("ix_webhook_deliveries_endpoint_created", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_due", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_webhook_subscriptions_org_type", table_name="webhook_subscriptions")
    op.drop_table("webhook_subscriptions")
    op.drop_index("ix_webhook_endpoints_organization_id", table_name="webhook_endpoints")
    op.drop_table("webhook_endpoints")
