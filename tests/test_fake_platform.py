"""The fake ElevenLabs platform answers like the real API, over real HTTP, and fails on demand."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from service.broker.token import conversation_id_from_signed_url, conversation_id_from_token, token_claims
from service.testing import FakeConversation, FakePlatform, Faults, plan_deliveries, seed_conversations

KEY = "fake-key"
NOW = int(time.time())


@pytest.fixture
def platform() -> FakePlatform:
    conversations = seed_conversations(250, ("agent_a", "agent_b"), now=NOW, seed=7)
    return FakePlatform(api_key=KEY, conversations=conversations)


@pytest.fixture
def api(platform: FakePlatform) -> Iterator[httpx.Client]:
    with platform.serve() as base_url, httpx.Client(base_url=base_url, headers={"xi-api-key": KEY}) as client:
        yield client


def test_every_request_needs_the_api_key(platform: FakePlatform, api: httpx.Client) -> None:
    answer = api.get("/v1/convai/conversations", headers={"xi-api-key": "wrong"})
    assert answer.status_code == 401
    assert platform.calls[-1].status == 401


@pytest.mark.parametrize("size", ["0", "101", "ten"])
def test_page_size_over_100_is_refused(api: httpx.Client, size: str) -> None:
    assert api.get("/v1/convai/conversations", params={"page_size": size}).status_code == 422


def test_cursor_pages_cover_an_agent_window_once_newest_first(platform: FakePlatform, api: httpx.Client) -> None:
    after, before = NOW - 2 * 86400, NOW - 3600
    expected = [
        c.conversation_id for c in platform.all() if c.agent_id == "agent_a" and after < c.start_time_unix_secs < before
    ]
    seen: list[dict[str, object]] = []
    params: dict[str, object] = {
        "agent_id": "agent_a",
        "call_start_after_unix": after,
        "call_start_before_unix": before,
        "page_size": 20,
    }
    while True:
        page = api.get("/v1/convai/conversations", params=params).json()
        seen.extend(page["conversations"])
        if not page["has_more"]:
            break
        params["cursor"] = page["next_cursor"]
    assert [s["conversation_id"] for s in seen] == expected
    starts = [s["start_time_unix_secs"] for s in seen]
    assert starts == sorted(starts, reverse=True)
    assert len(platform.calls_to("list")) == max(1, -(-len(expected) // 20))  # no empty last page


def test_details_and_audio_follow_the_conversation(platform: FakePlatform, api: httpx.Client) -> None:
    done = next(c for c in platform.all() if c.status == "done" and c.has_audio)
    detail = api.get(f"/v1/convai/conversations/{done.conversation_id}").json()
    assert detail["status"] == "done"
    assert detail["transcript"] and detail["analysis"]["transcript_summary"]
    audio = api.get(f"/v1/convai/conversations/{done.conversation_id}/audio")
    assert audio.headers["content-type"] == "audio/mpeg"
    assert audio.content == done.audio(platform.audio_bytes)
    assert api.get("/v1/convai/conversations/conv_unknown").status_code == 404


def test_faults_on_demand(platform: FakePlatform, api: httpx.Client) -> None:
    victim = platform.all()[0].conversation_id
    platform.failing_ids.add(victim)
    assert api.get(f"/v1/convai/conversations/{victim}").status_code == 500
    platform.throttle(1, retry_after="3", kinds={"list"})
    throttled = api.get("/v1/convai/conversations")
    assert throttled.status_code == 429
    assert throttled.headers["retry-after"] == "3"
    assert api.get("/v1/convai/conversations").status_code == 200
    assert platform.calls_to("list")[0].response_headers["retry-after"] == "3"


def test_a_processing_conversation_becomes_done(platform: FakePlatform, api: httpx.Client) -> None:
    platform.add(FakeConversation("conv_slow1", "agent_a", NOW - 60, status="processing"))
    assert api.get("/v1/convai/conversations/conv_slow1").json()["status"] == "processing"
    platform.set_status("conv_slow1", "done")
    assert api.get("/v1/convai/conversations/conv_slow1").json()["transcript"]


def test_a_minted_webrtc_token_names_a_new_conversation_that_can_be_completed(
    platform: FakePlatform, api: httpx.Client
) -> None:
    answer = api.get("/v1/convai/conversation/token", params={"agent_id": "agent_a", "participant_name": "ann"})
    token = answer.json()["token"]
    claims = token_claims(token)
    assert claims is not None
    assert {"sub", "name", "exp", "nbf", "iss", "video"} <= set(claims)
    assert claims["video"]["roomJoin"] is True
    header = orjson.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "HS256", "typ": "JWT"}
    cid = conversation_id_from_token(token)
    assert cid is not None and cid.startswith("conv_")
    assert platform.get(cid).status == "initiated"
    listed = api.get("/v1/convai/conversations", params={"agent_id": "agent_a", "page_size": 1}).json()
    assert listed["conversations"][0]["conversation_id"] == cid
    platform.complete(cid)
    assert api.get(f"/v1/convai/conversations/{cid}").json()["status"] == "done"
    assert platform.transcription_event(cid)["data"]["transcript"]


def test_a_signed_url_carries_its_conversation_id(platform: FakePlatform, api: httpx.Client) -> None:
    answer = api.get(
        "/v1/convai/conversation/get-signed-url", params={"agent_id": "agent_b", "include_conversation_id": "true"}
    ).json()
    assert answer["signed_url"].startswith("wss://")
    assert "conversation_signature=" in answer["signed_url"]
    cid = conversation_id_from_signed_url(answer)
    assert cid == answer["conversation_id"]
    assert platform.get(cid).agent_id == "agent_b"
    assert api.get("/v1/convai/conversation/token", params={"agent_id": "nobody"}).status_code == 404


def test_delivery_faults_drop_duplicate_and_reorder_a_share() -> None:
    events = [{"type": "post_call_transcription", "data": {"conversation_id": f"c{i}"}} for i in range(1000)]
    plan = plan_deliveries(events, Faults(drop=0.3, duplicate=0.1, reorder=0.2, seed=3))
    sent_ids = [e["data"]["conversation_id"] for e in plan.sends]
    dropped = {e["data"]["conversation_id"] for e in plan.dropped}
    assert 250 < len(dropped) < 350
    assert not dropped & set(sent_ids)
    assert set(sent_ids) | dropped == {f"c{i}" for i in range(1000)}
    assert 40 < len(sent_ids) - len(set(sent_ids)) < 110  # duplicates
    assert sent_ids != sorted(sent_ids, key=lambda cid: int(cid[1:]))  # reordered


# --- where the fake used to be kinder than the real API (issue 13) ---------------------------------------------------


def test_list_entries_carry_their_summary_only_when_asked_for_it(api: httpx.Client) -> None:
    default = api.get("/v1/convai/conversations", params={"page_size": 100}).json()["conversations"]
    included = api.get("/v1/convai/conversations", params={"page_size": 100, "summary_mode": "include"}).json()[
        "conversations"
    ]

    assert all("transcript_summary" not in entry for entry in default)
    assert [entry["conversation_id"] for entry in included] == [entry["conversation_id"] for entry in default]
    assert all(entry["transcript_summary"] for entry in included if entry["status"] == "done")
    assert api.get("/v1/convai/conversations", params={"summary_mode": "all"}).status_code == 422


def test_cursors_are_opaque_and_an_unknown_one_is_refused(platform: FakePlatform, api: httpx.Client) -> None:
    page = api.get("/v1/convai/conversations", params={"page_size": 10}).json()
    cursor = page["next_cursor"]
    last = page["conversations"][-1]

    assert str(last["start_time_unix_secs"]) not in cursor and last["conversation_id"] not in cursor
    decoded = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    assert str(last["start_time_unix_secs"]).encode() not in decoded
    assert api.get("/v1/convai/conversations", params={"page_size": 10, "cursor": cursor}).status_code == 200
    made_up = base64.urlsafe_b64encode(f"{last['start_time_unix_secs']}:{last['conversation_id']}".encode()).decode()
    assert api.get("/v1/convai/conversations", params={"cursor": made_up}).status_code == 422


def test_without_agent_id_the_whole_workspace_is_listed_a_deleted_agents_conversations_included(
    platform: FakePlatform, api: httpx.Client
) -> None:
    platform.delete_agent("agent_b")

    agents = [agent["agent_id"] for agent in api.get("/v1/convai/agents").json()["agents"]]
    listed: list[str] = []
    params: dict[str, object] = {"page_size": 100}
    while True:
        page = api.get("/v1/convai/conversations", params=params).json()
        listed += [entry["conversation_id"] for entry in page["conversations"]]
        if not page["has_more"]:
            break
        params["cursor"] = page["next_cursor"]

    assert agents == ["agent_a"]
    assert listed == [c.conversation_id for c in platform.all()]
    assert any(platform.get(cid).agent_id == "agent_b" for cid in listed)
    assert api.get("/v1/convai/conversation/token", params={"agent_id": "agent_b"}).status_code == 404


def test_audio_faults_per_conversation_and_delete(platform: FakePlatform, api: httpx.Client) -> None:
    first, second = [c for c in platform.all() if c.status == "done" and c.has_audio][:2]
    platform.audio_faults[first.conversation_id] = 400

    assert api.get(f"/v1/convai/conversations/{first.conversation_id}/audio").status_code == 400
    assert api.get(f"/v1/convai/conversations/{first.conversation_id}").status_code == 200  # only its audio
    assert api.get(f"/v1/convai/conversations/{second.conversation_id}/audio").status_code == 200

    assert api.delete(f"/v1/convai/conversations/{second.conversation_id}").status_code == 200
    assert api.get(f"/v1/convai/conversations/{second.conversation_id}").status_code == 404
    assert api.delete(f"/v1/convai/conversations/{second.conversation_id}").status_code == 404
    listed = api.get("/v1/convai/conversations", params={"page_size": 100}).json()["conversations"]
    assert second.conversation_id not in {entry["conversation_id"] for entry in listed}


def test_the_post_call_webhook_health_is_switchable(platform: FakePlatform, api: httpx.Client) -> None:
    [healthy] = api.get("/v1/workspace/webhooks").json()["webhooks"]
    assert not healthy["is_disabled"] and not healthy["is_auto_disabled"]
    assert healthy["most_recent_failure_timestamp"] is None and "retry_enabled" not in healthy
    assert api.get("/v1/convai/settings").json()["webhooks"]["post_call_webhook_id"] == healthy["webhook_id"]

    platform.set_webhook(is_auto_disabled=True, retry_enabled=False, most_recent_failure_error_code=500)
    platform.post_call_webhook_id = None

    [sick] = api.get("/v1/workspace/webhooks").json()["webhooks"]
    assert sick["is_auto_disabled"] and sick["retry_enabled"] is False and sick["most_recent_failure_error_code"] == 500
    assert api.get("/v1/convai/settings").json()["webhooks"]["post_call_webhook_id"] is None
    with pytest.raises(AttributeError):
        platform.set_webhook(is_sick=True)
