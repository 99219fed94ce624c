"""Issue 18's read-side and id items, through the real app over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy.engine import Engine

from service.config import Settings
from service.testing import FakeConversation, FakePlatform, seed_conversations
from service.web.app import create_app
from tests.support import webhooks as wh
from tests.support.live import live_server
from tests.support.reconcile import reconcile, rows

AUTH = {"Authorization": "Bearer test-token"}
NOW = int(time.time())


@pytest.fixture
def client(settings: Settings, engine: Engine) -> Iterator[httpx.Client]:
    with live_server(create_app(settings, engine=engine)) as base_url, httpx.Client(base_url=base_url) as client:
        yield client


def post(client: httpx.Client, event: dict[str, object]) -> httpx.Response:
    body = wh.encode(event)
    return client.post("/webhooks/elevenlabs", content=body, headers=wh.signed_headers(body))


# --- item 15: an id holding `/` -------------------------------------------------------------------------------


@pytest.mark.parametrize("event", [wh.transcription("conv/1"), wh.failure("conv/1"), wh.audio("conv/1", b"ID3")])
def test_a_webhook_whose_id_holds_a_slash_is_refused_and_nothing_is_stored(
    client: httpx.Client, engine: Engine, event: dict[str, object]
) -> None:
    answer = post(client, event)
    assert answer.status_code == 400
    assert answer.json() == {"error": "data.conversation_id is not a usable id"}
    assert rows(engine, "conversation") == []
    assert rows(engine, "webhook_event") == []
    listed = client.get("/v1/conversations", headers=AUTH)
    assert listed.json()["conversations"] == []
    assert client.get("/v1/conversations/conv%2F1", headers=AUTH).status_code == 404


def test_another_event_type_with_such_an_id_is_still_archived_and_answered_200(
    client: httpx.Client, engine: Engine
) -> None:
    answer = post(client, {"type": "some_future_event", "data": {"conversation_id": "conv/1"}})
    assert answer.status_code == 200
    assert answer.json() == {"status": "ignored", "conversation_id": None}
    [archived] = rows(engine, "webhook_event")
    assert archived["event_type"] == "some_future_event" and archived["conversation_id"] is None


def test_an_id_with_characters_that_need_escaping_but_no_slash_is_served(client: httpx.Client) -> None:
    conversation_id = "conv 1?#%"
    assert post(client, wh.transcription(conversation_id)).status_code == 200
    answer = client.get("/v1/conversations/conv%201%3F%23%25", headers=AUTH)
    assert answer.status_code == 200
    assert answer.json()["conversation_id"] == conversation_id


@pytest.mark.usefixtures("tiny_retry_waits")
def test_the_reconciler_skips_a_listed_id_holding_a_slash_and_stores_the_rest(
    settings: Settings, engine: Engine
) -> None:
    conversations = seed_conversations(5, ("agent_a",), now=NOW, seed=8)
    conversations.append(FakeConversation("conv/slashed", "agent_a", NOW - 3600))
    platform = FakePlatform(api_key="k", conversations=conversations)

    with platform.serve() as base_url:
        run = reconcile(settings, base_url, "k", "--json")

    assert run.exit_code == 0, run.stderr
    assert {row["conversation_id"] for row in rows(engine, "conversation")} == {
        c.conversation_id for c in conversations[:5]
    }
    assert all("slashed" not in call.path for call in platform.calls_to("detail"))
