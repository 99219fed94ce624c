"""ElevenLabs payloads → normalized observations. Pure.

Shapes follow ElevenLabs' models (its Python SDK, `elevenlabs.types`): a `post_call_transcription` webhook's `data`
and `GET /v1/convai/conversations/{id}` are both a conversation detail (GetConversationResponseModel: its
`metadata` is ConversationHistoryMetadataCommonModel, with `phone_call` (twilio, sip_trunking, exotel: direction,
external_number) and `batch_call`; its `conversation_initiation_client_data` is
ConversationInitiationClientDataRequestOutput); list pages hold summaries (ConversationSummaryResponseModel). A
`call_initiation_failure` carries `failure_reason` and a `metadata` of `{"type": "twilio" | "sip", "body": …}`; a
`post_call_transcription_otel` carries the conversation as OTLP JSON traces in `otlp_traces` (`resourceSpans`,
whose root span `elevenlabs.conversation` spans the call).

Unknown fields are kept in the stored `metadata`/`analysis`/client data objects and the archived raw body, never
rejected. A value of the wrong type, or one a column cannot hold, reads as absent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.record.fields import BY_NAME
from service.record.merge import Audio, Observation, Source
from service.storage.tables import Conversation

TRANSCRIPTION = "post_call_transcription"
OTEL = "post_call_transcription_otel"
AUDIO = "post_call_audio"
FAILURE = "call_initiation_failure"
KNOWN_TYPES = frozenset({TRANSCRIPTION, OTEL, AUDIO, FAILURE})
MAX_ID_LENGTH = 256
BIGINT = range(-(2**63), 2**63)

# The longest value each bounded text column holds: a longer one is not a value we can keep (no real agent id is
# 257 characters), so it reads as absent rather than failing the write. The raw body keeps it in the archive.
_COLUMNS = Conversation.__table__.c  # type: ignore[attr-defined]
LIMITS: dict[str, int] = {
    column.name: column.type.length for column in _COLUMNS if getattr(column.type, "length", None) is not None
}
# A column a btree index holds must fit the index entry too: PostgreSQL refuses an entry over 2,704 bytes
# (ProgramLimitExceeded), however long the column may be. Lengths count characters, and a character is up to 4
# bytes of UTF-8, so these columns are bounded by bytes as well. (user_id, start, conversation_id): 1,536 bytes
# of user_id + 8 of start + 1,024 of the longest id (256 characters) + headers and padding = 2,592 at most.
# Every other indexed text column (agent_id, status, phone_number, batch_call_id: 256 characters at most) fits at 4
# bytes per character; tests/test_hardening_storage.py checks each index.
BTREE_MAX_ENTRY_BYTES = 2704
BYTE_LIMITS: dict[str, int] = {"user_id": 1536}


class PayloadError(Exception):
    """A correctly signed body that postcall cannot read (not JSON, no data.conversation_id, …)."""


@dataclass(frozen=True)
class Envelope:
    type: str
    conversation_id: str | None
    data: Mapping[str, Any]
    event_timestamp: int | None = None  # when ElevenLabs sent the event (unix seconds), if it said


def read_envelope(payload: Any) -> Envelope:
    """Validate the outer shape: known types need an object `data` with a string `conversation_id`."""
    if not isinstance(payload, dict):
        raise PayloadError("body is not a JSON object")
    event_type = payload.get("type")
    if not isinstance(event_type, str):
        raise PayloadError("body has no string 'type'")
    data = payload.get("data")
    if not isinstance(data, dict):
        if event_type in KNOWN_TYPES:
            raise PayloadError("body has no object 'data'")
        data = {}
    conversation_id = data.get("conversation_id")
    if conversation_id is not None and not valid_conversation_id(conversation_id):
        if event_type in KNOWN_TYPES:
            raise PayloadError("data.conversation_id is not a usable id")
        conversation_id = None  # another type is only archived, never an error: keep it without the id
    if event_type in KNOWN_TYPES and conversation_id is None:
        raise PayloadError("body has no data.conversation_id")
    return Envelope(event_type, conversation_id, data, _int(payload.get("event_timestamp")))


def valid_conversation_id(value: Any) -> bool:
    """Whether `value` can be a conversation_id: every way in (webhook, reconciler, broker, read API) asks this.

    U+FFFD is what `without_nul` leaves of a NUL: an id that held one is not an id to store under. A `/` is
    refused too: such an id could be stored but never addressed, neither as `/v1/conversations/{id}` here (a
    server decodes %2F before routing) nor at ElevenLabs' own `/v1/convai/conversations/{id}`; ElevenLabs' ids
    are `conv_` and letters and digits. Refused, it is a 400 for a known webhook type (nothing stored), an
    unknown type is still archived without it, the reconciler skips it and the broker answers a null id."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_LENGTH
        and value.isprintable()
        and "\ufffd" not in value
        and "/" not in value
    )


def without_nul(value: Any) -> Any:
    """`value` with every NUL character in its strings (and keys) replaced by U+FFFD.

    PostgreSQL's text and jsonb cannot hold NUL, and a record should not differ between the two databases.
    Callers check the raw bytes for an escaped NUL first (a JSON string cannot hold a raw one), so the walk is
    rare."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {without_nul(key): without_nul(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_nul(item) for item in value]
    return value


def may_hold_nul(raw: bytes) -> bool:
    return b"\\u0000" in raw


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def fits(value: str, column: str) -> bool:
    """Whether the conversation column `column` (and every index on it) can hold `value` on either database."""
    if len(value) > LIMITS[column]:
        return False
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate (JSON allows one escaped): neither database can store it
        return False
    return size <= BYTE_LIMITS.get(column, size)


def _bounded(value: Any, column: str) -> str | None:
    return value if isinstance(value, str) and fits(value, column) else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value in BIGINT else None


def _num(value: Any) -> int | float | None:
    """A JSON number as sent: an integer stays an integer (ElevenLabs' durations are), a float a float."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value in BIGINT else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _obj(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _status(value: Any) -> str | None:
    return value if isinstance(value, str) and value and fits(value, "status") else None


def _direction(value: Any) -> str | None:
    """ElevenLabs' TelephonyDirection; another value stays in `metadata` but is not a direction we can serve."""
    return value if value in BY_NAME["direction"].choices else None


def _client_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """What `data.conversation_initiation_client_data` says of the record, itself kept as sent; its user, branch
    and environment are fallbacks for the top-level values."""
    sent = _obj(data.get("conversation_initiation_client_data"))
    client_data = sent or {}
    return {
        "user_id": _bounded(client_data.get("user_id"), "user_id"),
        "branch_id": _bounded(client_data.get("branch_id"), "branch_id"),
        "environment": _bounded(client_data.get("environment"), "environment"),
        "initiation_source": _bounded((_obj(client_data.get("source_info")) or {}).get("source"), "initiation_source"),
        "dynamic_variables": _obj(client_data.get("dynamic_variables")),
        "conversation_initiation_client_data": sent,
    }


def _call_fields(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The phone call and batch call in a detail's metadata (ConversationHistoryMetadataCommonModel)."""
    phone_call = _obj(metadata.get("phone_call")) or {}
    batch_call = _obj(metadata.get("batch_call")) or {}
    return {
        "phone_number": _bounded(phone_call.get("external_number"), "phone_number"),
        "direction": _direction(phone_call.get("direction")),
        "batch_call_id": _bounded(batch_call.get("batch_call_id"), "batch_call_id"),
    }


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def detail_observation(data: Mapping[str, Any], source: Source, at: datetime) -> Observation:
    """A conversation detail: the transcription webhook's `data` or `GET /v1/convai/conversations/{id}`."""
    metadata = _obj(data.get("metadata")) or {}
    analysis = _obj(data.get("analysis")) or {}
    client = _client_fields(data)
    transcript = data.get("transcript")
    fields = {
        **client,
        **_call_fields(metadata),
        "agent_id": _bounded(data.get("agent_id"), "agent_id"),
        "agent_name": _str(data.get("agent_name")),
        "user_id": _first(_bounded(data.get("user_id"), "user_id"), client["user_id"]),
        "branch_id": _first(_bounded(data.get("branch_id"), "branch_id"), client["branch_id"]),
        "version_id": _bounded(data.get("version_id"), "version_id"),
        "environment": _first(_bounded(data.get("environment"), "environment"), client["environment"]),
        "start_time_unix_secs": _int(metadata.get("start_time_unix_secs")),
        "call_duration_secs": _num(metadata.get("call_duration_secs")),
        "call_successful": _bounded(analysis.get("call_successful"), "call_successful"),
        "call_summary_title": _str(analysis.get("call_summary_title")),
        "transcript_summary": _str(analysis.get("transcript_summary")),
        "termination_reason": _str(metadata.get("termination_reason")),
        "main_language": _bounded(metadata.get("main_language"), "main_language"),
        "initiation_source": _first(
            _bounded(metadata.get("conversation_initiation_source"), "initiation_source"), client["initiation_source"]
        ),
        "has_audio": _bool(data.get("has_audio")),
        "has_user_audio": _bool(data.get("has_user_audio")),
        "has_response_audio": _bool(data.get("has_response_audio")),
        "transcript": transcript if isinstance(transcript, list) else None,
        "analysis": _obj(data.get("analysis")),
        "metadata": _obj(data.get("metadata")),
    }
    return Observation(
        conversation_id=str(data["conversation_id"]),
        source=source,
        observed_at=at,
        status=_status(data.get("status")),
        fields=fields,
    )


def summary_observation(summary: Mapping[str, Any], at: datetime) -> Observation:
    """One entry of a `GET /v1/convai/conversations` page."""
    fields = {
        "agent_id": _bounded(summary.get("agent_id"), "agent_id"),
        "agent_name": _str(summary.get("agent_name")),
        "user_id": _bounded(summary.get("user_id"), "user_id"),
        "branch_id": _bounded(summary.get("branch_id"), "branch_id"),
        "version_id": _bounded(summary.get("version_id"), "version_id"),
        "start_time_unix_secs": _int(summary.get("start_time_unix_secs")),
        "call_duration_secs": _num(summary.get("call_duration_secs")),
        "call_successful": _bounded(summary.get("call_successful"), "call_successful"),
        "call_summary_title": _str(summary.get("call_summary_title")),
        "transcript_summary": _str(summary.get("transcript_summary")),
        "termination_reason": _str(summary.get("termination_reason")),
        "main_language": _bounded(summary.get("main_language"), "main_language"),
        "initiation_source": _bounded(summary.get("conversation_initiation_source"), "initiation_source"),
        "direction": _direction(summary.get("direction")),
    }
    return Observation(
        conversation_id=str(summary["conversation_id"]),
        source=Source.LIST_SUMMARY,
        observed_at=at,
        status=_status(summary.get("status")),
        fields=fields,
    )


def failure_observation(data: Mapping[str, Any], at: datetime, event_timestamp: int | None = None) -> Observation:
    """A `call_initiation_failure` webhook: the call never connected.

    It carries no start time of its own: the event's `event_timestamp` (when ElevenLabs gave up on the call) stands
    for it, so the record matches `started_after`/`started_before` and sorts by it. A start time in its metadata, if
    one ever comes, is used instead."""
    metadata = _obj(data.get("metadata"))
    client = _client_fields(data)
    fields = {
        **client,
        **_failed_call_fields(metadata or {}),
        "agent_id": _bounded(data.get("agent_id"), "agent_id"),
        "start_time_unix_secs": _first(_int((metadata or {}).get("start_time_unix_secs")), event_timestamp),
        "failure_reason": _str(data.get("failure_reason")),
        "metadata": metadata,
    }
    return Observation(
        conversation_id=str(data["conversation_id"]),
        source=Source.FAILURE_WEBHOOK,
        observed_at=at,
        status="failed",
        fields=fields,
    )


def _failed_call_fields(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The other party of a call that never connected, from the telephony provider's own report.

    `twilio`: Twilio's status callback, whose `Direction` is `inbound`, `outbound-api` or `outbound-dial`; the
    other party is `To` on an outbound call, `From` on an inbound one. `sip`: the failed INVITE that ElevenLabs
    sent, so an outbound call to `to_number`."""
    body = _obj(metadata.get("body")) or {}
    if metadata.get("type") == "twilio":
        direction = body.get("Direction")
        if not isinstance(direction, str):
            return {}
        if direction.startswith("outbound"):
            return {"direction": "outbound", "phone_number": _bounded(body.get("To"), "phone_number")}
        if direction == "inbound":
            return {"direction": "inbound", "phone_number": _bounded(body.get("From"), "phone_number")}
        return {}
    if metadata.get("type") == "sip":
        return {"direction": "outbound", "phone_number": _bounded(body.get("to_number"), "phone_number")}
    return {}


def otel_observation(data: Mapping[str, Any], at: datetime) -> Observation:
    """A `post_call_transcription_otel` webhook: the conversation as OpenTelemetry traces (`data.otlp_traces`).

    It updates the agent, the status and the times it carries: `data.agent_id` (else the trace resource's
    `elevenlabs.agent_id`), `data.status` when present, and the start and duration from `data.metadata` when present,
    else from the root span (`elevenlabs.conversation`, which spans the call). The traces themselves stay in the
    archived body (webhook_event), not in `transcript`: they are not the JSON transcript, and the record stays
    incomplete, so the reconciler still fetches the JSON detail."""
    traces = _obj(data.get("otlp_traces")) or {}
    metadata = _obj(data.get("metadata")) or {}
    start, duration = _root_span_times(traces)
    fields = {
        "agent_id": _first(
            _bounded(data.get("agent_id"), "agent_id"),
            _bounded(_resource_attribute(traces, "elevenlabs.agent_id"), "agent_id"),
        ),
        "agent_name": _str(data.get("agent_name")),
        "start_time_unix_secs": _first(_int(metadata.get("start_time_unix_secs")), start),
        "call_duration_secs": _first(_num(metadata.get("call_duration_secs")), duration),
    }
    return Observation(
        conversation_id=str(data["conversation_id"]),
        source=Source.OTEL_WEBHOOK,
        observed_at=at,
        status=_status(data.get("status")),
        fields=fields,
    )


ROOT_SPAN = "elevenlabs.conversation"
_NANOS = 1_000_000_000


def _spans(traces: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [
        span
        for resource_spans in _list(traces.get("resourceSpans"))
        for scope_spans in _list(resource_spans.get("scopeSpans"))
        for span in _list(scope_spans.get("spans"))
    ]


def _list(value: Any) -> list[Mapping[str, Any]]:
    """The objects of a JSON array (OTLP JSON nests objects in arrays); anything else is empty."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _resource_attribute(traces: Mapping[str, Any], key: str) -> Any:
    for resource_spans in _list(traces.get("resourceSpans")):
        for attribute in _list((_obj(resource_spans.get("resource")) or {}).get("attributes")):
            if attribute.get("key") == key:
                return (_obj(attribute.get("value")) or {}).get("stringValue")
    return None


def _root_span_times(traces: Mapping[str, Any]) -> tuple[int | None, int | float | None]:
    """The root span's start (whole unix seconds) and length (seconds: an integer when whole, as ElevenLabs'
    durations are)."""
    spans = _spans(traces)
    root = next((span for span in spans if span.get("name") == ROOT_SPAN), None)
    if root is None:
        root = next((span for span in spans if not span.get("parentSpanId")), None)
    if root is None:
        return None, None
    start, end = _unix_nanos(root.get("startTimeUnixNano")), _unix_nanos(root.get("endTimeUnixNano"))
    if start is None:
        return None, None
    if end is None or end < start:
        return _int(start // _NANOS), None
    length = end - start
    return _int(start // _NANOS), length // _NANOS if length % _NANOS == 0 else length / _NANOS


def _unix_nanos(value: Any) -> int | None:
    """OTLP JSON writes 64-bit integers as decimal strings (and some writers as numbers)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def session_observation(
    conversation_id: str,
    agent_id: str,
    user_id: str | None,
    branch_id: str | None,
    labels: Mapping[str, str] | None,
    at: datetime,
) -> Observation:
    """A session created through the broker: the call has not started, and only the caller's facts are known."""
    return Observation(
        conversation_id=conversation_id,
        source=Source.SESSION,
        observed_at=at,
        status="initiated",
        # The broker checks lengths in characters; a value an index cannot hold reads as absent here too.
        fields={
            "agent_id": agent_id,
            "user_id": _bounded(user_id, "user_id"),
            "branch_id": _bounded(branch_id, "branch_id"),
        },
        labels=dict(labels) if labels else None,
    )


def audio_observation(
    conversation_id: str, agent_id: str | None, audio: Audio, source: Source, at: datetime
) -> Observation:
    """Audio stored for a conversation, from the audio webhook or `GET …/{id}/audio`."""
    return Observation(
        conversation_id=conversation_id,
        source=source,
        observed_at=at,
        fields={"agent_id": _bounded(agent_id, "agent_id")},
        audio=audio,
    )
