"""search: the full-text index of transcripts, summaries and titles

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 09:00:00

`q=` on GET /v1/conversations (service/search/). PostgreSQL: `conversation_search` holds each conversation's folded
words as a tsvector, with a GIN index. SQLite: `conversation_search` maps a conversation to the rowid of its FTS5
entry in `conversation_search_fts`. Why beside `conversation` and not in it, and why the words come folded from
Python rather than from the databases' own parsers: service/search/index.py.

Every stored record gets its entry here (`index.rebuild`, in batches of 1,000 by conversation_id); on PostgreSQL
the GIN index is built after that, in one pass, which is faster than growing it entry by entry. The figures for a
million conversations are in the README (Performance).
"""

from collections.abc import Sequence

from alembic import op
from service.search import index

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("SET LOCAL statement_timeout = 0")  # the backfill and the GIN index take a while on a big table
        op.execute(
            "CREATE TABLE conversation_search ( conversation_id VARCHAR(256) PRIMARY KEY, document tsvector NOT NULL)"
        )
        index.rebuild(bind)
        op.execute("CREATE INDEX ix_conversation_search_document ON conversation_search USING gin (document)")
        return
    op.execute(
        "CREATE TABLE conversation_search ( id INTEGER PRIMARY KEY, conversation_id VARCHAR(256) NOT NULL UNIQUE)"
    )
    op.execute(
        "CREATE VIRTUAL TABLE conversation_search_fts"
        " USING fts5(document, tokenize = 'ascii', detail = none, columnsize = 0)"
    )
    index.rebuild(bind)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        op.execute("DROP TABLE conversation_search_fts")
    op.execute("DROP TABLE conversation_search")
