"""lz4 for the large values on PostgreSQL

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 15:30:00

Every transcription webhook stores two ~20 KB values: the archived raw body and the transcript. PostgreSQL
compresses values that large out of line (TOAST), by default with pglz, and that compression was the largest
server-side cost of an ingest batch. lz4 compresses several times faster at a similar ratio: in the ingest
benchmark it raised durable webhooks per second by 8-17%. Only new values are written with lz4; existing ones stay
readable as they are. Servers built without lz4 keep pglz; SQLite stores values uncompressed and is untouched.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LARGE_COLUMNS = {
    "conversation": ("transcript", "analysis", "metadata"),
    "webhook_event": ("body",),
}


def _set_compression(method: str) -> None:
    for table, columns in LARGE_COLUMNS.items():
        for column in columns:
            op.execute(f'ALTER TABLE {table} ALTER COLUMN "{column}" SET COMPRESSION {method}')


def _server_has_lz4() -> bool:
    enumvals = (
        op.get_bind()
        .execute(sa.text("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'"))
        .scalar()
    )
    return bool(enumvals) and "lz4" in enumvals


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql" and _server_has_lz4():
        _set_compression("lz4")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _set_compression("pglz")
