"""Catalog refs of every frozen snapshot (not only the live one); late-write checks

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

``live_catalog_refs`` said which items a widget's *live* snapshot embeds, so a catalog edit
missed a widget whose snapshot was frozen but not yet recorded live. It becomes
``snapshot_catalog_refs``, keyed by the snapshot's sequence too: rows are written when a
snapshot is frozen and pruned below the live sequence. Existing rows are the live snapshots'
and take the widget's live sequence.

``deployments.late_write_checked_at`` and ``archive_jobs.swept_at`` record the check made once
no write sent before a failure or an archive can still reach S3.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

from worker.models.types import UTCDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "snapshot_catalog_refs",
        sa.Column("widget_id", sa.String(length=64), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("item_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("organization_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.ForeignKeyConstraint(["widget_id"], ["widgets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("widget_id", "sequence", "item_id"),
    )
    op.create_index(
        "ix_snapshot_catalog_refs_org_item",
        "snapshot_catalog_refs",
        ["organization_id", "item_id"],
        unique=False,
    )
    op.execute(
        "INSERT INTO snapshot_catalog_refs (widget_id, sequence, item_id, organization_id) "
        "SELECT r.widget_id, COALESCE(w.live_seq, 0), r.item_id, r.organization_id "
        "FROM live_catalog_refs r JOIN widgets w ON w.id = r.widget_id"
    )
    op.drop_index("ix_live_catalog_refs_org_item", table_name="live_catalog_refs")
    op.drop_table("live_catalog_refs")
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("late_write_checked_at", UTCDateTime(timezone=True), nullable=True))
    with op.batch_alter_table("archive_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("swept_at", UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("archive_jobs", schema=None) as batch_op:
        batch_op.drop_column("swept_at")
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_column("late_write_checked_at")
    op.create_table(
        "live_catalog_refs",
        sa.Column("widget_id", sa.String(length=64), nullable=False),
        sa.Column("item_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("organization_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.ForeignKeyConstraint(["widget_id"], ["widgets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("widget_id", "item_id"),
    )
    op.create_index(
        "ix_live_catalog_refs_org_item", "live_catalog_refs", ["organization_id", "item_id"]
    )
    op.execute(
        "INSERT INTO live_catalog_refs (widget_id, item_id, organization_id) "
        "SELECT DISTINCT r.widget_id, r.item_id, r.organization_id "
        "FROM snapshot_catalog_refs r JOIN widgets w ON w.id = r.widget_id "
        "WHERE r.sequence = COALESCE(w.live_seq, 0)"
    )
    op.drop_index("ix_snapshot_catalog_refs_org_item", table_name="snapshot_catalog_refs")
    op.drop_table("snapshot_catalog_refs")
