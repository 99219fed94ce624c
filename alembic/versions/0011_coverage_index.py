"""coverage index: GET /v1/stats and the console's coverage page read only an index

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 15:00:00

The stats query (service/api/stats.py) counts the conversations started in a window of days, per agent and day,
with four flags each. Through `ix_conversation_start` it found the rows in the index and then read every one of
them from the table (~82,000 heap rows for 30 days at a million conversations, over a second). This index holds
every column the query reads, the start time first (the window is its range), so the database answers from the
index alone: SQLite always, PostgreSQL wherever the visibility map says a page is all-visible. Autovacuum sets
that map, by default after inserts of 20% of the table: at a million conversations, 200,000 new ones, more than
the last 30 days hold, so the very pages the window reads would stay unmarked. The table is therefore vacuumed
after every 1% of new rows (`autovacuum_vacuum_insert_scale_factor`); such a vacuum visits only the pages not yet
marked, so running it often costs little.

The flags are trailing key columns rather than PostgreSQL's INCLUDE: the one declaration in storage/tables.py
then describes the index on both databases (SQLite has no INCLUDE), and since (start, agent) almost never ties,
the extra key columns cost an insert nothing measurable.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_conversation_coverage"
INSERT_SCALE = "autovacuum_vacuum_insert_scale_factor"
COLUMNS = ["start_time_unix_secs", "agent_id", "webhook_received_at", "reconciled_at", "status", "audio_stored"]


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("SET LOCAL statement_timeout = 0")  # a million rows take a while to index
        op.execute(f"ALTER TABLE conversation SET ({INSERT_SCALE} = 0.01)")
    op.create_index(NAME, "conversation", COLUMNS)


def downgrade() -> None:
    op.drop_index(NAME, table_name="conversation")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE conversation RESET ({INSERT_SCALE})")
