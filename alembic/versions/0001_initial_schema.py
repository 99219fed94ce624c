"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-25 06:15:43.025581
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

import service.storage.tables

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('conversation',
    sa.Column('conversation_id', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('agent_id', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=True),
    sa.Column('branch_id', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
    sa.Column('start_time_unix_secs', sa.BigInteger(), nullable=True),
    sa.Column('call_duration_secs', sa.Float(), nullable=True),
    sa.Column('call_successful', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('transcript_summary', sa.Text(), nullable=True),
    sa.Column('termination_reason', sa.Text(), nullable=True),
    sa.Column('main_language', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('initiation_source', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('failure_reason', sa.Text(), nullable=True),
    sa.Column('dynamic_variables', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('labels', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('transcript', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('analysis', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('metadata', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('has_audio', sa.Boolean(), nullable=False),
    sa.Column('audio_path', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
    sa.Column('audio_bytes', sa.BigInteger(), nullable=True),
    sa.Column('first_seen_via', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('first_seen_at', service.storage.tables.UTCDateTime(timezone=True), nullable=False),
    sa.Column('webhook_received_at', service.storage.tables.UTCDateTime(timezone=True), nullable=True),
    sa.Column('audio_received_at', service.storage.tables.UTCDateTime(timezone=True), nullable=True),
    sa.Column('reconciled_at', service.storage.tables.UTCDateTime(timezone=True), nullable=True),
    sa.Column('complete', sa.Boolean(), nullable=False),
    sa.Column('data_rank', sa.Integer(), nullable=False),
    sa.Column('updated_at', service.storage.tables.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('conversation_id')
    )
    op.create_table('reconcile_checkpoint',
    sa.Column('agent_id', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('checkpoint_unix', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', service.storage.tables.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('agent_id')
    )
    op.create_table('reconcile_lease',
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('holder', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('acquired_at', service.storage.tables.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', service.storage.tables.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('reconcile_run',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('started_at', service.storage.tables.UTCDateTime(timezone=True), nullable=False),
    sa.Column('finished_at', service.storage.tables.UTCDateTime(timezone=True), nullable=True),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('holder', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('dry_run', sa.Boolean(), nullable=False),
    sa.Column('agents', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('window_start_unix', sa.BigInteger(), nullable=True),
    sa.Column('window_end_unix', sa.BigInteger(), nullable=True),
    sa.Column('listed', sa.Integer(), nullable=False),
    sa.Column('new', sa.Integer(), nullable=False),
    sa.Column('updated', sa.Integer(), nullable=False),
    sa.Column('details_fetched', sa.Integer(), nullable=False),
    sa.Column('audio_fetched', sa.Integer(), nullable=False),
    sa.Column('failed', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('reconcile_run', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reconcile_run_started_at'), ['started_at'], unique=False)

    op.create_table('webhook_event',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('body_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('event_type', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('conversation_id', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
    sa.Column('received_at', service.storage.tables.UTCDateTime(timezone=True), nullable=False),
    sa.Column('body_bytes', sa.BigInteger(), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('body_sha256')
    )
    with op.batch_alter_table('webhook_event', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_webhook_event_conversation_id'), ['conversation_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('webhook_event', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_webhook_event_conversation_id'))

    op.drop_table('webhook_event')
    with op.batch_alter_table('reconcile_run', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reconcile_run_started_at'))

    op.drop_table('reconcile_run')
    op.drop_table('reconcile_lease')
    op.drop_table('reconcile_checkpoint')
    op.drop_table('conversation')
