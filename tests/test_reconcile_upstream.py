"""Reading the workspace's post-call webhook from ElevenLabs' answers (reconcile/upstream.py): pure."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.reconcile.upstream import RECENT_FAILURE_SECONDS, assess, iso, post_call_webhook

NOW = 1_800_000_000


def settings(webhook_id: str | None = "wh_1", **hooks: Any) -> dict[str, Any]:
    return {"webhooks": {"post_call_webhook_id": webhook_id, **hooks}, "can_use_mcp_servers": False}


def webhook(**fields: Any) -> dict[str, Any]:
    return {
        "name": "postcall",
        "webhook_id": "wh_1",
        "webhook_url": "https://calls.example.com/webhooks/elevenlabs",
        "is_disabled": False,
        "is_auto_disabled": False,
        "created_at_unix": 1_700_000_000,
        "auth_type": "hmac",
        "most_recent_failure_error_code": None,
        "most_recent_failure_timestamp": None,
        **fields,
    }


def test_a_healthy_webhook_has_no_warning() -> None:
    other = webhook(webhook_id="wh_2", is_auto_disabled=True)  # another product's webhook: not ours to judge
    assert assess(settings(), [other, webhook()], NOW) == (True, [])


def test_an_old_failure_is_no_news_a_recent_one_is() -> None:
    old = webhook(most_recent_failure_error_code=500, most_recent_failure_timestamp=NOW - RECENT_FAILURE_SECONDS - 1)
    assert assess(settings(), [old], NOW) == (True, [])
    recent = webhook(most_recent_failure_error_code=500, most_recent_failure_timestamp=NOW - RECENT_FAILURE_SECONDS)
    healthy, [warning] = assess(settings(), [recent], NOW)
    assert not healthy
    assert warning == (
        "the post-call webhook 'postcall' (https://calls.example.com/webhooks/elevenlabs) failed recently (last "
        f"failure: HTTP 500 at {iso(NOW - RECENT_FAILURE_SECONDS)}): see postcall's logs; the reconciler stores what "
        "the webhook missed"
    )


def test_disabled_and_auto_disabled_are_each_a_warning_and_the_failure_is_said_once() -> None:
    both = webhook(is_disabled=True, is_auto_disabled=True, most_recent_failure_timestamp=NOW - 60)
    healthy, warnings = assess(settings(), [both], NOW)
    assert not healthy
    assert len(warnings) == 2
    assert "is disabled" in warnings[0]
    assert "auto-disabled" in warnings[1] and f"(last failure: at {iso(NOW - 60)})" in warnings[1]


@pytest.mark.parametrize(
    ("answer_settings", "answer_webhooks", "says"),
    [
        (settings(None), [webhook()], "the workspace has no post-call webhook"),
        ({}, [webhook()], "the workspace has no post-call webhook"),
        (settings("wh_gone"), [webhook()], "wh_gone named in the ConvAI settings is not among"),
        (settings(), "not a list", "wh_1 named in the ConvAI settings is not among"),
    ],
)
def test_no_usable_post_call_webhook_is_unhealthy(answer_settings: Any, answer_webhooks: Any, says: str) -> None:
    healthy, [warning] = assess(answer_settings, answer_webhooks, NOW)
    assert not healthy
    assert says in warning


def test_what_the_settings_say_is_sent_is_read_where_they_say_it() -> None:
    sent = post_call_webhook(settings(events=["audio", "call_initiation_failure"]), [webhook(retry_enabled=False)])
    assert sent.sends_transcripts is False and sent.retry_enabled is False
    assert post_call_webhook(settings(events=["unredacted_transcript"]), [webhook()]).sends_transcripts is True
    unsaid = post_call_webhook(settings(), [webhook()])
    assert unsaid.sends_transcripts is None and unsaid.retry_enabled is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "webhook_id": st.just("wh_1") | json_values,
        "is_disabled": json_values,
        "is_auto_disabled": json_values,
        "most_recent_failure_error_code": json_values,
        "most_recent_failure_timestamp": st.integers() | json_values,
        "webhook_url": json_values,
        "name": json_values,
    },
)


@given(
    answer_settings=json_values | st.builds(settings, st.just("wh_1") | json_values),
    answer_webhooks=json_values | st.lists(fields | json_values, max_size=3),
)
def test_any_answer_at_all_gives_a_verdict_never_an_exception(answer_settings: Any, answer_webhooks: Any) -> None:
    healthy, warnings = assess(answer_settings, answer_webhooks, NOW)
    assert healthy == (warnings == [])
    assert all(isinstance(warning, str) and warning for warning in warnings)
