"""Building signed webhook deliveries the way ElevenLabs sends them."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from service.webhook.signature import sign

SECRET = "wsec_test_secret"


def transcription(conversation_id: str, agent_id: str = "agent_1", **data: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "agent_id": agent_id,
        "conversation_id": conversation_id,
        "status": "done",
        "user_id": "user-42",
        "transcript": [
            {"role": "agent", "message": "Hello, how can I help?", "time_in_call_secs": 0},
            {"role": "user", "message": "Just testing.", "time_in_call_secs": 2},
        ],
        "metadata": {"start_time_unix_secs": 1_760_000_000, "call_duration_secs": 22, "termination_reason": ""},
        "analysis": {"call_successful": "success", "transcript_summary": "A short test call."},
        "conversation_initiation_client_data": {"dynamic_variables": {"order_id": "o-1"}},
    }
    body.update(data)
    return {"type": "post_call_transcription", "event_timestamp": int(time.time()), "data": body}


def audio(conversation_id: str, audio_bytes: bytes, agent_id: str = "agent_1") -> dict[str, Any]:
    return {
        "type": "post_call_audio",
        "event_timestamp": int(time.time()),
        "data": {
            "agent_id": agent_id,
            "conversation_id": conversation_id,
            "full_audio": base64.b64encode(audio_bytes).decode(),
        },
    }


def failure(conversation_id: str, agent_id: str = "agent_1") -> dict[str, Any]:
    return {
        "type": "call_initiation_failure",
        "event_timestamp": int(time.time()),
        "data": {
            "agent_id": agent_id,
            "conversation_id": conversation_id,
            "failure_reason": "busy",
            "metadata": {"type": "sip", "body": {"sip_status_code": 486, "error_reason": "Busy here"}},
        },
    }


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def signed_headers(body: bytes, secret: str = SECRET, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {"ElevenLabs-Signature": sign(body, secret.encode(), ts), "Content-Type": "application/json"}
