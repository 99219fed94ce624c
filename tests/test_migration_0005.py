"""Migration 0005 on a database made by the previous version: rows stored the old way (old columns, old ranks,
archived webhook bodies) get every new field filled, keep what they held, merge by the new rules afterwards, and
the downgrade gives the old table back. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from alembic import command
from service.api import reads
from service.record import payloads
from service.record import store as record_store
from service.record.merge import Source
from service.storage.db import create_engine, transaction
from service.storage.migrations import alembic_config, upgrade
from service.testing import samples
from tests.support.databases import postgres_database

PREVIOUS = "0004"
AT = "2026-01-01 00:00:00+00:00"
EVENT_TIME = 1_760_000_500
FILLER = 450  # more than two of the migration's batches


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def old_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty database migrated to the previous head only."""
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
        upgrade(engine, PREVIOUS)
        yield engine
        engine.dispose()
        return
    with postgres_database(migrated=False) as url:
        engine = create_engine(url)
        try:
            upgrade(engine, PREVIOUS)
            yield engine
        finally:
            engine.dispose()


def downgrade(engine: Engine, revision: str) -> None:
    config = alembic_config()
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)
        conn.commit()


OLD_COLUMNS = (
    "conversation_id, agent_id, status, start_time_unix_secs, call_duration_secs, metadata, analysis, has_audio,"
    " audio_path, audio_bytes, first_seen_via, first_seen_at, complete, data_rank, updated_at"
)


def insert_old(conn: sa.Connection, conversation_id: str, **values: Any) -> None:
    """A conversation row exactly as the schema before 0005 stored it."""
    row = {
        "conversation_id": conversation_id,
        "agent_id": "agent_1",
        "status": "done",
        "start_time_unix_secs": 1_760_000_000,
        "call_duration_secs": None,
        "metadata": None,
        "analysis": None,
        "has_audio": False,
        "audio_path": None,
        "audio_bytes": None,
        "first_seen_via": "webhook",
        "first_seen_at": AT,
        "complete": True,
        "data_rank": 33,
        "updated_at": AT,
        **values,
    }
    for name in ("metadata", "analysis"):
        row[name] = None if row[name] is None else json.dumps(row[name])
    placeholders = ", ".join(f":{name.strip()}" for name in OLD_COLUMNS.split(","))
    conn.execute(sa.text(f"INSERT INTO conversation ({OLD_COLUMNS}) VALUES ({placeholders})"), row)


def archive_old(conn: sa.Connection, event: dict[str, Any]) -> None:
    body = json.dumps(event).encode()
    conn.execute(
        sa.text(
            "INSERT INTO webhook_event (body_sha256, event_type, conversation_id, received_at, body_bytes, body)"
            " VALUES (:sha, :type, :cid, :at, :size, :body)"
        ),
        {
            "sha": uuid.uuid4().hex,
            "type": event["type"],
            "cid": event["data"]["conversation_id"],
            "at": AT,
            "size": len(body),
            "body": body,
        },
    )


def store_the_old_way(engine: Engine) -> dict[str, dict[str, Any]]:
    phone = samples.transcription_event(
        "conv_phone",
        1_760_000_100,
        phone_call=samples.twilio_call("inbound"),
        batch_call=samples.batch_call("btcal_old"),
        duration=22,
    )
    phone["data"]["agent_name"] = "Old \x00 name"  # as archived; PostgreSQL text cannot hold the NUL
    failure = samples.failure_event("conv_failure", EVENT_TIME, "busy", "twilio", dynamic_variables={"n": 1})
    failed_transcript = samples.transcription_event("conv_failed_transcript", 1_760_000_200)
    failed_transcript["data"]["status"] = "failed"
    with engine.begin() as conn:
        data = phone["data"]
        insert_old(
            conn,
            "conv_phone",
            start_time_unix_secs=data["metadata"]["start_time_unix_secs"],
            call_duration_secs=22.0,
            metadata=data["metadata"],
            analysis=data["analysis"],
            has_audio=True,
            audio_path="audio/co/conv_phone.mp3",
            audio_bytes=3,
        )
        archive_old(conn, phone)
        insert_old(
            conn,
            "conv_failure",
            status="failed",
            start_time_unix_secs=None,
            metadata=failure["data"]["metadata"],
            data_rank=43,
        )
        archive_old(conn, failure)
        insert_old(conn, "conv_failed_transcript", status="failed", data_rank=43)
        archive_old(conn, failed_transcript)
        insert_old(
            conn, "conv_summary", status="failed", call_duration_secs=12.5, data_rank=41, first_seen_via="reconcile"
        )
        insert_old(
            conn,
            "conv_detail",
            call_duration_secs=61.0,
            metadata={"call_duration_secs": 61, "phone_call": {"direction": "sideways", "external_number": "+1"}},
            analysis={"call_summary_title": "From a detail"},
            data_rank=32,
            first_seen_via="reconcile",
        )
        insert_old(conn, "conv_session", status="initiated", start_time_unix_secs=None, complete=False, data_rank=0)
        for i in range(FILLER):
            insert_old(conn, f"conv_filler_{i:04d}", call_duration_secs=float(i), data_rank=31, complete=False)
    return {"phone": phone, "failure": failure}


def test_the_migration_fills_every_new_field_from_what_the_old_database_holds(old_engine: Engine) -> None:
    sent = store_the_old_way(old_engine)
    upgrade(old_engine)
    with old_engine.connect() as conn:
        phone = reads.get_conversation(conn, "conv_phone")
        failure = reads.get_conversation(conn, "conv_failure")
        failed_transcript = reads.get_conversation(conn, "conv_failed_transcript")
        summary = reads.get_conversation(conn, "conv_summary")
        detail = reads.get_conversation(conn, "conv_detail")
        session = reads.get_conversation(conn, "conv_session")
        ranks = dict(conn.execute(sa.text("SELECT conversation_id, data_rank FROM conversation")).all())
        revisions = set(conn.execute(sa.text("SELECT DISTINCT revision FROM conversation")).scalars())
        fillers = conn.execute(
            sa.text("SELECT call_duration_secs FROM conversation WHERE conversation_id LIKE 'conv_filler_%'")
        ).scalars()
        assert sorted(int(value) for value in fillers) == list(range(FILLER))
    assert phone is not None and failure is not None and failed_transcript is not None
    assert summary is not None and detail is not None and session is not None
    data = sent["phone"]["data"]
    assert {name: phone[name] for name in ("agent_name", "version_id", "environment")} == {
        "agent_name": "Old \ufffd name",
        "version_id": data["version_id"],
        "environment": data["environment"],
    }
    assert (phone["has_audio"], phone["has_user_audio"], phone["has_response_audio"]) == (True, True, False)
    assert phone["audio_stored"] is True  # the old has_audio: postcall holds the file
    assert (phone["phone_number"], phone["direction"], phone["batch_call_id"]) == (
        samples.CALLER_NUMBER,
        "inbound",
        "btcal_old",
    )
    assert phone["call_summary_title"] == "Appointment rescheduled"
    assert phone["conversation_initiation_client_data"] == data["conversation_initiation_client_data"]
    assert phone["call_duration_secs"] == 22 and type(phone["call_duration_secs"]) is int
    assert (phone["revision"], phone["complete"]) == (1, True)

    assert failure["start_time_unix_secs"] == EVENT_TIME  # the failure event's time: it had none
    assert (failure["phone_number"], failure["direction"]) == (samples.CALLER_NUMBER, "outbound")
    assert (
        failure["conversation_initiation_client_data"] == sent["failure"]["data"]["conversation_initiation_client_data"]
    )
    assert failure["complete"] is True and failure["audio_stored"] is False and failure["has_audio"] is None

    assert summary["complete"] is False  # a failed summary alone is no longer the whole story
    assert summary["call_duration_secs"] == 12.5
    assert detail["call_duration_secs"] == 61 and type(detail["call_duration_secs"]) is int
    assert detail["call_summary_title"] == "From a detail" and detail["agent_name"] is None
    assert (detail["phone_number"], detail["direction"]) == ("+1", None)  # not a direction we can serve
    assert session["call_duration_secs"] is None and session["start_time_unix_secs"] is None

    assert revisions == {1}
    assert {cid: ranks[cid] for cid in ("conv_phone", "conv_failure", "conv_failed_transcript")} == {
        "conv_phone": 45,  # a transcription webhook, done (old 33)
        "conv_failure": 34,  # a failure webhook's old 43
        "conv_failed_transcript": 35,  # a failed transcription's old 43
    }
    assert (ranks["conv_summary"], ranks["conv_detail"], ranks["conv_session"], ranks["conv_filler_0001"]) == (
        32,  # failed summary, old 41
        43,  # done detail, old 32
        0,
        42,  # done summary, old 31
    )


def test_after_the_migration_a_transcription_outranks_an_old_failure(old_engine: Engine) -> None:
    store_the_old_way(old_engine)
    upgrade(old_engine)
    at = datetime.now(UTC)
    event = samples.transcription_event("conv_failure", 1_760_000_600)
    observation = payloads.detail_observation(event["data"], Source.TRANSCRIPTION_WEBHOOK, at)
    transaction(old_engine, lambda conn: record_store.apply(conn, observation, at))
    with old_engine.connect() as conn:
        record = reads.get_conversation(conn, "conv_failure")
    assert record is not None
    assert (record["status"], record["failure_reason"], record["revision"]) == ("done", None, 2)
    assert record["metadata"] == event["data"]["metadata"]


def test_the_downgrade_gives_the_old_table_back(old_engine: Engine) -> None:
    store_the_old_way(old_engine)
    with old_engine.connect() as conn:
        before = {row.conversation_id: row for row in conn.execute(sa.text(f"SELECT {OLD_COLUMNS} FROM conversation"))}
    upgrade(old_engine)
    downgrade(old_engine, PREVIOUS)
    with old_engine.connect() as conn:
        columns = {column["name"] for column in sa.inspect(conn).get_columns("conversation")}
        after = {row.conversation_id: row for row in conn.execute(sa.text(f"SELECT {OLD_COLUMNS} FROM conversation"))}
    assert "revision" not in columns and "audio_stored" not in columns and "has_audio" in columns
    changed = {cid for cid in before if tuple(before[cid]) != tuple(after[cid])}
    # The start a failure got from its event stays; every other old value is as it was.
    assert changed == {"conv_failure"}
    assert after["conv_failure"].start_time_unix_secs == EVENT_TIME
    assert type(after["conv_phone"].call_duration_secs) is float
    upgrade(old_engine)  # and up again
