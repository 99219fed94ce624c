"""erasure: tombstones of erased conversations, and the erase log

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 12:00:00

`conversation_tombstone` holds the id of each erased conversation and when it was erased, nothing else: the one
write path (record/store.py) stores nothing more of an id found there, so the reconciler, a late webhook and the
broker leave it gone. `erase_log` records each erase batch for audits — who (the CLI or an admin token's position),
when, how many, by which kind of selector — without the ids or the user.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import service.storage.tables

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "conversation_tombstone",
        sa.Column("conversation_id", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("erased_at", service.storage.tables.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("conversation_id"),
    )
    op.create_table(
        "erase_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("erased_at", service.storage.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("actor", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("selector", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("conversations", sa.Integer(), nullable=False),
        sa.Column("tombstones", sa.Integer(), nullable=False),
        sa.Column("audio_files", sa.Integer(), nullable=False),
        sa.Column("webhook_events", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_erase_log_erased_at", "erase_log", ["erased_at"])


def downgrade() -> None:
    op.drop_index("ix_erase_log_erased_at", table_name="erase_log")
    op.drop_table("erase_log")
    op.drop_table("conversation_tombstone")
