"""Realistic sample webhook events, shaped like ElevenLabs' own: the one builder of sample payloads. Pure.

The shapes follow ElevenLabs' Python SDK models (`elevenlabs.types`): a transcription's `data` is a
GetConversationResponseModel, its `metadata` a ConversationHistoryMetadataCommonModel with a `phone_call`
(ConversationHistoryMetadataCommonModelPhoneCall: twilio / sip_trunking, with direction, agent and external
numbers) and a `batch_call` (ConversationHistoryBatchCallModel), its client data a
ConversationInitiationClientDataRequestOutput. A `call_initiation_failure` carries `failure_reason` (busy, no-answer,
unknown) and the telephony provider's own report as `metadata: {"type": "twilio" | "sip", "body": …}`. A
`post_call_transcription_otel` carries OTLP JSON traces (`otlp_traces.resourceSpans`): a root span
`elevenlabs.conversation` over the call and one child span per turn, 64-bit times as decimal strings.

`postcall send-test-webhook` sends `sample_event`: every sample gets a fresh `conversation_id` (so a repeated check is
`accepted`, never `duplicate`) and marks itself with the agent id `agent_postcall_test` and the user id
`postcall-send-test-webhook`, so test records are easy to find in the read API (`?agent_id=agent_postcall_test`) and
to tell apart from real calls. The other builders are for tests: each returns a whole webhook body.
"""

from __future__ import annotations

import base64
import hashlib
from enum import StrEnum
from typing import Any

from service.testing.dataset import new_conversation_id

TEST_AGENT_ID = "agent_postcall_test"
TEST_USER_ID = "postcall-send-test-webhook"
AGENT_NUMBER = "+15550100001"
CALLER_NUMBER = "+15550100002"
FAILURE_REASONS = ("busy", "no-answer", "unknown")
# Dynamic variables as ElevenLabs passes them: strings, integers, floats and booleans, names with dots, and the
# system__ variables it adds on a phone call.
DYNAMIC_VARIABLES: dict[str, Any] = {
    "customer.name": "Ada Lovelace",
    "customer.tier": "gold",
    "order_count": 3,
    "balance": 12.5,
    "vip": True,
    "system__caller_id": CALLER_NUMBER,
    "system__call_duration_secs": 41,
}


class SampleType(StrEnum):
    TRANSCRIPTION = "transcription"
    AUDIO = "audio"
    FAILURE = "failure"


def new_sample_id() -> str:
    # ElevenLabs-shaped, but starting with "test" so nobody mistakes a sample for a real conversation.
    return new_conversation_id(tag="test")


def sample_event(kind: SampleType, conversation_id: str, now: int) -> dict[str, Any]:
    """The whole webhook body (envelope and `data`) of one sample event, sent at unix time `now`."""
    if kind is SampleType.AUDIO:
        return audio_event(conversation_id, now, silent_mp3())
    if kind is SampleType.FAILURE:
        return failure_event(conversation_id, now, "busy", "sip")
    return _deployment_check(conversation_id, now)


def envelope(event_type: str, now: int, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": event_type, "event_timestamp": now, "data": data}


def _deployment_check(conversation_id: str, now: int) -> dict[str, Any]:
    data = conversation_detail(conversation_id, now, agent_name="postcall deployment check")
    data["conversation_initiation_client_data"]["dynamic_variables"] = {
        "postcall_check": "send-test-webhook",
        "ticket": "T-TEST",
    }
    return envelope("post_call_transcription", now, data)


def conversation_detail(
    conversation_id: str,
    now: int,
    *,
    agent_id: str = TEST_AGENT_ID,
    agent_name: str = "Front desk",
    duration: int | float = 41,
    phone_call: dict[str, Any] | None = None,
    batch_call: dict[str, Any] | None = None,
    dynamic_variables: dict[str, Any] | None = None,
    source: str = "js_sdk",
) -> dict[str, Any]:
    """A finished conversation as ElevenLabs sends it (GetConversationResponseModel); it ended 5 s before `now`."""
    metadata: dict[str, Any] = {
        "start_time_unix_secs": now - int(duration) - 5,
        "accepted_time_unix_secs": now - int(duration) - 4,
        "call_duration_secs": duration,
        "cost": 412,
        "termination_reason": "Call ended by remote party",
        "main_language": "en",
        "conversation_initiation_source": source,
        "conversation_initiation_source_version": "0.0.0",
        "authorization_method": "signed_url",
        "feedback": {"overall_score": None, "likes": 0, "dislikes": 0},
        "deletion_settings": {"delete_audio": False, "delete_transcript_and_pii": False},
        "timezone": "Europe/London",
    }
    if phone_call is not None:
        metadata["phone_call"] = phone_call
    if batch_call is not None:
        metadata["batch_call"] = batch_call
    return {
        "agent_id": agent_id,
        "agent_name": agent_name,
        "conversation_id": conversation_id,
        "status": "done",
        "user_id": TEST_USER_ID,
        "branch_id": "agtbrch_main",
        "version_id": "agtvrsn_7",
        "environment": "production",
        "transcript": [
            _turn("agent", "Hi, this is the front desk. How can I help you today?", 0),
            _turn("user", "I'd like to move my appointment to Thursday afternoon.", 4),
            _turn("agent", "Thursday at three is free. Shall I book it?", 11, tool="check_calendar"),
            _turn("user", "Yes please, that works.", 17),
            _turn("agent", "Done: Thursday at 3 pm. You'll get a text to confirm. Anything else?", 20),
            _turn("user", "No, that's all. Thanks!", 33),
        ],
        "metadata": metadata,
        "analysis": {
            "call_successful": "success",
            "transcript_summary": "The caller moved their appointment to Thursday at 3 pm; the agent confirmed it.",
            "call_summary_title": "Appointment rescheduled",
            "evaluation_criteria_results": {
                "resolved": {
                    "criteria_id": "resolved",
                    "result": "success",
                    "rationale": "The requested change was booked and confirmed.",
                }
            },
            "data_collection_results": {
                "new_slot": {
                    "data_collection_id": "new_slot",
                    "value": "Thursday 15:00",
                    "rationale": "The caller accepted the offered slot.",
                }
            },
        },
        "conversation_initiation_client_data": {
            "user_id": TEST_USER_ID,
            "source_info": {"source": source, "version": "0.0.0"},
            "environment": "production",
            "conversation_config_override": {"agent": {"language": "en"}},
            "dynamic_variables": dict(DYNAMIC_VARIABLES if dynamic_variables is None else dynamic_variables),
        },
        "has_audio": True,
        "has_user_audio": True,
        "has_response_audio": False,
        "has_auxiliary_audio": False,
        "tag_ids": ["tag_followup"],
    }


def _turn(role: str, message: str, at_secs: int, tool: str | None = None) -> dict[str, Any]:
    tool_calls = []
    if tool is not None:
        tool_calls = [
            {
                "type": "webhook",
                "request_id": f"req_{at_secs}",
                "tool_name": tool,
                "params_as_json": '{"day": "Thursday"}',
                "tool_has_been_called": True,
            }
        ]
    return {
        "role": role,
        "message": message,
        "tool_calls": tool_calls,
        "tool_results": [],
        "feedback": None,
        "time_in_call_secs": at_secs,
        "conversation_turn_metrics": None,
        "interrupted": False,
    }


def twilio_call(direction: str = "inbound", external_number: str = CALLER_NUMBER) -> dict[str, Any]:
    """`metadata.phone_call` of a call over a Twilio number."""
    return {
        "type": "twilio",
        "direction": direction,
        "phone_number_id": "phnum_twilio_1",
        "agent_number": AGENT_NUMBER,
        "external_number": external_number,
        "stream_sid": "MZ00000000000000000000000000000000",
        "call_sid": "CA00000000000000000000000000000000",
    }


def sip_trunk_call(direction: str = "outbound", external_number: str = CALLER_NUMBER) -> dict[str, Any]:
    """`metadata.phone_call` of a call over a SIP trunk."""
    return {
        "type": "sip_trunking",
        "direction": direction,
        "phone_number_id": "phnum_sip_1",
        "agent_number": AGENT_NUMBER,
        "external_number": external_number,
        "call_id": "6b1c4f0e-sip-call",
        "call_sid": "00000000-0000-4000-8000-000000000001",
        "sip_header_dynamic_variables": {"X-Campaign": "spring"},
    }


def batch_call(batch_call_id: str = "btcal_spring_reminders") -> dict[str, Any]:
    """`metadata.batch_call` of a call placed by a batch calling job."""
    return {"batch_call_id": batch_call_id, "batch_call_recipient_id": "btcrcp_0001"}


def transcription_event(conversation_id: str, now: int, **detail: Any) -> dict[str, Any]:
    """A `post_call_transcription` webhook; keywords as `conversation_detail`."""
    return envelope("post_call_transcription", now, conversation_detail(conversation_id, now, **detail))


def audio_event(conversation_id: str, now: int, mp3: bytes, agent_id: str = TEST_AGENT_ID) -> dict[str, Any]:
    """A `post_call_audio` webhook: the whole call as base64 MP3."""
    data = {"agent_id": agent_id, "conversation_id": conversation_id, "full_audio": base64.b64encode(mp3).decode()}
    return envelope("post_call_audio", now, data)


def failure_event(
    conversation_id: str,
    now: int,
    reason: str = "busy",
    provider: str = "sip",
    *,
    agent_id: str = TEST_AGENT_ID,
    to_number: str = CALLER_NUMBER,
    dynamic_variables: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A `call_initiation_failure` webhook for an outbound call to `to_number` that never connected."""
    data: dict[str, Any] = {
        "agent_id": agent_id,
        "conversation_id": conversation_id,
        "failure_reason": reason,
        "metadata": _sip_failure(reason, to_number) if provider == "sip" else _twilio_failure(reason, to_number),
    }
    if dynamic_variables is not None:
        data["conversation_initiation_client_data"] = {
            "dynamic_variables": dynamic_variables,
            "source_info": {"source": "sip_trunk" if provider == "sip" else "twilio", "version": None},
        }
    return envelope("call_initiation_failure", now, data)


_SIP_STATUS = {"busy": (486, "Busy here"), "no-answer": (480, "Temporarily unavailable"), "unknown": (500, "Error")}


def _sip_failure(reason: str, to_number: str) -> dict[str, Any]:
    code, text = _SIP_STATUS[reason]
    return {
        "type": "sip",
        "body": {
            "from_number": AGENT_NUMBER,
            "to_number": to_number,
            "sip_status_code": code,
            "error_reason": f"INVITE failed: sip status: {code}: {text} (SIP {code})",
            "call_sid": "00000000-0000-4000-8000-000000000000",
            "sip_status": text,
        },
    }


def _twilio_failure(reason: str, to_number: str) -> dict[str, Any]:
    """Twilio's status callback, as Twilio posts it to ElevenLabs (capitalised parameter names, all strings)."""
    return {
        "type": "twilio",
        "body": {
            "AccountSid": "AC00000000000000000000000000000000",
            "ApiVersion": "2010-04-01",
            "CallSid": "CA00000000000000000000000000000000",
            "CallStatus": {"unknown": "failed"}.get(reason, reason),
            "CallDuration": "0",
            "Direction": "outbound-api",
            "From": AGENT_NUMBER,
            "To": to_number,
            "Called": to_number,
            "Caller": AGENT_NUMBER,
            "SequenceNumber": "2",
            "Timestamp": "Thu, 27 Nov 2026 10:00:00 +0000",
        },
    }


def otel_event(
    conversation_id: str,
    now: int,
    *,
    agent_id: str = TEST_AGENT_ID,
    start: int | None = None,
    duration_nanos: int = 41_000_000_000,
    **data: Any,
) -> dict[str, Any]:
    """A `post_call_transcription_otel` webhook: the call as OTLP JSON traces; more `data` keys as given."""
    started = now - 46 if start is None else start
    root_id, trace_id = _span_id(conversation_id, "root"), _trace_id(conversation_id)
    begin = started * 1_000_000_000
    turns = [
        ("elevenlabs.recv.agent_response", "elevenlabs.agent.text", "Hi, this is the front desk.", 0),
        ("elevenlabs.recv.user_transcript", "elevenlabs.user.text", "Can I move my appointment?", 4),
        ("elevenlabs.recv.agent_response", "elevenlabs.agent.text", "Thursday at three is free.", 11),
    ]
    spans = [
        {
            "traceId": trace_id,
            "spanId": root_id,
            "name": "elevenlabs.conversation",
            "kind": 1,
            "startTimeUnixNano": str(begin),
            "endTimeUnixNano": str(begin + duration_nanos),
            "attributes": [
                _attribute("elevenlabs.conversation_id", conversation_id),
                _attribute("elevenlabs.agent_id", agent_id),
                _attribute("elevenlabs.source", "post_call_webhook"),
                _attribute("elevenlabs.termination_reason", "Call ended by remote party"),
            ],
            "status": {"code": 1},
        }
    ]
    for index, (name, key, text, offset) in enumerate(turns):
        spans.append(
            {
                "traceId": trace_id,
                "spanId": _span_id(conversation_id, str(index)),
                "parentSpanId": root_id,
                "name": name,
                "kind": 1,
                "startTimeUnixNano": str(begin + offset * 1_000_000_000),
                "endTimeUnixNano": str(begin + (offset + 3) * 1_000_000_000),
                "attributes": [_attribute(key, text), {"key": "elevenlabs.turn.index", "value": {"intValue": index}}],
                "status": {"code": 1},
            }
        )
    traces = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [
                        _attribute("service.name", "elevenlabs-convai"),
                        _attribute("elevenlabs.conversation_id", conversation_id),
                        _attribute("elevenlabs.agent_id", agent_id),
                    ]
                },
                "scopeSpans": [{"scope": {"name": "elevenlabs.convai", "version": "1.0.0"}, "spans": spans}],
            }
        ]
    }
    body = {"conversation_id": conversation_id, "agent_id": agent_id, "otlp_traces": traces, **data}
    return envelope("post_call_transcription_otel", now, body)


def _attribute(key: str, value: str) -> dict[str, Any]:
    return {"key": key, "value": {"stringValue": value}}


def _trace_id(conversation_id: str) -> str:
    return hashlib.sha256(conversation_id.encode()).hexdigest()[:32]


def _span_id(conversation_id: str, name: str) -> str:
    return hashlib.sha256(f"{conversation_id}/{name}".encode()).hexdigest()[:16]


# MPEG-1 Layer III, 128 kbit/s, 44.1 kHz, no CRC, no padding, joint stereo: 144 * 128000 / 44100 = 417 bytes a frame.
_FRAME_HEADER = bytes([0xFF, 0xFB, 0x90, 0x64])
_FRAME_BYTES = 417
# An empty ID3v2.4 tag: "ID3", version 4.0, no flags, size 0 (syncsafe).
_ID3_HEADER = b"ID3\x04\x00\x00\x00\x00\x00\x00"


def silent_mp3(frames: int = 4) -> bytes:
    """A tiny MP3 (about 0.1 s): an empty ID3 tag and frames whose zeroed side info and data decode to silence."""
    frame = _FRAME_HEADER + bytes(_FRAME_BYTES - len(_FRAME_HEADER))
    return _ID3_HEADER + frame * frames
