"""publish sequence, live ETag, asset upload status, list/cleanup/reconcile indexes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DRAFTS = "published_version IS NULL AND archived_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("widgets") as batch_op:
        batch_op.add_column(sa.Column("publish_seq", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("live_seq", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("live_etag", sa.String(length=128), nullable=True))
        batch_op.create_index(
            "ix_widgets_drafts_updated",
            ["updated_at", "id"],
            postgresql_where=sa.text(DRAFTS),
            sqlite_where=sa.text(DRAFTS),
        )
    with op.batch_alter_table("deployments") as batch_op:
        batch_op.add_column(sa.Column("sequence", sa.Integer(), nullable=True))
        batch_op.create_index("ix_deployments_widget_sequence", ["widget_id", "sequence"], unique=True)
        batch_op.create_index("ix_deployments_org_created", ["organization_id", "created_at", "id"])
        batch_op.create_index("ix_deployments_org_updated", ["organization_id", "updated_at", "id"])
        batch_op.create_index("ix_deployments_status_created", ["status", "created_at"])
    with op.batch_alter_table("archive_jobs") as batch_op:
        batch_op.create_index("ix_archive_jobs_status_created", ["status", "created_at"])
    with op.batch_alter_table("archived_widgets") as batch_op:
        batch_op.create_index("ix_archived_widgets_org_created", ["organization_id", "created_at", "id"])
        batch_op.create_index("ix_archived_widgets_org_updated", ["organization_id", "updated_at", "id"])
    with op.batch_alter_table("widget_assets") as batch_op:
        batch_op.add_column(
            sa.Column("status", sa.String(length=16), nullable=False, server_default="stored")
        )


def downgrade() -> None:
    with op.batch_alter_table("widget_assets") as batch_op:
        batch_op.drop_column("status")
    with op.batch_alter_table("archived_widgets") as batch_op:
        batch_op.drop_index("ix_archived_widgets_org_updated")
        batch_op.drop_index("ix_archived_widgets_org_created")
    with op.batch_alter_table("archive_jobs") as batch_op:
        batch_op.drop_index("ix_archive_jobs_status_created")
    with op.batch_alter_table("deployments") as batch_op:
        batch_op.drop_index("ix_deployments_status_created")
        batch_op.drop_index("ix_deployments_org_updated")
        batch_op.drop_index("ix_deployments_org_created")
        batch_op.drop_index("ix_deployments_widget_sequence")
        batch_op.drop_column("sequence")
    with op.batch_alter_table("widgets") as batch_op:
        batch_op.drop_index("ix_widgets_drafts_updated")
        batch_op.drop_column("live_etag")
        batch_op.drop_column("live_seq")
        batch_op.drop_column("publish_seq")
