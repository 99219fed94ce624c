"""Values a column or an index cannot hold (issue 18, item 1), on SQLite and PostgreSQL.

PostgreSQL refuses a btree index entry over 2,704 bytes. A `user_id` of 700-1,024 four-byte characters fits its
1,024-character column but not the (user_id, start, conversation_id) index: such a value must read as absent, as a
too-long one does, and a value the database refuses anyway must fail its own delivery only, never its batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from service.config import Settings
from service.record import payloads, store
from service.record.merge import Observation, Source
from service.storage import tables  # noqa: F401 (registers every table)
from service.storage.db import StoreRefused, create_engine, transaction
from service.testing import FakeConversation, FakePlatform, seed_conversations
from service.web.app import create_app
from service.webhook.writer import BatchWriter
from tests.support import webhooks as wh
from tests.support.databases import empty_tables
from tests.support.live import live_server
from tests.support.reconcile import reconcile, rows

NOW = int(time.time())
AT = datetime.fromtimestamp(NOW, UTC)


def four_byte_text(chars: int, seed: int) -> str:
    """Printable CJK Extension B characters, 4 bytes each in UTF-8, drawn at random so that PostgreSQL cannot
    compress the index entry below its limit (a repeated character would compress and hide the problem)."""
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(0x20000, 0x2A6E0)) for _ in range(chars))


WIDE_USER_ID = four_byte_text(800, seed=1)  # 800 characters: fits the column, 3,200 bytes: not the index
LONGEST_ID = four_byte_text(payloads.MAX_ID_LENGTH, seed=2)  # 1,024 bytes, the widest id we accept
WIDEST_KEPT_USER_ID = four_byte_text(payloads.BYTE_LIMITS["user_id"] // 4, seed=3)


# --- the bounds, index by index ----------------------------------------------------------------------------------

_ALIGN_8 = (sa.BigInteger, sa.DateTime, sa.Float)


def _worst_entry_bytes(table: sa.Table, columns: list[sa.Column[Any]]) -> int:
    """The largest btree entry the index on `columns` can get from values postcall lets through: a 16-byte header
    (8 of the tuple, its null bitmap, aligned), then each column aligned as PostgreSQL aligns it."""
    size = 16
    for column in columns:
        if isinstance(column.type, _ALIGN_8) or isinstance(getattr(column.type, "impl", None), _ALIGN_8):
            size = -(-size // 8) * 8 + 8
        elif isinstance(column.type, sa.Boolean):
            size += 1
        elif isinstance(column.type, sa.Integer):
            size = -(-size // 4) * 4 + 4
        else:
            length = column.type.length  # type: ignore[attr-defined]
            assert length is not None, f"{table.name}.{column.name}: an unbounded text column in a btree index"
            data = 4 * length
            if table.name == "conversation":
                data = min(data, payloads.BYTE_LIMITS.get(column.name, data))
            size = -(-size // 4) * 4 + 4 + data
    return -(-size // 8) * 8


def _btree_indexes() -> Iterator[tuple[str, sa.Table, list[sa.Column[Any]]]]:
    for table in SQLModel.metadata.sorted_tables:
        yield f"{table.name} primary key", table, list(table.primary_key.columns)
        for index in table.indexes:
            if index.dialect_options["postgresql"].get("using") != "gin":
                yield index.name or "", table, list(index.columns)
        for constraint in table.constraints:
            if isinstance(constraint, sa.UniqueConstraint):
                yield f"{table.name} unique {constraint.name}", table, list(constraint.columns)


@pytest.mark.parametrize(("name", "table", "columns"), list(_btree_indexes()), ids=lambda value: str(value))
def test_every_btree_index_entry_fits_postgresqls_limit(name: str, table: sa.Table, columns: list[Any]) -> None:
    assert _worst_entry_bytes(table, columns) <= payloads.BTREE_MAX_ENTRY_BYTES, name


def test_a_user_id_reads_as_absent_past_its_byte_bound_as_past_its_length() -> None:
    def user_id_of(value: str) -> str | None:
        data = {"conversation_id": "c1", "user_id": value, "metadata": {}}
        return payloads.detail_observation(data, Source.DETAIL, AT).fields["user_id"]

    assert user_id_of(WIDEST_KEPT_USER_ID) == WIDEST_KEPT_USER_ID
    assert user_id_of(WIDEST_KEPT_USER_ID + "a") is None
    assert user_id_of(WIDE_USER_ID) is None
    assert user_id_of("u" * 1024) == "u" * 1024  # ASCII: the column's 1,024 characters are all usable
    assert user_id_of("u" * 1025) is None
    assert user_id_of("user-\ud800") is None  # a lone surrogate: no database stores it


# --- webhooks: a batch of deliveries through the real app ----------------------------------------------------------


async def _post_all(url: str, events: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:

        async def post(event: dict[str, Any]) -> httpx.Response:
            body = wh.encode(event)
            return await client.post(url, content=body, headers=wh.signed_headers(body))

        return await asyncio.gather(*(post(event) for event in events))


def test_a_user_id_too_wide_for_the_index_is_stored_without_it_and_its_batch_neighbours_are_stored(
    settings: Settings, engine: Engine
) -> None:
    good = [wh.transcription(f"conv_good_{i}") for i in range(30)]
    wide = wh.transcription("conv_wide", user_id=WIDE_USER_ID)
    widest_kept = wh.transcription(LONGEST_ID, user_id=WIDEST_KEPT_USER_ID)
    events = [*good[:15], wide, widest_kept, *good[15:]]

    with live_server(create_app(settings)) as base_url:
        answers = asyncio.run(_post_all(f"{base_url}/webhooks/elevenlabs", events))

    assert [answer.status_code for answer in answers] == [200] * len(events), [a.text for a in answers]
    assert {answer.json()["status"] for answer in answers} == {"accepted"}
    records = {row["conversation_id"]: row for row in rows(engine, "conversation")}
    assert set(records) == {event["data"]["conversation_id"] for event in events}
    assert records["conv_wide"]["user_id"] is None
    assert records["conv_wide"]["status"] == "done" and records["conv_wide"]["complete"]
    assert records[LONGEST_ID]["user_id"] == WIDEST_KEPT_USER_ID  # the widest value kept fits the real index
    assert all(records[f"conv_good_{i}"]["user_id"] == "user-42" for i in range(30))


# --- the group-commit writer: one refused row in a batch -----------------------------------------------------------


@pytest.fixture
def pg_engine(postgres_url: str) -> Iterator[Engine]:
    engine = create_engine(postgres_url)
    yield engine
    empty_tables(engine)
    engine.dispose()


def _delivery(conversation_id: str) -> store.Delivery:
    body = f'{{"conversation_id": "{conversation_id}"}}'.encode()
    return store.Delivery(hashlib.sha256(body).hexdigest(), "post_call_transcription", conversation_id, AT, 9, body)


def _detail(conversation_id: str, user_id: str) -> Observation:
    return Observation(conversation_id, Source.TRANSCRIPTION_WEBHOOK, AT, "done", {"user_id": user_id})


def _wait_for_a_lock_wait(engine: Engine) -> None:
    """Until another session of this database waits for a lock (the writer, blocked behind ours)."""
    waiting = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + 30
    with engine.connect() as conn:
        while conn.execute(waiting).scalar_one() == 0:
            assert time.monotonic() < deadline, "the writer never reached the locked table"
            conn.rollback()
            time.sleep(0.01)


def test_a_row_postgresql_refuses_fails_only_its_own_delivery_not_its_batch(pg_engine: Engine) -> None:
    # The receiver never lets such a value through (above); the writer must still isolate a row the database
    # refuses. To make the refused row share a batch with good ones, the writer's first batch (one gate delivery)
    # is held behind a table lock while the others queue up; released, they are committed as one batch.
    writer = BatchWriter(pg_engine)
    writer.start()
    blocker = pg_engine.connect()
    blocker.exec_driver_sql("LOCK TABLE webhook_event IN SHARE ROW EXCLUSIVE MODE")

    async def scenario() -> list[object]:
        gate = asyncio.ensure_future(writer.record(_delivery("gate"), _detail("gate", "u")))
        await asyncio.to_thread(_wait_for_a_lock_wait, pg_engine)
        items = [(_delivery(f"c{i}"), _detail(f"c{i}", f"user-{i}")) for i in range(8)]
        items.insert(4, (_delivery("refused"), _detail("refused", WIDE_USER_ID)))
        batch = [asyncio.ensure_future(writer.record(delivery, obs)) for delivery, obs in items]
        await asyncio.sleep(0)  # every `record` has queued its job
        blocker.rollback()
        return await asyncio.gather(gate, *batch, return_exceptions=True)

    try:
        results = asyncio.run(scenario())
    finally:
        blocker.close()
        writer.stop()
    assert isinstance(results[5], StoreRefused)
    assert [result for i, result in enumerate(results) if i != 5] == ["accepted"] * 9
    stored = {row["conversation_id"] for row in rows(pg_engine, "conversation")}
    assert stored == {"gate", *(f"c{i}" for i in range(8))}


def test_a_refused_row_alone_is_store_refused_not_store_unavailable(pg_engine: Engine) -> None:
    with pytest.raises(StoreRefused):
        transaction(pg_engine, lambda conn: store.apply(conn, _detail("refused", WIDE_USER_ID), AT))


# --- the reconciler: a page holding such a conversation ------------------------------------------------------------

KEY = "hardening-key"


@dataclass
class _WideUser(FakeConversation):
    """A conversation whose list summary carries its user_id too (the fake's summary leaves it out)."""

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "user_id": self.user_id}


@pytest.mark.usefixtures("tiny_retry_waits")
def test_the_reconciler_stores_a_page_holding_a_user_id_too_wide_for_the_index(
    settings: Settings, engine: Engine
) -> None:
    conversations = seed_conversations(9, ("agent_a",), now=NOW, seed=4)
    conversations.append(_WideUser("conv_wide_user", "agent_a", NOW - 3600, user_id=WIDE_USER_ID))
    platform = FakePlatform(api_key=KEY, conversations=conversations)

    with platform.serve() as base_url:
        run = reconcile(settings, base_url, KEY, "--json")

    assert run.exit_code == 0, run.stderr
    records = {row["conversation_id"]: row for row in rows(engine, "conversation")}
    assert set(records) == {c.conversation_id for c in conversations}
    assert records["conv_wide_user"]["user_id"] is None
    assert records["conv_wide_user"]["complete"]
    assert all(records[c.conversation_id]["user_id"] == c.user_id for c in conversations[:9])
