"""Issue 18's read-side and id items, through the real app over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy.engine import Engine

from service.config import Settings
from service.record import store
from service.storage.db import transaction
from service.testing import FakeConversation, FakePlatform, seed_conversations
from service.web.app import create_app
from tests.support import records
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


# --- item 13: integers in `var.` filters match exactly ------------------------------------------------------------


def test_a_var_filter_matches_an_integer_beyond_2_to_the_53_exactly(client: httpx.Client, engine: Engine) -> None:
    records.store(
        engine,
        [
            records.detail("conv_odd", dynamic_variables={"order": 9007199254740993}),
            records.detail("conv_even", dynamic_variables={"order": 9007199254740992}),
            records.detail("conv_text", dynamic_variables={"order": "9007199254740993"}),
        ],
    )

    def matching(value: str) -> set[str]:
        answer = client.get("/v1/conversations", params={"var.order": value}, headers=AUTH)
        assert answer.status_code == 200, answer.text
        return {record["conversation_id"] for record in answer.json()["conversations"]}

    assert matching("9007199254740993") == {"conv_odd", "conv_text"}
    assert matching("9007199254740992") == {"conv_even"}
    assert matching("-9007199254740993") == set()


# --- item 12: how many `var.` / `label.` filters -----------------------------------------------------------------


def _json_filters(count: int) -> list[tuple[str, str]]:
    return [(f"{'var' if i % 2 else 'label'}.k{i}", str(i)) for i in range(count)]


@pytest.mark.parametrize("count", [21, 1000])
def test_more_var_and_label_filters_than_the_cap_are_422_on_either_database(
    client: httpx.Client, engine: Engine, count: int
) -> None:
    records.store(engine, [records.detail("conv_1", dynamic_variables={"k1": 1})])
    answer = client.get("/v1/conversations", params=_json_filters(count), headers=AUTH)
    assert answer.status_code == 422, answer.text
    assert answer.json() == {
        "error": "label.k20: at most 20 var. and label. filters may be given together",
        "parameter": "label.k20",
    }


def test_as_many_filters_as_the_cap_are_answered(client: httpx.Client, engine: Engine) -> None:
    variables = {f"k{i}": i for i in range(1, 20, 2)}
    labels = {f"k{i}": str(i) for i in range(0, 20, 2)}
    records.store(engine, [records.detail("conv_1", dynamic_variables=variables), records.session("conv_2")])
    transaction(engine, lambda conn: store.apply(conn, records.session("conv_1", labels=labels), records.AT))
    answer = client.get("/v1/conversations", params=_json_filters(20), headers=AUTH)
    assert answer.status_code == 200, answer.text
    assert [record["conversation_id"] for record in answer.json()["conversations"]] == ["conv_1"]


# --- item 17: a trailing slash ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/conversations/"), ("GET", "/readyz/"), ("POST", "/webhooks/elevenlabs/")]
)
def test_a_trailing_slash_is_404_never_a_redirect_to_the_clients_host(
    client: httpx.Client, method: str, path: str
) -> None:
    answer = client.request(method, path, headers={**AUTH, "Host": "attacker.example"})
    assert answer.status_code == 404
    assert "location" not in answer.headers
