"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql
import worker.models.types

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table('organizations',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('api_key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('created_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('api_key')
    )
    op.create_table('api_keys',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('organization_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('secret_hash', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('created_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['organization_id'], ['organizations.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_organization_id'), ['organization_id'], unique=False)

    op.create_table('archive_jobs',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('organization_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('widget_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('result', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.Column('error', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('requeues', sa.Integer(), nullable=False),
    sa.Column('enqueued_at', worker.models.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('started_at', worker.models.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('finished_at', worker.models.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('created_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['organization_id'], ['organizations.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('archive_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_archive_jobs_organization_id'), ['organization_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_archive_jobs_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_archive_jobs_widget_id'), ['widget_id'], unique=False)

    op.create_table('archived_widgets',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('organization_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('format', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('template_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('last_domain_used', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('widget_created_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('created_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['organization_id'], ['organizations.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('archived_widgets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_archived_widgets_organization_id'), ['organization_id'], unique=False)

    op.create_table('deployments',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('deployment_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('organization_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('widget_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('config', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('error', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('requeues', sa.Integer(), nullable=False),
    sa.Column('widget_version', sa.Integer(), nullable=True),
    sa.Column('s3_key', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
    sa.Column('checksum', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('content_checksum', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('live_deployment_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('enqueued_at', worker.models.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('started_at', worker.models.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('finished_at', worker.models.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('created_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['organization_id'], ['organizations.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('deployment_id')
    )
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.create_index('ix_deployments_org_widget_created', ['organization_id', 'widget_id', 'created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_deployments_organization_id'), ['organization_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_deployments_status'), ['status'], unique=False)

    op.create_table('preferences',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('organization_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('name', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('description', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('type', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('metadata', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['organization_id'], ['organizations.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('preferences', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_preferences_organization_id'), ['organization_id'], unique=False)

    op.create_table('purposes',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('organization_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('description', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('metadata', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['organization_id'], ['organizations.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('purposes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_purposes_organization_id'), ['organization_id'], unique=False)

    op.create_table('widgets',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('organization_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('format', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('template_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('headless', sa.Boolean(), nullable=False),
    sa.Column('layout_shape', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('theme_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('enabled_languages', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('default_language', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('domain', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('last_domain_used', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('selected_purposes_ids', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('selected_preferences_ids', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('components', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('published_version', sa.Integer(), nullable=True),
    sa.Column('live_deployment_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('archived_at', worker.models.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('created_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['organization_id'], ['organizations.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('widgets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_widgets_organization_id'), ['organization_id'], unique=False)

    op.create_table('preference_values',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('preference_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('metadata', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('order', sa.Integer(), nullable=False),
    sa.Column('created_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['preference_id'], ['preferences.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('preference_values', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_preference_values_preference_id'), ['preference_id'], unique=False)

    op.create_table('widget_assets',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('organization_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('widget_id', sa.String(length=64), nullable=False),
    sa.Column('filename', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('content_type', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('s3_key', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('checksum', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('created_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', worker.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['organization_id'], ['organizations.id'], ),
    sa.ForeignKeyConstraint(['widget_id'], ['widgets.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('widget_assets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_widget_assets_organization_id'), ['organization_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_widget_assets_widget_id'), ['widget_id'], unique=False)




def downgrade() -> None:

    with op.batch_alter_table('widget_assets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_widget_assets_widget_id'))
        batch_op.drop_index(batch_op.f('ix_widget_assets_organization_id'))

    op.drop_table('widget_assets')
    with op.batch_alter_table('preference_values', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_preference_values_preference_id'))

    op.drop_table('preference_values')
    with op.batch_alter_table('widgets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_widgets_organization_id'))

    op.drop_table('widgets')
    with op.batch_alter_table('purposes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_purposes_organization_id'))

    op.drop_table('purposes')
    with op.batch_alter_table('preferences', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_preferences_organization_id'))

    op.drop_table('preferences')
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deployments_status'))
        batch_op.drop_index(batch_op.f('ix_deployments_organization_id'))
        batch_op.drop_index('ix_deployments_org_widget_created')

    op.drop_table('deployments')
    with op.batch_alter_table('archived_widgets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_archived_widgets_organization_id'))

    op.drop_table('archived_widgets')
    with op.batch_alter_table('archive_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_archive_jobs_widget_id'))
        batch_op.drop_index(batch_op.f('ix_archive_jobs_status'))
        batch_op.drop_index(batch_op.f('ix_archive_jobs_organization_id'))

    op.drop_table('archive_jobs')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_organization_id'))

    op.drop_table('api_keys')
    op.drop_table('organizations')

