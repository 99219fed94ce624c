"""The event feed, GET /v1/events: one event per committed change, in commit order, never skipped.

Through the real app on SQLite and PostgreSQL; the races on PostgreSQL, where writers commit concurrently.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from service.config import Settings
from service.forward import feed, outbox
from service.record import purge, store
from service.record.merge import Source
from service.storage.audio import BlobStore
from service.storage.db import transaction
from service.testing import FakePlatform, WebhookSender, seed_conversations
from service.web.app import create_app
from tests.support import records, webhooks
from tests.support.process import serve_process
from tests.support.reconcile import reconcile

AUTH = {"Authorization": "Bearer test-token"}
AT = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def client(settings: Settings, engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client


def post(client: TestClient, event: dict[str, Any]) -> None:
    body = webhooks.encode(event)
    answer = client.post("/webhooks/elevenlabs", content=body, headers=webhooks.signed_headers(body))
    assert answer.status_code == 200, answer.text


def feed_page(client: TestClient, **params: Any) -> dict[str, Any]:
    answer = client.get("/v1/events", params=params, headers=AUTH)
    assert answer.status_code == 200, answer.text
    page: dict[str, Any] = answer.json()
    return page


def all_events(client: TestClient) -> list[dict[str, Any]]:
    page = feed_page(client, limit=1000)
    return list(page["events"])


def test_a_webhook_adds_one_created_event_carrying_the_record_as_the_api_serves_it(client: TestClient) -> None:
    post(client, webhooks.transcription("conv_1"))

    (event,) = all_events(client)
    record = client.get("/v1/conversations/conv_1", headers=AUTH).json()
    assert event["id"].startswith("evt_")
    assert event["type"] == "conversation.created"
    assert event["data"]["conversation_id"] == "conv_1"
    assert event["data"]["revision"] == 1
    assert event["data"]["conversation"] == record
    assert event["timestamp"] == record["webhook_received_at"]
    # On a new record `changed` names every field that has a value, and only those.
    assert set(event["data"]["changed"]) == {name for name, value in record.items() if value is not None}


def test_an_update_names_what_changed_and_a_duplicate_or_a_mere_sighting_adds_none(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    first = webhooks.transcription("conv_1")
    post(client, first)
    post(client, first)  # the same body again: a duplicate
    post(client, webhooks.audio("conv_1", b"ID3 some mp3 bytes"))
    # The reconciler listing it again changes only `reconciled_at`, a provenance time: no new revision.
    listed_later = dataclasses.replace(records.summary("conv_1"), observed_at=datetime.now(UTC))
    records.store(engine, [listed_later], now=listed_later.observed_at)

    created, updated = all_events(client)
    assert [created["type"], updated["type"]] == ["conversation.created", "conversation.updated"]
    assert updated["data"]["revision"] == 2
    assert set(updated["data"]["changed"]) == {"audio_stored", "audio_received_at", "revision"}
    assert updated["data"]["conversation"]["audio_stored"] is True
    assert created["data"]["conversation"]["audio_stored"] is False  # the record as it was at revision 1


def test_backfilled_and_session_records_produce_events_like_webhooks(client: TestClient, engine: Engine) -> None:
    records.store(engine, [records.summary("conv_listed"), records.session("conv_session")])
    records.store(engine, [records.detail("conv_listed", source=Source.DETAIL)])

    seen = [(e["type"], e["data"]["conversation_id"], e["data"]["revision"]) for e in all_events(client)]
    assert sorted(seen) == [
        ("conversation.created", "conv_listed", 1),
        ("conversation.created", "conv_session", 1),
        ("conversation.updated", "conv_listed", 2),
    ]


def test_a_consumer_following_next_cursor_sees_every_event_once_in_commit_order(
    client: TestClient, engine: Engine
) -> None:
    for n in range(7):
        records.store(engine, [records.summary(f"conv_{n % 3}", start=1_760_000_000 + n)])

    seen: list[dict[str, Any]] = []
    cursor = None
    for _ in range(20):
        page = feed_page(client, limit=2, **({"after": cursor} if cursor else {}))
        if not page["events"]:
            assert page["next_cursor"] == cursor  # an empty page keeps the consumer where it was
            break
        seen += page["events"]
        cursor = page["next_cursor"]
    assert [event["id"] for event in seen] == [event["id"] for event in all_events(client)]
    assert len({event["id"] for event in seen}) == len(seen) == 7
    assert_revisions_in_order_without_gaps(seen)


def test_long_polling_answers_when_an_event_commits(client: TestClient, engine: Engine) -> None:
    cursor = feed_page(client)["next_cursor"]
    later = threading.Timer(0.5, lambda: records.store(engine, [records.session("conv_late")]))
    later.start()
    try:
        page = feed_page(client, after=cursor, wait=20)
    finally:
        later.join()
    assert [event["data"]["conversation_id"] for event in page["events"]] == ["conv_late"]


def test_without_wait_an_empty_feed_answers_at_once(client: TestClient) -> None:
    assert feed_page(client) == {"events": [], "next_cursor": "0"}


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"after": "abc"}, "after"),
        ({"after": "-1"}, "after"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"wait": "31"}, "wait"),
        ({"wait": "1.5"}, "wait"),
        ({"since": "1"}, "since"),
    ],
)
def test_an_unusable_parameter_is_refused_naming_it(client: TestClient, params: dict[str, str], parameter: str) -> None:
    answer = client.get("/v1/events", params=params, headers=AUTH)
    assert answer.status_code == 422
    assert answer.json()["parameter"] == parameter


def test_the_feed_needs_a_token(client: TestClient) -> None:
    assert client.get("/v1/events").status_code == 401


def test_clearing_audio_by_retention_is_an_event(client: TestClient, engine: Engine, settings: Settings) -> None:
    records.store(engine, [records.detail("conv_old", start=1_000), records.audio("conv_old", settings.data_dir, b"x")])
    purge.purge(engine, BlobStore(settings.data_dir), purge.Cutoff(2_000), audio_only=True)

    last = all_events(client)[-1]
    assert last["type"] == "conversation.updated"
    assert last["data"]["changed"] == ["audio_stored", "revision"]
    assert last["data"]["conversation"] == client.get("/v1/conversations/conv_old", headers=AUTH).json()


def test_erasing_deletes_the_earlier_events_and_leaves_one_deleted_event(
    admin_client: TestClient, engine: Engine
) -> None:
    records.store(engine, [records.detail("conv_gone", agent_id="agent_7"), records.session("conv_kept")])
    records.store(engine, [records.detail("conv_gone", agent_id="agent_7", call_successful="failure")])

    assert admin_client.delete("/v1/conversations/conv_gone", headers=ADMIN).status_code == 204

    remaining = all_events(admin_client)
    assert [e["data"]["conversation_id"] for e in remaining] == ["conv_kept", "conv_gone"]
    deleted = remaining[-1]
    assert deleted["type"] == "conversation.deleted"
    assert deleted["data"] == {"conversation_id": "conv_gone", "revision": 3, "changed": []}
    with engine.connect() as conn:
        (agent_id,) = conn.execute(
            sa.select(outbox.forward_events.c.agent_id).where(outbox.forward_events.c.event_id == deleted["id"])
        ).one()
    assert agent_id == "agent_7"  # what the NATS subject of the deleted event is made of


ADMIN = {"Authorization": "Bearer admin-token"}


@pytest.fixture
def admin_client(settings: Settings, engine: Engine) -> Iterator[TestClient]:
    admin = settings.model_copy(update={"admin_tokens": (SecretStr("admin-token"),)})
    with TestClient(create_app(admin, engine=engine)) as client:
        yield client


def assert_revisions_in_order_without_gaps(seen: list[dict[str, Any]]) -> None:
    revisions: dict[str, list[int]] = defaultdict(list)
    for event in seen:
        revisions[event["data"]["conversation_id"]].append(event["data"]["revision"])
    for conversation_id, numbers in revisions.items():
        assert numbers == list(range(1, len(numbers) + 1)), conversation_id


# --- commit order on PostgreSQL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_an_event_that_commits_after_a_later_numbered_one_is_still_not_skipped(
    client: TestClient, engine: Engine
) -> None:
    """The hole a row id leaves: A takes the smaller id, B commits first, a consumer reads B; then A commits."""
    with engine.connect() as slow:
        slow_transaction = slow.begin()
        store.apply(slow, records.session("conv_slow"), AT)  # takes its event id, does not commit yet
        records.store(engine, [records.session("conv_fast")])  # a larger event id, committed first

        first = feed_page(client)
        assert [e["data"]["conversation_id"] for e in first["events"]] == ["conv_fast"]
        slow_transaction.commit()

    second = feed_page(client, after=first["next_cursor"])
    assert [e["data"]["conversation_id"] for e in second["events"]] == ["conv_slow"]
    with engine.connect() as conn:
        ids = dict(conn.execute(sa.select(outbox.forward_events.c.conversation_id, outbox.forward_events.c.id)).all())
    assert ids["conv_slow"] < ids["conv_fast"]  # a cursor over ids would have skipped conv_slow


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_sequencers_at_once_give_each_event_one_position(engine: Engine) -> None:
    records.store(engine, [records.session(f"conv_{n}") for n in range(50)])
    numbered: list[int] = []
    barrier = threading.Barrier(4)

    def sequencer() -> None:
        barrier.wait()
        for _ in range(10):
            numbered.append(transaction(engine, lambda conn: feed.sequence(conn, batch=3)))

    threads = [threading.Thread(target=sequencer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # One that found another at work skipped its turn: whatever is left is numbered now, after the others.
    while count := transaction(engine, feed.sequence):
        numbered.append(count)
    with engine.connect() as conn:
        positions = sorted(conn.execute(sa.select(outbox.forward_events.c.position)).scalars())
    assert sum(numbered) == 50
    assert positions == list(range(1, 51))


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_servers_and_a_reconcile_racing_a_consumer_skip_no_event_and_repeat_none(
    settings: Settings, engine: Engine
) -> None:
    """Two `postcall serve` processes take webhooks and a reconcile backfills, all on one PostgreSQL, while a
    consumer follows the feed with small pages; afterwards it has seen exactly the events stored, in their order."""
    agents = ("agent_a", "agent_b")
    conversations = seed_conversations(120, agents, now=int(time.time()), spread_seconds=3600, seed=5)
    platform = FakePlatform(api_key="race-key", conversations=conversations)
    env = {
        "POSTCALL_DATABASE_URL": settings.database_url,
        "POSTCALL_WEBHOOK_SECRETS": webhooks.SECRET,
        "POSTCALL_DATA_DIR": str(settings.data_dir),
        "POSTCALL_API_TOKENS": "test-token",
    }
    by_webhook = [platform.transcription_event(c.conversation_id) for c in conversations[::2]]
    with platform.serve() as fake_url, serve_process(env) as (one, _), serve_process(env, "--no-migrate") as (two, _):
        seen: list[dict[str, Any]] = []
        sent: list[int] = []
        done = threading.Event()

        def consume() -> None:
            cursor = None
            with httpx.Client(base_url=one, headers=AUTH, timeout=30) as http:
                while True:
                    params: dict[str, Any] = {"limit": 7, "wait": 1}
                    if cursor is not None:
                        params["after"] = cursor
                    page = http.get("/v1/events", params=params).raise_for_status().json()
                    seen.extend(page["events"])
                    cursor = page["next_cursor"]
                    if done.is_set() and not page["events"]:
                        return

        def send(base: str, batch: list[dict[str, Any]]) -> None:
            sender = WebhookSender(f"{base}/webhooks/elevenlabs", webhooks.SECRET)
            for event in batch:
                sent.append(sender.send(event).status)

        consumer = threading.Thread(target=consume)
        writers = [
            threading.Thread(target=send, args=(one, by_webhook[0::2])),
            threading.Thread(target=send, args=(two, by_webhook[1::2])),
        ]
        consumer.start()
        for writer in writers:
            writer.start()
        run = reconcile(settings, fake_url, "race-key", "--since", "2h")
        for writer in writers:
            writer.join()
        done.set()
        consumer.join(timeout=120)
        assert not consumer.is_alive()

    assert run.exit_code == 0, run.stderr
    assert sent == [200] * len(by_webhook)
    with engine.connect() as conn:
        stored = list(
            conn.execute(
                sa.select(outbox.forward_events.c.event_id).order_by(outbox.forward_events.c.position)
            ).scalars()
        )
    assert len(stored) >= len(conversations)
    assert [event["id"] for event in seen] == stored
    assert_revisions_in_order_without_gaps(seen)
    assert {event["data"]["conversation_id"] for event in seen} == {c.conversation_id for c in conversations}
