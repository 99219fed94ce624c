"""What the console tests and the screenshot script store and do: a conversation with timed turns, tool calls,
analysis and a real MP3; a hostile one whose transcript, agent name and variables hold markup; signing in."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lameenc
from sqlalchemy.engine import Engine

from service.record import payloads
from service.record.merge import Observation, Source
from tests.support import records

AT = datetime(2026, 1, 1, tzinfo=UTC)
TURN_TIMES = (0, 4.5, 12, 21.25)  # time_in_call_secs of the rich conversation's turns
HOSTILE = '<script>window.__pwned = 1; alert(1)</script><img src=x onerror="window.__pwned = 2">'
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


def tone_mp3(seconds: float = 30.0, rate: int = 16_000) -> bytes:
    """A real, decodable MP3 (a 440 Hz tone, mono, 32 kbit/s) of about `seconds`, encoded by LAME."""
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(32)
    encoder.set_in_sample_rate(rate)
    encoder.set_channels(1)
    encoder.set_quality(7)
    samples = bytearray()
    for i in range(int(seconds * rate)):
        value = int(8000 * math.sin(2 * math.pi * 440 * i / rate))
        samples += value.to_bytes(2, "little", signed=True)
    return bytes(encoder.encode(bytes(samples)) + encoder.flush())


def rich_detail(conversation_id: str, start: int, agent_id: str = "agent_support") -> dict[str, Any]:
    messages = (
        "Hello, this is Ada from Acme support. How can I help?",
        "My parcel never arrived, the order number is 4471.",
        "Let me look that order up for you.",
        "Thank you, that was quick!",
    )
    transcript: list[dict[str, Any]] = []
    for index, (at, message) in enumerate(zip(TURN_TIMES, messages, strict=True)):
        turn: dict[str, Any] = {
            "role": "agent" if index % 2 == 0 else "user",
            "message": message,
            "time_in_call_secs": at,
        }
        if index == 2:
            turn["tool_calls"] = [{"tool_name": "lookup_order", "params_as_json": '{"order": "4471"}'}]
            turn["tool_results"] = [{"tool_name": "lookup_order", "result_value": "shipped", "is_error": False}]
        transcript.append(turn)
    return {
        "conversation_id": conversation_id,
        "agent_id": agent_id,
        "agent_name": "Ada (support)",
        "status": "done",
        "user_id": "customer-17",
        "transcript": transcript,
        "metadata": {"start_time_unix_secs": start, "call_duration_secs": 30, "termination_reason": "end_call"},
        "analysis": {
            "call_successful": "success",
            "call_summary_title": "Missing parcel 4471",
            "transcript_summary": "The caller's parcel was missing; the agent found it had shipped.",
            "evaluation_criteria_results": {
                "polite": {"criteria_id": "polite", "result": "success", "rationale": "Greeted and thanked."}
            },
            "data_collection_results": {
                "order_number": {"data_collection_id": "order_number", "value": "4471", "rationale": "Said so."}
            },
        },
        "conversation_initiation_client_data": {"dynamic_variables": {"customer_tier": "gold"}},
    }


def hostile_detail(conversation_id: str, start: int) -> dict[str, Any]:
    detail = rich_detail(conversation_id, start, agent_id="agent_hostile")
    detail["agent_name"] = HOSTILE
    detail["transcript"][0]["message"] = HOSTILE
    detail["analysis"]["call_summary_title"] = "Hostile " + HOSTILE
    detail["conversation_initiation_client_data"] = {"dynamic_variables": {"name": HOSTILE}}
    return detail


def observe(detail: dict[str, Any]) -> Observation:
    return payloads.detail_observation(detail, Source.TRANSCRIPTION_WEBHOOK, AT)


def store_rich(engine: Engine, data_dir: Path, conversation_id: str, start: int, mp3: bytes) -> None:
    records.store(engine, [observe(rich_detail(conversation_id, start)), records.audio(conversation_id, data_dir, mp3)])


def csrf_of(html: str) -> str:
    found = CSRF_FIELD.search(html)
    assert found is not None, "no CSRF field on the page"
    return found.group(1)
