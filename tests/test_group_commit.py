"""Group commit: deliveries committed in batches keep the semantics of one-at-a-time delivery."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime

import pytest
from sqlalchemy.engine import Engine

from service.record import store
from service.record.merge import Audio, Observation, Source
from service.storage.db import StoreUnavailable, create_engine, transaction
from service.webhook.writer import BatchWriter
from tests.support import records

NOW = datetime(2026, 11, 1, tzinfo=UTC)


def delivery(body: bytes, conversation_id: str | None = "c1", kind: str = "post_call_transcription") -> store.Delivery:
    return store.Delivery(hashlib.sha256(body).hexdigest(), kind, conversation_id, NOW, len(body), body)


def detail(conversation_id: str, status: str, **fields: object) -> Observation:
    return Observation(conversation_id, Source.TRANSCRIPTION_WEBHOOK, NOW, status, fields)


def test_a_batch_keeps_order_duplicates_and_merges(engine: Engine) -> None:
    items = [
        (delivery(b"a", "c1"), detail("c1", "processing", user_id="u1")),
        (delivery(b"a", "c1"), detail("c1", "processing", user_id="u1")),  # the same body again: a duplicate
        (delivery(b"b", "c1"), detail("c1", "done", call_duration_secs=5.0)),
        (delivery(b"c", None, "new_kind"), None),
        (delivery(b"d", "c2"), detail("c2", "done")),
    ]
    outcomes = transaction(engine, lambda conn: store.record_deliveries(conn, items))
    assert outcomes == ["accepted", "duplicate", "accepted", "ignored", "accepted"]
    with engine.connect() as conn:
        c1 = records.get_record(conn, "c1")
        archived = conn.exec_driver_sql("SELECT count(*) FROM webhook_event").scalar_one()
    assert c1 is not None and c1["status"] == "done" and c1["user_id"] == "u1" and c1["call_duration_secs"] == 5.0
    assert archived == 4
    # Replaying the whole batch changes nothing.
    again = transaction(engine, lambda conn: store.record_deliveries(conn, items))
    assert again == ["duplicate"] * 5


def test_apply_many_updates_existing_records(engine: Engine) -> None:
    transaction(engine, lambda conn: store.apply(conn, detail("c1", "processing"), NOW))
    audio = Observation("c1", Source.AUDIO_WEBHOOK, NOW, None, {}, audio=Audio("audio/c1.mp3", 3))
    changes = transaction(engine, lambda conn: store.apply_many(conn, [detail("c1", "done"), audio], NOW))
    assert changes == {"c1": store.Change.UPDATED}
    unchanged = transaction(engine, lambda conn: store.apply(conn, detail("c1", "done"), NOW))
    assert unchanged == store.Change.UNCHANGED


async def record_all(writer: BatchWriter, items: list[tuple[store.Delivery, Observation | None]]) -> list[object]:
    return await asyncio.gather(*(writer.record(d, o) for d, o in items), return_exceptions=True)


def test_the_writer_answers_each_request_after_its_commit(engine: Engine) -> None:
    writer = BatchWriter(engine, max_batch=8)
    writer.start()
    try:
        items = [(delivery(f"body{i}".encode(), f"c{i % 5}"), detail(f"c{i % 5}", "done")) for i in range(40)]
        results = asyncio.run(record_all(writer, items + items[:3]))
    finally:
        writer.stop()
    assert results == ["accepted"] * 40 + ["duplicate"] * 3
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM conversation").scalar_one() == 5


def test_one_bad_delivery_does_not_fail_its_batch(engine: Engine) -> None:
    poison = Observation("c9", Source.DETAIL, NOW, "done", {"no_such_field": 1})
    items = [(delivery(f"b{i}".encode(), f"c{i}"), detail(f"c{i}", "done")) for i in range(6)]
    items.insert(3, (delivery(b"poison", "c9"), poison))
    writer = BatchWriter(engine, max_batch=64)
    writer.start()
    try:
        results = asyncio.run(record_all(writer, items))
    finally:
        writer.stop()
    assert isinstance(results[3], ValueError)
    assert [r for i, r in enumerate(results) if i != 3] == ["accepted"] * 6


def test_an_unreachable_database_fails_the_batch_with_store_unavailable() -> None:
    engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    writer = BatchWriter(engine)
    writer.start()
    try:
        results = asyncio.run(record_all(writer, [(delivery(b"x"), detail("c1", "done"))] * 3))
    finally:
        writer.stop()
        engine.dispose()
    assert all(isinstance(r, StoreUnavailable) for r in results)


def test_a_writer_that_is_not_started_refuses_work(engine: Engine) -> None:
    with pytest.raises(RuntimeError):
        asyncio.run(BatchWriter(engine).record(delivery(b"x"), None))


def test_a_batch_stores_any_mix_of_values_as_given(engine: Engine) -> None:
    # One batch, whole-number and fractional durations, text that needs escaping, absent values: PostgreSQL gets
    # each column as one array, and an array must not refuse or change any of these.
    transcript = [{"role": "user", "message": 'a "quoted" \\ {brace}, NULL \u2028 é'}]
    observations = [
        detail("c1", "done", call_duration_secs=3, transcript=transcript, user_id='say "hi"'),
        detail("c2", "done", call_duration_secs=2.5, transcript=None),
        detail("c3", "processing"),
    ]
    changes = transaction(engine, lambda conn: store.apply_many(conn, observations, NOW))
    assert changes == {"c1": store.Change.NEW, "c2": store.Change.NEW, "c3": store.Change.NEW}
    with engine.connect() as conn:
        c1, c2, c3 = (records.get_record(conn, cid) for cid in ("c1", "c2", "c3"))
    assert c1 is not None and c1["call_duration_secs"] == 3.0 and c1["transcript"] == transcript
    assert c1["user_id"] == 'say "hi"'
    assert c2 is not None and c2["call_duration_secs"] == 2.5 and c2["transcript"] is None
    assert c3 is not None and c3["status"] == "processing" and c3["call_duration_secs"] is None
