"""ElevenLabs payloads → normalized observations. Pure.

Shapes follow ElevenLabs' models: a `post_call_transcription` webhook's `data` and `GET
/v1/convai/conversations/{id}` are both a conversation detail (GetConversationResponseModel); list pages hold
summaries (ConversationSummaryResponseModel). Unknown fields are kept in the stored `metadata`/`analysis`
objects and the archived raw body, never rejected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.record.merge import Audio, Observation, Source
from service.storage.tables import Conversation

TRANSCRIPTION = "post_call_transcription"
AUDIO = "post_call_audio"
FAILURE = "call_initiation_failure"
KNOWN_TYPES = frozenset({TRANSCRIPTION, AUDIO, FAILURE})
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
# Every other indexed text column fits at 4 bytes per character; tests/test_hardening_storage.py checks each index.
BTREE_MAX_ENTRY_BYTES = 2704
BYTE_LIMITS: dict[str, int] = {"user_id": 1536}


class PayloadError(Exception):
    """A correctly signed body that postcall cannot read (not JSON, no data.conversation_id, …)."""


@dataclass(frozen=True)
class Envelope:
    type: str
    conversation_id: str | None
    data: Mapping[str, Any]


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
    return Envelope(event_type, conversation_id, data)


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


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _obj(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _status(value: Any) -> str | None:
    return value if isinstance(value, str) and value and fits(value, "status") else None


def detail_observation(data: Mapping[str, Any], source: Source, at: datetime) -> Observation:
    """A conversation detail: the transcription webhook's `data` or `GET /v1/convai/conversations/{id}`."""
    metadata = _obj(data.get("metadata")) or {}
    analysis = _obj(data.get("analysis"))
    client_data = _obj(data.get("conversation_initiation_client_data")) or {}
    transcript = data.get("transcript")
    fields = {
        "agent_id": _bounded(data.get("agent_id"), "agent_id"),
        "user_id": _bounded(data.get("user_id"), "user_id") or _bounded(client_data.get("user_id"), "user_id"),
        "branch_id": _bounded(data.get("branch_id"), "branch_id"),
        "start_time_unix_secs": _int(metadata.get("start_time_unix_secs")),
        "call_duration_secs": _num(metadata.get("call_duration_secs")),
        "call_successful": _bounded((analysis or {}).get("call_successful"), "call_successful"),
        "transcript_summary": _str((analysis or {}).get("transcript_summary")),
        "termination_reason": _str(metadata.get("termination_reason")),
        "main_language": _bounded(metadata.get("main_language"), "main_language"),
        "initiation_source": _bounded(metadata.get("conversation_initiation_source"), "initiation_source")
        or _bounded((_obj(client_data.get("source_info")) or {}).get("source"), "initiation_source"),
        "dynamic_variables": _obj(client_data.get("dynamic_variables")),
        "transcript": transcript if isinstance(transcript, list) else None,
        "analysis": analysis,
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
        "user_id": _bounded(summary.get("user_id"), "user_id"),
        "branch_id": _bounded(summary.get("branch_id"), "branch_id"),
        "start_time_unix_secs": _int(summary.get("start_time_unix_secs")),
        "call_duration_secs": _num(summary.get("call_duration_secs")),
        "call_successful": _bounded(summary.get("call_successful"), "call_successful"),
        "transcript_summary": _str(summary.get("transcript_summary")),
        "termination_reason": _str(summary.get("termination_reason")),
        "main_language": _bounded(summary.get("main_language"), "main_language"),
        "initiation_source": _bounded(summary.get("conversation_initiation_source"), "initiation_source"),
    }
    return Observation(
        conversation_id=str(summary["conversation_id"]),
        source=Source.LIST_SUMMARY,
        observed_at=at,
        status=_status(summary.get("status")),
        fields=fields,
    )


def failure_observation(data: Mapping[str, Any], at: datetime) -> Observation:
    """A `call_initiation_failure` webhook: the call never connected."""
    metadata = _obj(data.get("metadata"))
    fields = {
        "agent_id": _bounded(data.get("agent_id"), "agent_id"),
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
