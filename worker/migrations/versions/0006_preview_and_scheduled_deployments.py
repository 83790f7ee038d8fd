"""Preview and scheduled deployments: a deployment's target and publish time, and the widget's
preview live record

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08

``deployments.target`` is ``production`` (the container file websites load) or ``preview``
(a separate object per widget). Every existing deployment is a production one. The widget keeps
a second live record for its preview file (``preview_live_*``, forward-only like ``live_*``) and
``preview_seq``, the highest sequence given to a preview snapshot (an archive takes the preview
file down only when there may be one). ``deployments.publish_at`` is when a scheduled
deployment (status ``scheduled``, snapshot frozen when requested) is sent by beat.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

from worker.models.types import UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "target",
                sqlmodel.sql.sqltypes.AutoString(length=16),
                nullable=False,
                server_default="production",
            )
        )
        batch_op.add_column(sa.Column("publish_at", UTCDateTime(timezone=True), nullable=True))
    with op.batch_alter_table("widgets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("preview_seq", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("preview_live_seq", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("preview_live_etag", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True)
        )
        batch_op.add_column(
            sa.Column(
                "preview_live_deployment_id",
                sqlmodel.sql.sqltypes.AutoString(length=64),
                nullable=True,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("widgets", schema=None) as batch_op:
        batch_op.drop_column("preview_live_deployment_id")
        batch_op.drop_column("preview_live_etag")
        batch_op.drop_column("preview_live_seq")
        batch_op.drop_column("preview_seq")
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_column("publish_at")
        batch_op.drop_column("target")
