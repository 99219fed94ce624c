"""read API indexes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 09:30:00

Indexes for GET /v1/conversations (keyset order: start_time_unix_secs, conversation_id, newest first): the whole
table, and per agent, user and status. On PostgreSQL, GIN (jsonb_path_ops) indexes on dynamic_variables and
labels serve `var.<name>=` / `label.<name>=` containment; SQLite ignores the GIN options and keeps a plain index.
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEYSET = ["start_time_unix_secs", "conversation_id"]


def upgrade() -> None:
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.create_index('ix_conversation_start', KEYSET, unique=False)
        batch_op.create_index('ix_conversation_agent_start', ['agent_id', *KEYSET], unique=False)
        batch_op.create_index('ix_conversation_user_start', ['user_id', *KEYSET], unique=False)
        batch_op.create_index('ix_conversation_status_start', ['status', *KEYSET], unique=False)
        batch_op.create_index(
            'ix_conversation_dynamic_variables',
            ['dynamic_variables'],
            unique=False,
            postgresql_using='gin',
            postgresql_ops={'dynamic_variables': 'jsonb_path_ops'},
        )
        batch_op.create_index(
            'ix_conversation_labels',
            ['labels'],
            unique=False,
            postgresql_using='gin',
            postgresql_ops={'labels': 'jsonb_path_ops'},
        )


def downgrade() -> None:
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        for name in (
            'ix_conversation_labels',
            'ix_conversation_dynamic_variables',
            'ix_conversation_status_start',
            'ix_conversation_user_start',
            'ix_conversation_agent_start',
            'ix_conversation_start',
        ):
            batch_op.drop_index(name)
