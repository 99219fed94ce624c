"""The fake platform's answers parse into ElevenLabs' own models (its Python SDK, `elevenlabs.types`).

The SDK is a dev dependency for this one test: pydantic validation of the SDK's response models is the nearest
thing to the real API's contract that runs offline. A field the fake gets wrong (a missing required one, a float
where ElevenLabs sends an integer, an unknown enum value in a typed field) fails here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from elevenlabs.types import (
    GetConvAiSettingsResponseModel,
    GetConversationResponseModel,
    GetConversationsPageResponseModel,
    WorkspaceWebhookListResponseModel,
)

from service.testing import FakeConversation, FakePlatform, seed_conversations

KEY = "sdk-key"
NOW = int(time.time())


@pytest.fixture
def platform() -> FakePlatform:
    conversations = seed_conversations(60, ("agent_a", "agent_b"), now=NOW, processing_share=0.1, failed_share=0.1)
    platform = FakePlatform(api_key=KEY, conversations=conversations)
    platform.add(FakeConversation("conv_text_only", "agent_a", NOW - 30, has_audio=False))
    return platform


@pytest.fixture
def api(platform: FakePlatform) -> Iterator[httpx.Client]:
    with platform.serve() as base_url, httpx.Client(base_url=base_url, headers={"xi-api-key": KEY}) as client:
        yield client


@pytest.mark.parametrize("summary_mode", ["exclude", "include"])
def test_list_pages_parse_into_the_sdks_page_model(api: httpx.Client, summary_mode: str) -> None:
    params: dict[str, str | int] = {"page_size": 25, "summary_mode": summary_mode}
    summaries = 0
    while True:
        raw = api.get("/v1/convai/conversations", params=params).json()
        page = GetConversationsPageResponseModel.model_validate(raw)
        summaries += len(page.conversations)
        # pydantic would read 22.0 as 22: the wire itself must carry an integer, as ElevenLabs sends it.
        assert all(type(entry["call_duration_secs"]) is int for entry in raw["conversations"])
        for summary in page.conversations:
            done = summary.status == "done"
            assert (summary.transcript_summary is not None) == (done and summary_mode == "include")
        if not page.has_more:
            break
        assert page.next_cursor is not None
        params["cursor"] = page.next_cursor
    assert summaries == 61


def test_every_detail_parses_into_the_sdks_conversation_model(platform: FakePlatform, api: httpx.Client) -> None:
    phone_calls = batch_calls = 0
    for conversation in platform.all():
        raw = api.get(f"/v1/convai/conversations/{conversation.conversation_id}").json()
        detail = GetConversationResponseModel.model_validate(raw)
        assert detail.conversation_id == conversation.conversation_id
        assert type(raw["metadata"]["call_duration_secs"]) is int
        assert detail.has_audio == (conversation.has_audio and conversation.status == "done")
        if detail.metadata.phone_call is not None:
            phone_calls += 1
            assert detail.metadata.phone_call.type == "twilio"
            assert detail.metadata.phone_call.direction in ("inbound", "outbound")
        if detail.metadata.batch_call is not None:
            batch_calls += 1
            assert detail.metadata.batch_call.batch_call_id.startswith("btcal_")
    assert phone_calls > batch_calls > 0  # the seeded set holds phone calls, some of them from batches
    assert not GetConversationResponseModel.model_validate(
        api.get("/v1/convai/conversations/conv_text_only").json()
    ).has_audio


def test_the_workspace_webhooks_and_convai_settings_parse_into_the_sdks_models(
    platform: FakePlatform, api: httpx.Client
) -> None:
    platform.set_webhook(is_auto_disabled=True, most_recent_failure_error_code=503, most_recent_failure_timestamp=NOW)

    webhooks = WorkspaceWebhookListResponseModel.model_validate(api.get("/v1/workspace/webhooks").json()).webhooks
    settings = GetConvAiSettingsResponseModel.model_validate(api.get("/v1/convai/settings").json())

    [webhook] = webhooks
    assert settings.webhooks is not None
    assert settings.webhooks.post_call_webhook_id == webhook.webhook_id
    assert settings.webhooks.events == ["transcript", "call_initiation_failure"]
    assert webhook.auth_type == "hmac"
    assert webhook.is_auto_disabled and not webhook.is_disabled
    assert (webhook.most_recent_failure_error_code, webhook.most_recent_failure_timestamp) == (503, NOW)
