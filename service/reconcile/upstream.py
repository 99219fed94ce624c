"""The workspace's post-call webhook as ElevenLabs reports it: which one it is, and whether it looks healthy. Pure.

Shapes (ElevenLabs' Python SDK, `elevenlabs.types`): `GET /v1/convai/settings` is GetConvAiSettingsResponseModel,
whose `webhooks` (ConvAiWebhooks) names the post-call webhook (`post_call_webhook_id`) and what it is sent
(`events`: transcript, audio, call_initiation_failure, unredacted_*; `transcript_format`: json | opentelemetry).
`GET /v1/workspace/webhooks` is WorkspaceWebhookListResponseModel: each webhook's `webhook_id`, `name`,
`webhook_url`, `auth_type` (hmac | oauth2 | mtls), `is_disabled`, `is_auto_disabled`,
`most_recent_failure_error_code` and `most_recent_failure_timestamp` (unix seconds; any answer but 200 is a failure).
Whether retries are enabled (`retry_enabled`) is something the API takes when a webhook is written; it is read here
only where an answer carries it.

ElevenLabs auto-disables a webhook after 10 consecutive failures when its last success is over 7 days old (or it
never had one), and retries a delivery only when retries are enabled: a webhook that is disabled, auto-disabled or
failed recently is one whose conversations only the reconciler will store. Values of the wrong type read as absent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# A failure this recent is news: older ones were seen by earlier hourly runs, and a webhook that failed once a week
# ago and has delivered since is healthy.
RECENT_FAILURE_SECONDS = 86400
TRANSCRIPT_EVENTS = frozenset({"transcript", "unredacted_transcript"})


class NoPostCallWebhook(Exception):
    """The workspace has no usable post-call webhook; `str()` is a sentence that says why, for a person."""


@dataclass(frozen=True)
class PostCallWebhook:
    webhook_id: str
    name: str | None
    url: str | None
    auth_type: str | None
    is_disabled: bool
    is_auto_disabled: bool
    failure_code: int | None
    failure_at: int | None
    retry_enabled: bool | None  # None: the answer does not say
    events: tuple[str, ...] | None  # what ElevenLabs sends it; None: the answer does not say
    transcript_format: str | None

    def described(self) -> str:
        named = f"{self.name!r} " if self.name else ""
        return f"the post-call webhook {named}({self.url or self.webhook_id})"

    @property
    def sends_transcripts(self) -> bool | None:
        return None if self.events is None else bool(TRANSCRIPT_EVENTS & set(self.events))


def post_call_webhook(settings: Any, webhooks: Any) -> PostCallWebhook:
    """The webhook the ConvAI settings name as the post-call one, read from the workspace's list; NoPostCallWebhook
    when none is named or the named one is not listed."""
    hooks = _object(_object(settings).get("webhooks"))
    webhook_id = hooks.get("post_call_webhook_id")
    if not isinstance(webhook_id, str) or not webhook_id:
        raise NoPostCallWebhook(
            "the workspace has no post-call webhook (ConvAI settings name none): ElevenLabs sends no webhooks, "
            "and only the reconciler stores conversations"
        )
    entries = webhooks if isinstance(webhooks, Sequence) and not isinstance(webhooks, str | bytes) else []
    entry = next((_object(e) for e in entries if _object(e).get("webhook_id") == webhook_id), None)
    if entry is None:
        raise NoPostCallWebhook(
            f"the post-call webhook {webhook_id} named in the ConvAI settings is not among the workspace's webhooks"
        )
    events = hooks.get("events")
    return PostCallWebhook(
        webhook_id=webhook_id,
        name=_str(entry.get("name")),
        url=_str(entry.get("webhook_url")),
        auth_type=_str(entry.get("auth_type")),
        is_disabled=entry.get("is_disabled") is True,
        is_auto_disabled=entry.get("is_auto_disabled") is True,
        failure_code=_int(entry.get("most_recent_failure_error_code")),
        failure_at=_int(entry.get("most_recent_failure_timestamp")),
        retry_enabled=_bool(entry.get("retry_enabled")),
        events=tuple(e for e in events if isinstance(e, str)) if isinstance(events, list) else None,
        transcript_format=_str(hooks.get("transcript_format")),
    )


def health_warnings(webhook: PostCallWebhook, now: int) -> list[str]:
    """Sentences for a person, one per problem: disabled, auto-disabled, failed within RECENT_FAILURE_SECONDS
    (an auto-disabled webhook's last failure is said once). No sentence: healthy."""
    found = (disabled(webhook), auto_disabled(webhook), failed_recently(webhook, now))
    return [warning for warning in found if warning is not None]


def disabled(webhook: PostCallWebhook) -> str | None:
    if not webhook.is_disabled:
        return None
    return (
        f"{webhook.described()} is disabled: ElevenLabs sends it nothing; enable it in the workspace's webhook settings"
    )


def auto_disabled(webhook: PostCallWebhook) -> str | None:
    if not webhook.is_auto_disabled:
        return None
    return (
        f"{webhook.described()} was auto-disabled by ElevenLabs after repeated failures{_last_failure(webhook)}: "
        "fix what failed, then re-enable it in the workspace's webhook settings"
    )


def failed_recently(webhook: PostCallWebhook, now: int) -> str | None:
    recent = webhook.failure_at is not None and now - webhook.failure_at <= RECENT_FAILURE_SECONDS
    if not recent or webhook.is_auto_disabled:
        return None
    return (
        f"{webhook.described()} failed recently{_last_failure(webhook)}: see postcall's logs; the reconciler stores "
        "what the webhook missed"
    )


def assess(settings: Any, webhooks: Any, now: int) -> tuple[bool, list[str]]:
    """Whether the workspace's post-call webhook is healthy, and the warnings that say why not."""
    try:
        webhook = post_call_webhook(settings, webhooks)
    except NoPostCallWebhook as exc:
        return False, [str(exc)]
    warnings = health_warnings(webhook, now)
    return not warnings, warnings


def _last_failure(webhook: PostCallWebhook) -> str:
    if webhook.failure_at is None:
        return ""
    code = f"HTTP {webhook.failure_code} " if webhook.failure_code is not None else ""
    return f" (last failure: {code}at {iso(webhook.failure_at)})"


def iso(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat().replace("+00:00", "Z")


def _object(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    # A timestamp far past any date breaks datetime: out of range reads as absent.
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**37 else None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None
