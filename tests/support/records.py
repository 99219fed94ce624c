"""Storing conversations for read-side tests, through the one write path (`record.store.apply`)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from service.record import payloads
from service.record import store as record_store
from service.record.merge import Audio, Observation, Source
from service.storage.audio import audio_relpath
from service.storage.db import transaction

AT = datetime(2026, 1, 1, tzinfo=UTC)


def detail(
    conversation_id: str,
    *,
    agent_id: str = "agent_1",
    status: str = "done",
    start: int | None = 1_760_000_000,
    user_id: str | None = None,
    call_successful: str | None = "success",
    dynamic_variables: dict[str, Any] | None = None,
    source: Source = Source.TRANSCRIPTION_WEBHOOK,
    at: datetime = AT,
) -> Observation:
    """A conversation detail as the transcription webhook (or a detail fetch) carries it."""
    metadata: dict[str, Any] = {"call_duration_secs": 31}
    if start is not None:
        metadata["start_time_unix_secs"] = start
    data: dict[str, Any] = {
        "conversation_id": conversation_id,
        "agent_id": agent_id,
        "status": status,
        "user_id": user_id,
        "transcript": [{"role": "agent", "message": "Hello!", "time_in_call_secs": 0}],
        "metadata": metadata,
        "analysis": {"call_successful": call_successful, "transcript_summary": "A call."},
        "conversation_initiation_client_data": {"dynamic_variables": dynamic_variables},
    }
    return payloads.detail_observation(data, source, at)


def summary(conversation_id: str, *, agent_id: str = "agent_1", start: int = 1_760_000_000) -> Observation:
    """A list summary, as the reconciler stores it."""
    entry = {"conversation_id": conversation_id, "agent_id": agent_id, "status": "done", "start_time_unix_secs": start}
    return payloads.summary_observation(entry, AT)


def session(
    conversation_id: str,
    *,
    agent_id: str = "agent_1",
    user_id: str | None = None,
    labels: dict[str, Any] | None = None,
    dynamic_variables: dict[str, Any] | None = None,
) -> Observation:
    """A conversation recorded by the session broker before the call starts: no start time yet."""
    fields = {"agent_id": agent_id, "user_id": user_id, "dynamic_variables": dynamic_variables}
    return Observation(conversation_id, Source.SESSION, AT, status="initiated", fields=fields, labels=labels)


def audio(conversation_id: str, data_dir: Path, content: bytes, agent_id: str = "agent_1") -> Observation:
    """Audio written to the blob store's layout, and the observation that records it."""
    relpath = audio_relpath(conversation_id)
    path = data_dir / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return payloads.audio_observation(conversation_id, agent_id, Audio(relpath, len(content)), Source.AUDIO_WEBHOOK, AT)


def store(engine: Engine, observations: Iterable[Observation], now: datetime = AT) -> None:
    batch = list(observations)

    def work(conn: Any) -> None:
        for observation in batch:
            record_store.apply(conn, observation, now)

    transaction(engine, work)


def get_record(conn: Connection, conversation_id: str) -> dict[str, Any] | None:
    """The stored record as a dict of column values."""
    query = sa.select(record_store.conversations).where(record_store.conversations.c.conversation_id == conversation_id)
    row = conn.execute(query).mappings().first()
    return dict(row) if row is not None else None
