"""reconcile: audio tries across runs, the run's `audio_failed` count and the post-call webhook's health

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 12:00:00

An audio fetch that failed used to hold its agent's checkpoint and fail every later run. Now it never holds the
checkpoint: `reconcile_audio_attempt` counts the runs that tried it, later runs try again, and after a bound the
reconciler gives it up and counts it in the run record's new `audio_failed`. Each run also reads the workspace's
post-call webhook from ElevenLabs: `upstream_webhook_healthy` keeps what it found (null when it could not tell),
for the `postcall_upstream_webhook_healthy` gauge.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import service.storage.tables

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("reconcile_run", sa.Column("audio_failed", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("reconcile_run", sa.Column("upstream_webhook_healthy", sa.Boolean(), nullable=True))
    op.create_table(
        "reconcile_audio_attempt",
        sa.Column("conversation_id", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("tries", sa.Integer(), nullable=False),
        sa.Column("last_run_id", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("first_at", service.storage.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_at", service.storage.tables.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("conversation_id"),
    )


def downgrade() -> None:
    op.drop_table("reconcile_audio_attempt")
    with op.batch_alter_table("reconcile_run") as batch_op:
        batch_op.drop_column("upstream_webhook_healthy")
        batch_op.drop_column("audio_failed")
