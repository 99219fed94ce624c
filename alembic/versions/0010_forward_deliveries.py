"""forwarding: sinks, deliveries and attempts

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 15:30:00

`forward_sink` holds each sink's fan-out cursor over the feed and its last news; `forward_delivery` one row per
event and sink (pending, delivered or dead, with its claim); `forward_attempt` one row per try. Deliveries and
attempts go with their event (ON DELETE CASCADE), so retention and erasure delete an event and nothing is left
pointing at it. Existing events are fanned out to each sink when its dispatcher first runs.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import service.storage.tables

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTC = service.storage.tables.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "forward_sink",
        sa.Column("sink", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("cursor", sa.BigInteger(), nullable=False),
        sa.Column("last_success_at", UTC, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_error_at", UTC, nullable=True),
        sa.PrimaryKeyConstraint("sink"),
    )
    op.create_table(
        "forward_delivery",
        sa.Column("id", BigId, nullable=False),
        sa.Column("event", BigId, nullable=False),
        sa.Column("sink", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("conversation_id", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("committed_at", UTC, nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("first_attempt_at", UTC, nullable=True),
        sa.Column("next_attempt_at", UTC, nullable=False),
        sa.Column("claimed_until", UTC, nullable=True),
        sa.Column("claimed_by", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("delivered_at", UTC, nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["event"], ["forward_event.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event", "sink", name="uq_forward_delivery_event_sink"),
    )
    op.create_index("ix_forward_delivery_due", "forward_delivery", ["sink", "status", "next_attempt_at"])
    op.create_index(
        "ix_forward_delivery_conversation", "forward_delivery", ["sink", "conversation_id", "status", "position"]
    )
    op.create_table(
        "forward_attempt",
        sa.Column("id", BigId, nullable=False),
        sa.Column("delivery", BigId, nullable=False),
        sa.Column("attempted_at", UTC, nullable=False),
        sa.Column("outcome", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("latency_seconds", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", UTC, nullable=True),
        sa.ForeignKeyConstraint(["delivery"], ["forward_delivery.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_forward_attempt_delivery", "forward_attempt", ["delivery"])


def downgrade() -> None:
    op.drop_index("ix_forward_attempt_delivery", table_name="forward_attempt")
    op.drop_table("forward_attempt")
    op.drop_index("ix_forward_delivery_conversation", table_name="forward_delivery")
    op.drop_index("ix_forward_delivery_due", table_name="forward_delivery")
    op.drop_table("forward_delivery")
    op.drop_table("forward_sink")
