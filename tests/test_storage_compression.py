"""On PostgreSQL the large values (archived bodies, transcripts) are TOASTed with lz4, not pglz (migration 0003)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

from service.record import store
from service.record.merge import Observation, Source
from service.storage.db import create_engine, transaction
from tests.support import records

NOW = datetime(2026, 11, 1, tzinfo=UTC)


def test_a_long_transcript_and_its_archived_body_are_stored_with_lz4(postgres_url: str) -> None:
    transcript = [{"role": "user", "message": f"turn {n}: " + "lorem ipsum " * 12} for n in range(90)]
    body = json.dumps({"type": "post_call_transcription", "data": {"transcript": transcript}}).encode()
    delivery = store.Delivery(
        hashlib.sha256(body).hexdigest(), "post_call_transcription", "c_lz4", NOW, len(body), body
    )
    observation = Observation("c_lz4", Source.TRANSCRIPTION_WEBHOOK, NOW, "done", {"transcript": transcript})
    engine = create_engine(postgres_url)
    try:
        transaction(engine, lambda conn: store.record_deliveries(conn, [(delivery, observation)]))
        with engine.connect() as conn:
            methods = conn.exec_driver_sql(
                "SELECT pg_column_compression(body) FROM webhook_event WHERE conversation_id = 'c_lz4' "
                "UNION ALL SELECT pg_column_compression(transcript) FROM conversation WHERE conversation_id = 'c_lz4'"
            ).scalars()
            assert list(methods) == ["lz4", "lz4"]
            record = records.get_record(conn, "c_lz4")
        assert record is not None and record["transcript"] == transcript
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM webhook_event WHERE conversation_id = 'c_lz4'")
            conn.exec_driver_sql("DELETE FROM conversation WHERE conversation_id = 'c_lz4'")
        engine.dispose()
