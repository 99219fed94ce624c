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
