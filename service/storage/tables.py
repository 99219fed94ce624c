"""The tables. Schema changes go through Alembic migrations (alembic/versions), never `create_all`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timestamps stored as UTC and always read back timezone-aware (SQLite keeps no zone of its own)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JSONNumber(sa.TypeDecorator[int | float]):
    """A JSON number kept exactly as sent: 22 reads back as the integer 22, 22.0 and 22.5 as floats.

    Stored as its JSON text. A FLOAT column turns every integer into a float, and no numeric type keeps the
    difference on both databases: PostgreSQL's NUMERIC keeps "22.0" apart from "22", but SQLite's NUMERIC affinity
    stores "22.0" as the integer 22, and the two databases must give back the same record."""

    impl = sa.String(32)  # the longest a 64-bit integer or a float's shortest repr takes is 24 characters
    cache_ok = True

    def process_bind_param(self, value: int | float | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"not a JSON number: {value!r}")
        return repr(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> int | float | None:
        if value is None:
            return None
        return float(value) if any(mark in value for mark in ".eEn") else int(value)


def _json(nullable: bool = True) -> Any:
    return Field(default=None, sa_type=JSONType, nullable=nullable)


def _time(nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_type=UTCDateTime, nullable=nullable, index=index)


class Conversation(SQLModel, table=True):
    """One record per conversation_id; every source merges into it (see record/merge.py)."""

    __tablename__ = "conversation"
    # The read API's keyset order is (start_time_unix_secs, conversation_id), newest first: each filter that
    # narrows sharply gets its own (filter, start, id) index so a page is one short range scan (migrations 0002,
    # 0005). `environment`, `has_audio` and `audio_stored` have none: a few values shared by most conversations,
    # so the start index finds a page of them about as fast, and every index slows the webhook's writes.
    # jsonb_path_ops GIN indexes answer `var.<name>=` / `label.<name>=` (containment) on PostgreSQL.
    __table_args__ = (
        sa.Index("ix_conversation_start", "start_time_unix_secs", "conversation_id"),
        sa.Index("ix_conversation_agent_start", "agent_id", "start_time_unix_secs", "conversation_id"),
        sa.Index("ix_conversation_user_start", "user_id", "start_time_unix_secs", "conversation_id"),
        sa.Index("ix_conversation_status_start", "status", "start_time_unix_secs", "conversation_id"),
        sa.Index("ix_conversation_phone_start", "phone_number", "start_time_unix_secs", "conversation_id"),
        sa.Index("ix_conversation_batch_start", "batch_call_id", "start_time_unix_secs", "conversation_id"),
        # GET /v1/stats reads only this index: its window, agent and flags (migration 0011, api/stats.py).
        sa.Index(
            "ix_conversation_coverage",
            "start_time_unix_secs",
            "agent_id",
            "webhook_received_at",
            "reconciled_at",
            "status",
            "audio_stored",
        ),
        sa.Index(
            "ix_conversation_dynamic_variables",
            "dynamic_variables",
            postgresql_using="gin",
            postgresql_ops={"dynamic_variables": "jsonb_path_ops"},
        ),
        sa.Index(
            "ix_conversation_labels", "labels", postgresql_using="gin", postgresql_ops={"labels": "jsonb_path_ops"}
        ),
    )

    conversation_id: str = Field(primary_key=True, max_length=256)
    agent_id: str | None = Field(default=None, max_length=256)
    agent_name: str | None = Field(default=None, sa_type=sa.Text)
    status: str | None = Field(default=None, max_length=32)
    user_id: str | None = Field(default=None, max_length=1024)
    branch_id: str | None = Field(default=None, max_length=256)
    version_id: str | None = Field(default=None, max_length=256)
    environment: str | None = Field(default=None, max_length=256)
    start_time_unix_secs: int | None = Field(default=None, sa_type=sa.BigInteger)
    call_duration_secs: int | float | None = Field(default=None, sa_type=JSONNumber)
    call_successful: str | None = Field(default=None, max_length=32)
    call_summary_title: str | None = Field(default=None, sa_type=sa.Text)
    transcript_summary: str | None = Field(default=None, sa_type=sa.Text)
    termination_reason: str | None = Field(default=None, sa_type=sa.Text)
    main_language: str | None = Field(default=None, max_length=64)
    initiation_source: str | None = Field(default=None, max_length=128)
    failure_reason: str | None = Field(default=None, sa_type=sa.Text)
    phone_number: str | None = Field(default=None, max_length=256)
    direction: str | None = Field(default=None, max_length=16)
    batch_call_id: str | None = Field(default=None, max_length=256)
    dynamic_variables: dict[str, Any] | None = _json()
    labels: dict[str, Any] | None = _json()
    transcript: list[Any] | None = _json()
    analysis: dict[str, Any] | None = _json()
    # `metadata` is taken by SQLAlchemy's declarative base, hence the attribute name.
    conversation_metadata: dict[str, Any] | None = Field(
        default=None, sa_column=sa.Column("metadata", JSONType, nullable=True)
    )
    conversation_initiation_client_data: dict[str, Any] | None = _json()
    # ElevenLabs' own flags, as it sent them (null when it did not say).
    has_audio: bool | None = None
    has_user_audio: bool | None = None
    has_response_audio: bool | None = None
    # postcall holds the audio, at `audio_path` in the blob store.
    audio_stored: bool = Field(default=False)
    audio_path: str | None = Field(default=None, max_length=512)
    audio_bytes: int | None = Field(default=None, sa_type=sa.BigInteger)
    first_seen_via: str = Field(max_length=16)
    first_seen_at: datetime = _time(nullable=False)
    webhook_received_at: datetime | None = _time()
    audio_received_at: datetime | None = _time()
    reconciled_at: datetime | None = _time()
    complete: bool = Field(default=False)
    revision: int = Field(default=1, sa_type=sa.BigInteger)
    # The rank of the data last applied (status rank * 10 + source richness, record/merge.py): decides which
    # source's fields win.
    data_rank: int = Field(default=-10)
    updated_at: datetime = _time(nullable=False)


class WebhookEvent(SQLModel, table=True):
    """Every accepted delivery: the raw body (not for audio) and its hash, which makes replays duplicates."""

    __tablename__ = "webhook_event"

    id: int | None = Field(default=None, primary_key=True)
    body_sha256: str = Field(max_length=64, unique=True)
    event_type: str = Field(max_length=128)
    conversation_id: str | None = Field(default=None, max_length=256, index=True)
    received_at: datetime = _time(nullable=False)
    body_bytes: int = Field(sa_type=sa.BigInteger)
    body: bytes | None = Field(default=None, sa_type=sa.LargeBinary)


class ReconcileCheckpoint(SQLModel, table=True):
    """Per agent, or for the whole workspace (agent_id `*`): conversations that started before `checkpoint_unix`
    are known to be stored."""

    __tablename__ = "reconcile_checkpoint"

    agent_id: str = Field(primary_key=True, max_length=256)
    checkpoint_unix: int = Field(sa_type=sa.BigInteger)
    updated_at: datetime = _time(nullable=False)


class RunCounts(SQLModel):
    """What a reconcile run did, in the order its summary says it: the one list of the counts, which are the run
    record's columns below and the reconciler's tally (reconcile/ledger.py)."""

    listed: int = 0
    new: int = 0
    updated: int = 0
    details_fetched: int = 0
    audio_fetched: int = 0
    audio_failed: int = 0  # audio that failed in 5 runs: reported, no longer asked for
    failed: int = 0
    given_up: int = 0  # details that answered 404 in several runs: reported, no longer asked for


class ReconcileRun(RunCounts, table=True):
    """One `postcall reconcile` run and its counts (RunCounts)."""

    __tablename__ = "reconcile_run"

    id: int | None = Field(default=None, primary_key=True)
    started_at: datetime = _time(nullable=False, index=True)
    finished_at: datetime | None = _time()
    status: str = Field(max_length=16)  # running | succeeded | failed
    holder: str = Field(max_length=256)
    dry_run: bool = Field(default=False)
    agents: list[Any] | None = _json()
    window_start_unix: int | None = Field(default=None, sa_type=sa.BigInteger)
    window_end_unix: int | None = Field(default=None, sa_type=sa.BigInteger)
    error: str | None = Field(default=None, sa_type=sa.Text)
    warnings: list[Any] | None = _json()  # sentences for a person; a run with warnings may still succeed
    # Whether the workspace's post-call webhook looked healthy to this run; null when the run could not tell.
    upstream_webhook_healthy: bool | None = None


RUN_COUNTS: tuple[str, ...] = tuple(RunCounts.model_fields)
# A run record as the read API serves it: the run's own columns, then its counts.
RUN_FIELDS: tuple[str, ...] = (
    *(column.name for column in ReconcileRun.__table__.c if column.name not in RUN_COUNTS),  # type: ignore[attr-defined]
    *RUN_COUNTS,
)


class ReconcileNotFound(SQLModel, table=True):
    """A conversation the API lists but whose detail answers 404: how many runs met that, until one gives it up."""

    __tablename__ = "reconcile_not_found"

    conversation_id: str = Field(primary_key=True, max_length=256)
    runs: int  # runs that got 404 for it (each counts once)
    last_run_id: int
    first_at: datetime = _time(nullable=False)
    last_at: datetime = _time(nullable=False)


class ReconcileAudioAttempt(SQLModel, table=True):
    """A conversation whose audio fetch failed: the runs that tried it (each counts once), until one gives it up."""

    __tablename__ = "reconcile_audio_attempt"

    conversation_id: str = Field(primary_key=True, max_length=256)
    tries: int
    last_run_id: int
    last_error: str | None = Field(default=None, sa_type=sa.Text)
    first_at: datetime = _time(nullable=False)
    last_at: datetime = _time(nullable=False)


class ReconcileLease(SQLModel, table=True):
    """At most one row per lease name: who runs the reconciler now, and until when the claim holds."""

    __tablename__ = "reconcile_lease"

    name: str = Field(primary_key=True, max_length=64)
    holder: str = Field(max_length=256)
    acquired_at: datetime = _time(nullable=False)
    expires_at: datetime = _time(nullable=False)


class ConversationTombstone(SQLModel, table=True):
    """An erased conversation: its id and when, nothing else. The one write path (record/store.py) stores nothing
    of a conversation that has one, whoever brings it (a late webhook, the reconciler, the broker)."""

    __tablename__ = "conversation_tombstone"

    conversation_id: str = Field(primary_key=True, max_length=256)
    erased_at: datetime = _time(nullable=False)


class EraseLog(SQLModel, table=True):
    """One committed erase batch, for audits: who, when, how many, chosen how. Never which conversations, whose
    they were, or the token: nothing personal (erase/erasure.py)."""

    __tablename__ = "erase_log"

    id: int | None = Field(default=None, primary_key=True)
    erased_at: datetime = _time(nullable=False, index=True)
    actor: str = Field(max_length=64)  # "cli", or "admin token <n>" (its position in POSTCALL_ADMIN_TOKENS)
    selector: str = Field(max_length=16)  # conversation | user_id
    conversations: int  # records deleted
    tombstones: int  # ids newly tombstoned (with the CLI, named ids never stored too)
    audio_files: int
    webhook_events: int


# 64-bit on PostgreSQL; SQLite's INTEGER is 64-bit already and only an INTEGER primary key numbers itself.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class ForwardEvent(SQLModel, table=True):
    """One committed change of one conversation: the transactional outbox (forward/outbox.py adds it in the
    transaction of the change) and the feed (forward/feed.py) that `GET /v1/events` and the sinks read.

    `id` numbers rows as they are inserted, which is not the order they commit in; `position` is the commit order,
    given after the commit by the sequencer (forward/feed.py explains why that is race-proof). `body` is the event
    exactly as it is served and sent: built once, in the transaction that knows what changed."""

    __tablename__ = "forward_event"
    __table_args__ = (
        # The sequencer's work list: the few rows not yet given a position.
        sa.Index(
            "ix_forward_event_unsequenced",
            "id",
            postgresql_where=sa.text("position IS NULL"),
            sqlite_where=sa.text("position IS NULL"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    event_id: str = Field(max_length=40, unique=True)
    position: int | None = Field(default=None, sa_type=sa.BigInteger, unique=True)
    type: str = Field(max_length=32)
    conversation_id: str = Field(max_length=256, index=True)
    agent_id: str | None = Field(default=None, max_length=256)
    revision: int = Field(sa_type=sa.BigInteger)
    committed_at: datetime = _time(nullable=False, index=True)
    body: str = Field(sa_type=sa.Text)


class ForwardSequence(SQLModel, table=True):
    """The last position the sequencer gave (one row, name `events`); its row lock serialises sequencers."""

    __tablename__ = "forward_sequence"

    name: str = Field(primary_key=True, max_length=32)
    last: int = Field(sa_type=sa.BigInteger)


class ForwardSink(SQLModel, table=True):
    """A sink's place in the feed and its last news (forward/deliveries.py).

    `cursor` is the last feed position fanned out into this sink's deliveries; its row lock makes the fan-out of
    several dispatchers take turns, so an event gets one delivery per sink. `sink` is the sink's name as shown in
    `GET /v1/forward` and the metrics: its URL without credentials (forward/sinks.py)."""

    __tablename__ = "forward_sink"

    sink: str = Field(primary_key=True, max_length=256)  # forward/sinks.py MAX_SINK_NAME
    cursor: int = Field(default=0, sa_type=sa.BigInteger)
    last_success_at: datetime | None = _time()
    last_error: str | None = Field(default=None, sa_type=sa.Text)
    last_error_at: datetime | None = _time()


class ForwardDelivery(SQLModel, table=True):
    """One event for one sink: `pending` (due at `next_attempt_at`), `delivered` or `dead` (given up on).

    A dispatcher claims a due delivery by setting `claimed_until` (a lease longer than a send may take) and
    `claimed_by`, so no other one sends it meanwhile. The event's row owns it: deleting an event (retention,
    erasure) deletes its deliveries and their attempts."""

    __tablename__ = "forward_delivery"
    __table_args__ = (
        sa.UniqueConstraint("event", "sink", name="uq_forward_delivery_event_sink"),
        # Claiming: the sink's due deliveries, soonest first.
        sa.Index("ix_forward_delivery_due", "sink", "status", "next_attempt_at"),
        # Revision order: is an earlier event of this conversation still pending for this sink?
        sa.Index("ix_forward_delivery_conversation", "sink", "conversation_id", "status", "position"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    event: int = Field(
        sa_column=sa.Column(BigId, sa.ForeignKey("forward_event.id", ondelete="CASCADE"), nullable=False)
    )
    sink: str = Field(max_length=256)
    conversation_id: str = Field(max_length=256)
    revision: int = Field(sa_type=sa.BigInteger)
    position: int = Field(sa_type=sa.BigInteger)
    committed_at: datetime = _time(nullable=False)
    status: str = Field(max_length=16)  # pending | delivered | dead
    attempts: int = Field(default=0)
    first_attempt_at: datetime | None = _time()
    next_attempt_at: datetime = _time(nullable=False)
    claimed_until: datetime | None = _time()
    claimed_by: str | None = Field(default=None, max_length=128)
    delivered_at: datetime | None = _time()
    last_status_code: int | None = Field(default=None)
    last_error: str | None = Field(default=None, sa_type=sa.Text)


class ForwardAttempt(SQLModel, table=True):
    """One try at sending a delivery: its outcome, the answer's status code, how long it took, why it failed,
    and when the next try is due (none: delivered or dead)."""

    __tablename__ = "forward_attempt"

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    delivery: int = Field(
        sa_column=sa.Column(BigId, sa.ForeignKey("forward_delivery.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    attempted_at: datetime = _time(nullable=False)
    outcome: str = Field(max_length=16)  # delivered | failed | dead
    status_code: int | None = Field(default=None)
    latency_seconds: float = Field(default=0.0)
    error: str | None = Field(default=None, sa_type=sa.Text)
    next_attempt_at: datetime | None = _time()
