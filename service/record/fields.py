"""The conversation record's fields, declared once, each with its merge rule. Pure.

Each field is named as the read API serves it, which is also its column's name in `conversation`. Everything that
needs the list derives it from `FIELDS`: how each field merges (record/merge.py applies `rule`), what counts as a
content change that adds one to `revision`, a new record's values, the read API's columns, JSON shapes and
exact-match filters (api/reads.py, api/query_params.py), the OpenAPI schemas and parameters (api/openapi.py), and
what the reconciler compares to tell an update from a mere sighting (reconcile/reconciler.py).

The columns stay written out in storage/tables.py, a SQLModel class like every other table: that is what a
migration is written against and what Alembic compares, and building them from this list would turn
`conversation` into the one table declared another way. tests/test_fields.py keeps the columns, this list and the
migrations in agreement instead. So a new field a source carries is an entry here (where it should stand in the
answer; its rule defaults to RANKED), its column in storage/tables.py, a migration that adds that column, and the
payload code that reads it (record/payloads.py); a test fails until the first three agree.

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
    NUMBER = "number"  # an integer or a float, each kept as sent (22 stays 22, 22.5 stays 22.5)
    BOOLEAN = "boolean"
    OBJECT = "object"  # a JSON object, kept as the source sent it
    LIST = "list"  # a JSON array of objects (a transcript's turns)
    TIMESTAMP = "timestamp"  # stored UTC, served ISO-8601


class Rule(StrEnum):
    """How a field merges (record/merge.py has one function per rule)."""

    IDENTITY = "identity"  # set when the record is created, never changed
    RANKED = "ranked"  # carried by sources: replaced by one of at least the data's rank, else only filled if empty
    STATUS = "status"  # a final status never goes back; between two final ones the richer source's wins
    KEYWISE = "keywise"  # an object merged key by key (labels)
    FIRST_SEEN = "first_seen"  # the channel of the earliest observation
    WEBHOOK_TIME = "webhook_time"  # the earliest webhook's receipt time
    AUDIO_TIME = "audio_time"  # when audio was first stored
    RECONCILE_TIME = "reconcile_time"  # the latest listing or fetch by the reconciler
    AUDIO_STORED = "audio_stored"  # becomes true when audio is stored (purge clears it)
    COMPLETE = "complete"  # derived from the rank of the data applied
    REVISION = "revision"  # 1, then one more for each committed content change (record/store.py)


# A new value of these alone is no content change: provenance timestamps, and the count of changes itself.
NOT_REVISED = frozenset({Rule.WEBHOOK_TIME, Rule.AUDIO_TIME, Rule.RECONCILE_TIME, Rule.REVISION})


@dataclass(frozen=True)
class RecordField:
    name: str
    kind: Kind
    description: str
    rule: Rule = Rule.RANKED
    max_length: int | None = None  # TEXT only: the longest value the column holds
    nullable: bool = True
    detail_only: bool = False  # served by GET /v1/conversations/{id} only, not in the list
    choices: tuple[str, ...] = ()  # the only values it takes, when that is a closed set
    default: Any = None  # a new record's value until a source sets it (merge sets the id and first_seen_via)
    filter: bool = False  # `GET /v1/conversations?<name>=` matches it exactly (text) or as true/false (boolean)

    @property
    def is_json(self) -> bool:
        return self.kind in (Kind.OBJECT, Kind.LIST)

    @property
    def content(self) -> bool:
        """A source may carry it (Observation.fields)."""
        return self.rule is Rule.RANKED

    @property
    def revises(self) -> bool:
        """A new value of it is a content change: `revision` goes up by one."""
        return self.rule not in NOT_REVISED


def _text(name: str, max_length: int | None, description: str, **options: Any) -> RecordField:
    return RecordField(name, Kind.TEXT, description, max_length=max_length, **options)


def _flag(name: str, description: str) -> RecordField:
    return RecordField(name, Kind.BOOLEAN, description)


FIELDS: tuple[RecordField, ...] = (
    _text("conversation_id", 256, "ElevenLabs' id of the conversation", rule=Rule.IDENTITY, nullable=False),
    _text("agent_id", 256, "the agent that held the conversation", filter=True),
    _text("agent_name", None, "the agent's name when the conversation ran, as ElevenLabs sent it"),
    _text("status", 32, "initiated, in-progress, processing, done or failed", rule=Rule.STATUS, filter=True),
    _text("user_id", 1024, "the user_id given when the conversation started", filter=True),
    _text("branch_id", 256, "the agent branch the conversation ran on"),
    _text("version_id", 256, "the agent version the conversation ran on"),
    _text("environment", 256, "the environment the conversation ran in (ElevenLabs' environment)", filter=True),
    RecordField(
        "start_time_unix_secs",
        Kind.INTEGER,
        "when the call started (unix seconds); for a failed initiation that carries none, the failure event's time",
    ),
    RecordField("call_duration_secs", Kind.NUMBER, "how long the call lasted, in seconds, as ElevenLabs sent it"),
    _text("call_successful", 32, "success, failure or unknown", filter=True),
    _text("call_summary_title", None, "ElevenLabs' short title of the conversation"),
    _text("transcript_summary", None, "ElevenLabs' summary of the transcript"),
    _text("termination_reason", None, "why the call ended, in ElevenLabs' words"),
    _text("main_language", 64, "the conversation's main language"),
    _text("initiation_source", 128, "what started the conversation (ElevenLabs' initiation source)"),
    _text("failure_reason", None, "why the call could not be initiated (call_initiation_failure)"),
    # 256 characters: an E.164 number or a SIP URI; it is in a btree index, so bounded (see record/payloads.py).
    _text("phone_number", 256, "the other party's number on a phone call", filter=True),
    _text("direction", 16, "inbound or outbound, on a phone call", choices=("inbound", "outbound")),
    _text("batch_call_id", 256, "the batch call that placed the call", filter=True),
    RecordField("dynamic_variables", Kind.OBJECT, "the dynamic variables the conversation started with"),
    RecordField(
        "labels", Kind.OBJECT, "the labels given when the session was created (POST /v1/sessions)", rule=Rule.KEYWISE
    ),
    RecordField(
        "has_audio", Kind.BOOLEAN, "ElevenLabs says the conversation has audio (its own flag, as sent)", filter=True
    ),
    _flag("has_user_audio", "ElevenLabs says the user's audio is available (its own flag, as sent)"),
    _flag("has_response_audio", "ElevenLabs says the agent's audio is available (its own flag, as sent)"),
    RecordField(
        "audio_stored",
        Kind.BOOLEAN,
        "postcall holds the audio and serves it at /v1/conversations/{id}/audio",
        rule=Rule.AUDIO_STORED,
        nullable=False,
        default=False,
        filter=True,
    ),
    _text(
        "first_seen_via",
        16,
        "how postcall first learnt of the conversation",
        rule=Rule.FIRST_SEEN,
        nullable=False,
        choices=("webhook", "reconcile", "session"),
    ),
    RecordField("webhook_received_at", Kind.TIMESTAMP, "when its first webhook arrived", rule=Rule.WEBHOOK_TIME),
    RecordField("audio_received_at", Kind.TIMESTAMP, "when its audio was first stored", rule=Rule.AUDIO_TIME),
    RecordField(
        "reconciled_at", Kind.TIMESTAMP, "when the reconciler last listed or fetched it", rule=Rule.RECONCILE_TIME
    ),
    RecordField(
        "complete",
        Kind.BOOLEAN,
        "the full detail is stored: a transcription webhook, a detail fetch, or a failed initiation's own webhook",
        rule=Rule.COMPLETE,
        nullable=False,
        default=False,
    ),
    RecordField(
        "revision",
        Kind.INTEGER,
        "1 when stored first, then one more for each committed change of any other field but the *_at times",
        rule=Rule.REVISION,
        nullable=False,
        default=1,
    ),
    RecordField("transcript", Kind.LIST, "the turns, as ElevenLabs sent them", detail_only=True),
    RecordField(
        "analysis",
        Kind.OBJECT,
        "ElevenLabs' analysis (evaluation criteria, data collection results), as sent",
        detail_only=True,
    ),
    RecordField("metadata", Kind.OBJECT, "ElevenLabs' metadata of the conversation, as sent", detail_only=True),
    RecordField(
        "conversation_initiation_client_data",
        Kind.OBJECT,
        "what the conversation was started with (dynamic variables, overrides, source), as ElevenLabs sent it",
        detail_only=True,
    ),
)

LISTED: tuple[RecordField, ...] = tuple(field for field in FIELDS if not field.detail_only)
DETAIL_ONLY: tuple[RecordField, ...] = tuple(field for field in FIELDS if field.detail_only)
BY_NAME: dict[str, RecordField] = {field.name: field for field in FIELDS}
FILTERS: tuple[RecordField, ...] = tuple(field for field in FIELDS if field.filter)
