"""record fidelity: the fields ElevenLabs sends, filled from what the database already holds

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 10:00:00

Columns (record/fields.py): agent_name, version_id, environment, call_summary_title, phone_number, direction,
batch_call_id, conversation_initiation_client_data, ElevenLabs' own has_audio / has_user_audio /
has_response_audio, and revision. The old `has_audio` ("postcall holds the audio") is renamed `audio_stored`, and
`call_duration_secs` becomes a JSON number kept as written (an integer stays an integer; storage/tables.py
JSONNumber).

Filled, in batches of conversations (never the whole table in memory), from what existing databases hold: the stored
`metadata` (phone call, batch call, the exact duration), `analysis` (summary title) and the archived webhook bodies
(`webhook_event.body`): the newest `post_call_transcription` of a conversation brings agent_name, version_id,
environment, the has_* flags and the client data; a `call_initiation_failure` its client data and, for a record
without a start time, its `event_timestamp` as the start. Conversations only ever described by a detail fetch keep
nulls where the detail's top-level fields were not stored. `revision` starts at 1.

`data_rank` changes meaning (record/merge.py): `done` now ranks above `failed`, so a failure webhook no longer
outranks what a transcription of a conversation that took place brought, and the sources' richness is renumbered
(session/audio 0, OTel 1, summary 2, detail 3, failure webhook 4, transcription 5). Old ranks are mapped onto the new
scale; an old 43 is a failure webhook's when the conversation has an archived failure and no archived transcription.
`complete` is recomputed from the new rank: a failed list summary alone is no longer the full detail, so the next
reconcile fetches that conversation's detail (once).

The extraction below is this migration's own copy of record/payloads.py as it stands at this revision: a migration
must give the same result however the application's code changes later.

Indexes: (phone_number, start, id) and (batch_call_id, start, id), which narrow sharply; environment and the
audio flags have few values shared by most conversations and get none.

Columns are renamed and dropped in place (`ALTER TABLE … RENAME COLUMN` / `DROP COLUMN`, SQLite 3.35 or later, which
every supported Python ships), so SQLite never copies the table.
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 200
KEYSET = ["start_time_unix_secs", "conversation_id"]
JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
CLIENT_DATA_TYPE = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def new_columns() -> list[sa.Column[Any]]:
    """Fresh Column objects each time: a Column belongs to the one table it is added to."""
    return [
        sa.Column("agent_name", sa.Text(), nullable=True),
        sa.Column("version_id", sa.String(256), nullable=True),
        sa.Column("environment", sa.String(256), nullable=True),
        sa.Column("call_summary_title", sa.Text(), nullable=True),
        sa.Column("phone_number", sa.String(256), nullable=True),
        sa.Column("direction", sa.String(16), nullable=True),
        sa.Column("batch_call_id", sa.String(256), nullable=True),
        sa.Column("conversation_initiation_client_data", JSON_TYPE, nullable=True),
        sa.Column("has_audio", sa.Boolean(), nullable=True),
        sa.Column("has_user_audio", sa.Boolean(), nullable=True),
        sa.Column("has_response_audio", sa.Boolean(), nullable=True),
        # The server default gives every existing record its first revision.
        sa.Column("revision", sa.BigInteger(), nullable=False, server_default=sa.text("1")),
    ]


# Bounded columns: a longer value is not kept (as record/payloads.py `fits`); phone_number and batch_call_id are
# in btree indexes, 256 characters of at most 4 bytes each fit PostgreSQL's entry limit.
LIMITS = {"version_id": 256, "environment": 256, "phone_number": 256, "batch_call_id": 256}
DIRECTIONS = ("inbound", "outbound")
TRANSCRIPTION, FAILURE = "post_call_transcription", "call_initiation_failure"

# data_rank = status rank * 10 + source richness. Status ranks: done was 3 and failed 4, now failed 3 and done 4.
# Richness: session/audio 0, summary 1, detail 2, transcription and failure webhooks 3 before; now session/audio 0,
# OTel 1, summary 2, detail 3, failure webhook 4, transcription 5.
OLD_STATUS_TO_NEW = {3: 4, 4: 3}
OLD_RICHNESS_TO_NEW = {0: 0, 1: 2, 2: 3, 3: 5}
NEW_RICHNESS_TO_OLD = {0: 0, 1: 0, 2: 1, 3: 2, 4: 3, 5: 3}
FAILURE_RANK = 34  # a failure webhook's data: failed (3), richness 4
FINAL_STATUS_RANK, COMPLETE_RICHNESS = 3, 3  # final, from a detail or richer
OLD_COMPLETE_RANK = 32


def new_rank(old: int, from_failure_webhook: bool) -> int:
    if old == 43 and from_failure_webhook:
        return FAILURE_RANK
    status, richness = divmod(old, 10)
    return OLD_STATUS_TO_NEW.get(status, status) * 10 + OLD_RICHNESS_TO_NEW.get(richness, richness)


def old_rank(new: int) -> int:
    status, richness = divmod(new, 10)
    return OLD_STATUS_TO_NEW.get(status, status) * 10 + NEW_RICHNESS_TO_OLD.get(richness, richness)


def is_complete(rank: int) -> bool:
    status, richness = divmod(rank, 10)
    return status >= FINAL_STATUS_RANK and richness >= COMPLETE_RICHNESS


# --- upgrade -----------------------------------------------------------------------------------------------------


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("SET LOCAL statement_timeout = 0")  # the fill and the indexes may take a while on a big table
    op.execute("ALTER TABLE conversation RENAME COLUMN has_audio TO audio_stored")
    for column in new_columns():
        op.add_column("conversation", column)
    op.add_column("conversation", sa.Column("call_duration_json", sa.String(32), nullable=True))
    _fill(bind)
    op.drop_column("conversation", "call_duration_secs")
    op.execute("ALTER TABLE conversation RENAME COLUMN call_duration_json TO call_duration_secs")
    op.create_index("ix_conversation_phone_start", "conversation", ["phone_number", *KEYSET])
    op.create_index("ix_conversation_batch_start", "conversation", ["batch_call_id", *KEYSET])
    if bind.dialect.name == "postgresql" and _server_has_lz4(bind):
        op.execute('ALTER TABLE conversation ALTER COLUMN "conversation_initiation_client_data" SET COMPRESSION lz4')


def _fill(bind: sa.engine.Connection) -> None:
    update = sa.text(
        "UPDATE conversation SET agent_name = :agent_name, version_id = :version_id, environment = :environment,"
        " call_summary_title = :call_summary_title, phone_number = :phone_number, direction = :direction,"
        " batch_call_id = :batch_call_id, conversation_initiation_client_data = :client_data,"
        " has_audio = :has_audio, has_user_audio = :has_user_audio, has_response_audio = :has_response_audio,"
        " start_time_unix_secs = :start, call_duration_json = :duration, data_rank = :data_rank,"
        " complete = :complete WHERE conversation_id = :conversation_id"
    ).bindparams(sa.bindparam("client_data", type_=CLIENT_DATA_TYPE))
    for rows in _batches(bind):
        bodies = _bodies(bind, [row["conversation_id"] for row in rows])
        bind.execute(update, [_filled(row, bodies.get(row["conversation_id"], {})) for row in rows])


def _batches(bind: sa.engine.Connection) -> Iterator[list[Mapping[str, Any]]]:
    """The conversations in id order, BATCH at a time (keyset: each batch is one short index range scan)."""
    query = sa.text(
        "SELECT conversation_id, status, data_rank, start_time_unix_secs, call_duration_secs, metadata, analysis"
        " FROM conversation WHERE conversation_id > :after ORDER BY conversation_id LIMIT :limit"
    )
    after = ""
    while True:
        rows = list(bind.execute(query, {"after": after, "limit": BATCH}).mappings())
        if not rows:
            return
        yield rows
        after = rows[-1]["conversation_id"]


def _bodies(bind: sa.engine.Connection, ids: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """conversation_id → event type → the newest archived body of that type (transcription, failure)."""
    query = sa.text(
        "SELECT conversation_id, event_type, body FROM webhook_event"
        " WHERE conversation_id IN :ids AND event_type IN :types AND body IS NOT NULL ORDER BY id"
    ).bindparams(sa.bindparam("ids", expanding=True), sa.bindparam("types", expanding=True))
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for row in bind.execute(query, {"ids": ids, "types": [TRANSCRIPTION, FAILURE]}).mappings():
        try:
            body = orjson.loads(bytes(row["body"]))
        except orjson.JSONDecodeError:
            continue  # not what the receiver accepted: nothing to learn from it
        if isinstance(body, dict):
            found.setdefault(row["conversation_id"], {})[row["event_type"]] = _without_nul(body)
    return found


def _filled(row: Mapping[str, Any], bodies: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    transcription = _obj(bodies.get(TRANSCRIPTION, {}).get("data")) or {}
    failure_body = bodies.get(FAILURE, {})
    failure = _obj(failure_body.get("data")) or {}
    metadata, analysis = _obj(_json(row["metadata"])) or {}, _obj(_json(row["analysis"])) or {}
    client = _obj(transcription.get("conversation_initiation_client_data"))
    if client is None:
        client = _obj(failure.get("conversation_initiation_client_data"))
    from_failure = bool(failure) and not transcription
    start = row["start_time_unix_secs"]
    if start is None and failure:
        start = _int(failure_body.get("event_timestamp"))
    rank = new_rank(row["data_rank"], from_failure)
    return {
        "conversation_id": row["conversation_id"],
        "agent_name": _str(transcription.get("agent_name")),
        "version_id": _bounded(transcription.get("version_id"), "version_id"),
        "environment": _bounded(transcription.get("environment"), "environment")
        or _bounded((client or {}).get("environment"), "environment"),
        "call_summary_title": _str(analysis.get("call_summary_title")),
        **_call_fields(metadata),
        "client_data": client,
        "has_audio": _bool(transcription.get("has_audio")),
        "has_user_audio": _bool(transcription.get("has_user_audio")),
        "has_response_audio": _bool(transcription.get("has_response_audio")),
        "start": start,
        "duration": _duration(metadata.get("call_duration_secs"), row["call_duration_secs"]),
        "data_rank": rank,
        "complete": is_complete(rank),
    }


def _call_fields(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """phone_number, direction, batch_call_id from a detail's metadata, or from a failure's `{type, body}`."""
    phone_call = _obj(metadata.get("phone_call")) or {}
    batch_call = _obj(metadata.get("batch_call")) or {}
    found = {
        "phone_number": _bounded(phone_call.get("external_number"), "phone_number"),
        "direction": phone_call.get("direction") if phone_call.get("direction") in DIRECTIONS else None,
        "batch_call_id": _bounded(batch_call.get("batch_call_id"), "batch_call_id"),
    }
    body = _obj(metadata.get("body")) or {}
    if metadata.get("type") == "sip":
        found.update(direction="outbound", phone_number=_bounded(body.get("to_number"), "phone_number"))
    elif metadata.get("type") == "twilio" and isinstance(body.get("Direction"), str):
        outbound = body["Direction"].startswith("outbound")
        if outbound or body["Direction"] == "inbound":
            number = body.get("To") if outbound else body.get("From")
            found.update(direction="outbound" if outbound else "inbound", phone_number=_bounded(number, "phone_number"))
    return found


def _duration(sent: Any, stored: float | None) -> str | None:
    """The stored duration as JSON text, typed as the stored metadata has it when that is the same value (a
    summary may have brought a later one), else a whole number as an integer: ElevenLabs' durations are."""
    if stored is None:
        return None
    if isinstance(sent, int | float) and not isinstance(sent, bool) and sent == stored:
        return repr(sent)
    return repr(int(stored)) if float(stored).is_integer() and abs(stored) < 2**63 else repr(float(stored))


def _json(value: Any) -> Any:
    """A JSON column's value: PostgreSQL's driver decodes jsonb, SQLite gives the text."""
    if isinstance(value, str | bytes):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
    return value


def _obj(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and _storable(value) else None


def _bounded(value: Any, column: str) -> str | None:
    return value if isinstance(value, str) and len(value) <= LIMITS[column] and _storable(value) else None


def _storable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: neither database can store it
        return False
    return True


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63 else None


def _without_nul(value: Any) -> Any:
    """As the receiver stores text: PostgreSQL cannot hold NUL, so it reads as U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(key): _without_nul(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    return value


def _server_has_lz4(bind: sa.engine.Connection) -> bool:
    enumvals = bind.execute(
        sa.text("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'")
    ).scalar()
    return bool(enumvals) and "lz4" in enumvals


# --- downgrade ---------------------------------------------------------------------------------------------------


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("SET LOCAL statement_timeout = 0")
    op.drop_index("ix_conversation_batch_start", "conversation")
    op.drop_index("ix_conversation_phone_start", "conversation")
    op.add_column("conversation", sa.Column("call_duration_float", sa.Float(), nullable=True))
    _unfill(bind)
    op.drop_column("conversation", "call_duration_secs")
    op.execute("ALTER TABLE conversation RENAME COLUMN call_duration_float TO call_duration_secs")
    for column in reversed(new_columns()):
        op.drop_column("conversation", column.name)
    op.execute("ALTER TABLE conversation RENAME COLUMN audio_stored TO has_audio")


def _unfill(bind: sa.engine.Connection) -> None:
    """Durations back to floats and ranks back to the old scale, batch by batch."""
    query = sa.text(
        "SELECT conversation_id, data_rank, call_duration_secs FROM conversation"
        " WHERE conversation_id > :after ORDER BY conversation_id LIMIT :limit"
    )
    update = sa.text(
        "UPDATE conversation SET call_duration_float = :duration, data_rank = :data_rank, complete = :complete"
        " WHERE conversation_id = :conversation_id"
    )
    after = ""
    while rows := list(bind.execute(query, {"after": after, "limit": BATCH}).mappings()):
        values = []
        for row in rows:
            rank = old_rank(row["data_rank"])
            duration = row["call_duration_secs"]
            values.append(
                {
                    "conversation_id": row["conversation_id"],
                    "duration": None if duration is None else float(duration),
                    "data_rank": rank,
                    "complete": rank >= OLD_COMPLETE_RANK,
                }
            )
        bind.execute(update, values)
        after = rows[-1]["conversation_id"]
