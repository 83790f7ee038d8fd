"""audit, rollback, bulk jobs, live catalog refs

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql
import worker.models.types

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('bulk_jobs',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('organization_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('selector', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=True),
    sa.Column('cursor', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('fanned_out_at', worker.models.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('error', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('requeues', sa.Integer(), nullable=False),
    sa.Column('enqueued_at', worker.models.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('created_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['organization_id'], ['organizations.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('bulk_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_bulk_jobs_organization_id'), ['organization_id'], unique=False)

    op.create_table('live_catalog_refs',
    sa.Column('widget_id', sa.String(length=64), nullable=False),
    sa.Column('item_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('organization_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.ForeignKeyConstraint(['widget_id'], ['widgets.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('widget_id', 'item_id')
    )
    with op.batch_alter_table('live_catalog_refs', schema=None) as batch_op:
        batch_op.create_index('ix_live_catalog_refs_org_item', ['organization_id', 'item_id'], unique=False)

    with op.batch_alter_table('archive_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False, server_default='producer'))
        batch_op.add_column(sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=True))

    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source_deployment_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('bulk_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False, server_default='producer'))
        batch_op.add_column(sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=True))
        batch_op.create_index('ix_deployments_bulk_widget', ['bulk_id', 'widget_id'], unique=True)

    _backfill_live_catalog_refs()


def _backfill_live_catalog_refs() -> None:
    """Widgets published before this revision: index what their live snapshots embed."""
    conn = op.get_bind()
    live = conn.execute(
        sa.text(
            "SELECT w.id, w.organization_id, d.config FROM widgets w "
            "JOIN deployments d ON d.deployment_id = w.live_deployment_id"
        )
    ).all()
    for widget_id, organization_id, config in live:
        if isinstance(config, str):
            config = json.loads(config)
        items = {p["id"] for p in (config or {}).get("purposes", [])}
        items |= {p["id"] for p in (config or {}).get("preferences", [])}
        for item_id in sorted(items):
            conn.execute(
                sa.text(
                    "INSERT INTO live_catalog_refs (widget_id, item_id, organization_id) "
                    "VALUES (:w, :i, :o)"
                ),
                {"w": widget_id, "i": item_id, "o": organization_id},
            )


def downgrade() -> None:
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.drop_index('ix_deployments_bulk_widget')
        batch_op.drop_column('reason')
        batch_op.drop_column('created_by')
        batch_op.drop_column('bulk_id')
        batch_op.drop_column('source_deployment_id')

    with op.batch_alter_table('archive_jobs', schema=None) as batch_op:
        batch_op.drop_column('reason')
        batch_op.drop_column('created_by')

    with op.batch_alter_table('live_catalog_refs', schema=None) as batch_op:
        batch_op.drop_index('ix_live_catalog_refs_org_item')

    op.drop_table('live_catalog_refs')
    with op.batch_alter_table('bulk_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_bulk_jobs_organization_id'))

    op.drop_table('bulk_jobs')
