"""Realistic sample webhook events, shaped like ElevenLabs' own, for `postcall send-test-webhook`. Pure.

Every sample gets a fresh `conversation_id` (so a repeated check is `accepted`, never `duplicate`) and marks itself
with the agent id `agent_postcall_test` and the user id `postcall-send-test-webhook`, so test records are easy to
find in the read API (`?agent_id=agent_postcall_test`) and to tell apart from real calls.
"""

from __future__ import annotations

import base64
from enum import StrEnum
from typing import Any

from service.testing.dataset import new_conversation_id

TEST_AGENT_ID = "agent_postcall_test"
TEST_USER_ID = "postcall-send-test-webhook"


class SampleType(StrEnum):
    TRANSCRIPTION = "transcription"
    AUDIO = "audio"
    FAILURE = "failure"


def new_sample_id() -> str:
    # ElevenLabs-shaped, but starting with "test" so nobody mistakes a sample for a real conversation.
    return new_conversation_id(tag="test")


def sample_event(kind: SampleType, conversation_id: str, now: int) -> dict[str, Any]:
    """The whole webhook body (envelope and `data`) of one sample event, sent at unix time `now`."""
    builders = {
        SampleType.TRANSCRIPTION: _transcription,
        SampleType.AUDIO: _audio,
        SampleType.FAILURE: _failure,
    }
    return builders[kind](conversation_id, now)


def _transcription(conversation_id: str, now: int) -> dict[str, Any]:
    duration = 41
    return {
        "type": "post_call_transcription",
        "event_timestamp": now,
        "data": {
            "agent_id": TEST_AGENT_ID,
            "agent_name": "postcall deployment check",
            "conversation_id": conversation_id,
            "status": "done",
            "user_id": TEST_USER_ID,
            "branch_id": None,
            "environment": "production",
            "transcript": [
                _turn("agent", "Hi, this is the front desk. How can I help you today?", 0),
                _turn("user", "I'd like to move my appointment to Thursday afternoon.", 4),
                _turn("agent", "Thursday at three is free. Shall I book it?", 11),
                _turn("user", "Yes please, that works.", 17),
                _turn("agent", "Done: Thursday at 3 pm. You'll get a text to confirm. Anything else?", 20),
                _turn("user", "No, that's all. Thanks!", 33),
            ],
            "metadata": {
                "start_time_unix_secs": now - duration - 5,
                "call_duration_secs": duration,
                "cost": 412,
                "termination_reason": "Call ended by remote party",
                "main_language": "en",
                "conversation_initiation_source": "js_sdk",
                "authorization_method": "signed_url",
                "feedback": {"overall_score": None, "likes": 0, "dislikes": 0},
                "deletion_settings": {"delete_audio": False, "delete_transcript_and_pii": False},
            },
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
                "source_info": {"source": "js_sdk", "version": "0.0.0"},
                "dynamic_variables": {"postcall_check": "send-test-webhook", "ticket": "T-TEST"},
            },
            "has_audio": True,
            "has_user_audio": True,
            "has_response_audio": True,
        },
    }


def _turn(role: str, message: str, at_secs: int) -> dict[str, Any]:
    return {
        "role": role,
        "message": message,
        "tool_calls": [],
        "tool_results": [],
        "feedback": None,
        "time_in_call_secs": at_secs,
        "conversation_turn_metrics": None,
    }


def _audio(conversation_id: str, now: int) -> dict[str, Any]:
    return {
        "type": "post_call_audio",
        "event_timestamp": now,
        "data": {
            "agent_id": TEST_AGENT_ID,
            "conversation_id": conversation_id,
            "full_audio": base64.b64encode(silent_mp3()).decode("ascii"),
        },
    }


def _failure(conversation_id: str, now: int) -> dict[str, Any]:
    return {
        "type": "call_initiation_failure",
        "event_timestamp": now,
        "data": {
            "agent_id": TEST_AGENT_ID,
            "conversation_id": conversation_id,
            "failure_reason": "busy",
            "metadata": {
                "type": "sip",
                "body": {
                    "from_number": "+15550100001",
                    "to_number": "+15550100002",
                    "sip_status_code": 486,
                    "error_reason": "INVITE failed: sip status: 486: Busy here (SIP 486)",
                    "call_sid": "00000000-0000-4000-8000-000000000000",
                    "sip_status": "Busy here",
                },
            },
        },
    }


# MPEG-1 Layer III, 128 kbit/s, 44.1 kHz, no CRC, no padding, joint stereo: 144 * 128000 / 44100 = 417 bytes a frame.
_FRAME_HEADER = bytes([0xFF, 0xFB, 0x90, 0x64])
_FRAME_BYTES = 417
# An empty ID3v2.4 tag: "ID3", version 4.0, no flags, size 0 (syncsafe).
_ID3_HEADER = b"ID3\x04\x00\x00\x00\x00\x00\x00"


def silent_mp3(frames: int = 4) -> bytes:
    """A tiny MP3 (about 0.1 s): an empty ID3 tag and frames whose zeroed side info and data decode to silence."""
    frame = _FRAME_HEADER + bytes(_FRAME_BYTES - len(_FRAME_HEADER))
    return _ID3_HEADER + frame * frames
