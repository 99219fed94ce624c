"""forwarding: the event outbox and its commit-order sequence

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 14:30:00

`forward_event` holds one row per committed change of a conversation, added in the change's own transaction
(forward/outbox.py); `position`, the commit order the feed and the sinks follow, is given afterwards by the
sequencer, whose one row in `forward_sequence` serialises it (forward/feed.py). Existing conversations get no
events: the feed starts with the first change after the upgrade. On PostgreSQL the event bodies (each holds a whole
record) are compressed with lz4 where the server has it, as 0003 does for the other large values.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import service.storage.tables

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "forward_event",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("event_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=True),
        sa.Column("type", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("conversation_id", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("agent_id", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("committed_at", service.storage.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
        sa.UniqueConstraint("position"),
    )
    op.create_index("ix_forward_event_conversation_id", "forward_event", ["conversation_id"])
    op.create_index("ix_forward_event_committed_at", "forward_event", ["committed_at"])
    op.create_index(
        "ix_forward_event_unsequenced",
        "forward_event",
        ["id"],
        postgresql_where=sa.text("position IS NULL"),
        sqlite_where=sa.text("position IS NULL"),
    )
    op.create_table(
        "forward_sequence",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("last", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.execute("INSERT INTO forward_sequence (name, last) VALUES ('events', 0)")
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        enumvals = bind.execute(
            sa.text("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'")
        ).scalar()
        if enumvals and "lz4" in enumvals:
            op.execute('ALTER TABLE forward_event ALTER COLUMN "body" SET COMPRESSION lz4')


def downgrade() -> None:
    op.drop_table("forward_sequence")
    op.drop_index("ix_forward_event_unsequenced", table_name="forward_event")
    op.drop_index("ix_forward_event_committed_at", table_name="forward_event")
    op.drop_index("ix_forward_event_conversation_id", table_name="forward_event")
    op.drop_table("forward_event")
