"""deployment_id unique per organization, not globally

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-14

The global ``UNIQUE (deployment_id)`` of 0001 let one tenant learn that another used a
``deployment_id`` (a 409) and block it from using that id. It becomes a unique index on
``(organization_id, deployment_id)``, which also serves every lookup by the key (they all name
the organization now).

The old constraint was created without a name: PostgreSQL called it
``deployments_deployment_id_key`` (read back from the catalog here rather than assumed); SQLite
keeps it anonymous inside the table definition, so the table is rebuilt (batch mode) with a
naming convention that lets the reflected constraint be named and dropped.

Downgrade restores the global constraint; it fails if two organizations now share an id.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "deployments"
NEW_INDEX = "ix_deployments_org_deployment_id"
# How SQLite's anonymous constraint is named once reflected (batch mode only).
SQLITE_NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}
SQLITE_UQ = "uq_deployments_deployment_id"
POSTGRES_UQ = "deployments_deployment_id_key"  # PostgreSQL's default name for it


def _global_unique_names() -> list[str]:
    """Names of the unique constraints on ``deployment_id`` alone (PostgreSQL)."""
    inspector = sa.inspect(op.get_bind())
    return [
        str(uc["name"])
        for uc in inspector.get_unique_constraints(TABLE)
        if uc["column_names"] == ["deployment_id"] and uc["name"]
    ]


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table(
            TABLE, naming_convention=SQLITE_NAMING, recreate="always"
        ) as batch_op:
            batch_op.drop_constraint(SQLITE_UQ, type_="unique")
            batch_op.create_index(NEW_INDEX, ["organization_id", "deployment_id"], unique=True)
        return
    for name in _global_unique_names():
        op.drop_constraint(name, TABLE, type_="unique")
    op.create_index(NEW_INDEX, TABLE, ["organization_id", "deployment_id"], unique=True)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table(TABLE, recreate="always") as batch_op:
            batch_op.drop_index(NEW_INDEX)
            batch_op.create_unique_constraint(SQLITE_UQ, ["deployment_id"])
        return
    op.drop_index(NEW_INDEX, table_name=TABLE)
    op.create_unique_constraint(POSTGRES_UQ, TABLE, ["deployment_id"])
