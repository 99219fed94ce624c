"""reconcile: details given up after repeated 404s, and the run record's warnings

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 12:00:00

A conversation the API lists but whose detail answers 404 for ever used to fail every later run and pin its agent's
checkpoint. `reconcile_not_found` counts the runs that met the 404 for each such conversation; after a bound the
reconciler gives it up and says so, in the run record's new `given_up` count and `warnings` (sentences for a
person, also used for agent entries it had to skip).
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import service.storage.tables

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("reconcile_run", sa.Column("given_up", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("reconcile_run", sa.Column("warnings", service.storage.tables.JSONType, nullable=True))
    op.create_table(
        "reconcile_not_found",
        sa.Column("conversation_id", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("last_run_id", sa.Integer(), nullable=False),
        sa.Column("first_at", service.storage.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_at", service.storage.tables.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("conversation_id"),
    )


def downgrade() -> None:
    op.drop_table("reconcile_not_found")
    with op.batch_alter_table("reconcile_run") as batch_op:
        batch_op.drop_column("warnings")
        batch_op.drop_column("given_up")
