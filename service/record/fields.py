"""The conversation record's fields, declared once. Pure.

Each field is named as the read API serves it, which is also its column's name in `conversation`. Everything that
needs the list derives it from `FIELDS`: merge's content fields and a new record's values (record/merge.py), the
read API's columns and JSON shapes (api/reads.py), the OpenAPI schemas (api/openapi.py), and what the reconciler
compares to tell an update from a mere sighting (reconcile/reconciler.py).

The columns stay written out in storage/tables.py, a SQLModel class like every other table: that is what a
migration is written against and what Alembic compares, and building them from this list would turn
`conversation` into the one table declared another way. tests/test_fields.py keeps the columns, this list and the
migrations in agreement instead. So a new field is an entry here (where it should stand in the answer), its column
in storage/tables.py, and a migration that adds that column; a test fails until all three agree.

The list answer holds every field that is not `detail_only`, in this order; the single-record answer adds the
`detail_only` ones after them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Kind(StrEnum):
    TEXT = "text"  # a string; `max_length` bounds it, None for unbounded text
    INTEGER = "integer"  # 64-bit: ElevenLabs' integers (unix seconds) stay integers
    NUMBER = "number"
    BOOLEAN = "boolean"
    OBJECT = "object"  # a JSON object, kept as the source sent it
    LIST = "list"  # a JSON array of objects (a transcript's turns)
    TIMESTAMP = "timestamp"  # stored UTC, served ISO-8601


@dataclass(frozen=True)
class RecordField:
    name: str
    kind: Kind
    description: str
    max_length: int | None = None  # TEXT only: the longest value the column holds
    nullable: bool = True
    content: bool = False  # a source may carry it: merge applies it by source rank (record/merge.py)
    detail_only: bool = False  # served by GET /v1/conversations/{id} only, not in the list
    choices: tuple[str, ...] = ()  # the only values it takes, when that is a closed set
    default: Any = None  # a new record's value until a source sets it (merge sets the id and first_seen_via)

    @property
    def is_json(self) -> bool:
        return self.kind in (Kind.OBJECT, Kind.LIST)


def _text(name: str, max_length: int | None, description: str, **options: Any) -> RecordField:
    return RecordField(name, Kind.TEXT, description, max_length=max_length, **options)


FIELDS: tuple[RecordField, ...] = (
    _text("conversation_id", 256, "ElevenLabs' id of the conversation", nullable=False),
    _text("agent_id", 256, "the agent that held the conversation", content=True),
    _text("status", 32, "initiated, in-progress, processing, done or failed"),
    _text("user_id", 1024, "the user_id given when the conversation started", content=True),
    _text("branch_id", 256, "the agent branch the conversation ran on", content=True),
    RecordField("start_time_unix_secs", Kind.INTEGER, "when the call started (unix seconds)", content=True),
    RecordField("call_duration_secs", Kind.NUMBER, "how long the call lasted, in seconds", content=True),
    _text("call_successful", 32, "success, failure or unknown", content=True),
    _text("transcript_summary", None, "ElevenLabs' summary of the transcript", content=True),
    _text("termination_reason", None, "why the call ended, in ElevenLabs' words", content=True),
    _text("main_language", 64, "the conversation's main language", content=True),
    _text("initiation_source", 128, "what started the conversation (ElevenLabs' initiation source)", content=True),
    _text("failure_reason", None, "why the call could not be initiated (call_initiation_failure)", content=True),
    RecordField("dynamic_variables", Kind.OBJECT, "the dynamic variables the conversation started with", content=True),
    RecordField("labels", Kind.OBJECT, "the labels given when the session was created (POST /v1/sessions)"),
    RecordField("has_audio", Kind.BOOLEAN, "audio is stored and served by /audio", nullable=False, default=False),
    _text(
        "first_seen_via",
        16,
        "how postcall first learnt of the conversation",
        nullable=False,
        choices=("webhook", "reconcile", "session"),
    ),
    RecordField("webhook_received_at", Kind.TIMESTAMP, "when its first webhook arrived"),
    RecordField("audio_received_at", Kind.TIMESTAMP, "when its audio was first stored"),
    RecordField("reconciled_at", Kind.TIMESTAMP, "when the reconciler last listed or fetched it"),
    RecordField(
        "complete",
        Kind.BOOLEAN,
        "the full detail (transcript, analysis) is stored",
        nullable=False,
        default=False,
    ),
    RecordField("transcript", Kind.LIST, "the turns, as ElevenLabs sent them", content=True, detail_only=True),
    RecordField(
        "analysis",
        Kind.OBJECT,
        "ElevenLabs' analysis (evaluation criteria, data collection results), as sent",
        content=True,
        detail_only=True,
    ),
    RecordField(
        "metadata", Kind.OBJECT, "ElevenLabs' metadata of the conversation, as sent", content=True, detail_only=True
    ),
)

LISTED: tuple[RecordField, ...] = tuple(field for field in FIELDS if not field.detail_only)
DETAIL_ONLY: tuple[RecordField, ...] = tuple(field for field in FIELDS if field.detail_only)
BY_NAME: dict[str, RecordField] = {field.name: field for field in FIELDS}
