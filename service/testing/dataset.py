"""The fake platform's conversations: compact records, and the ElevenLabs-shaped payloads rendered from them.

A record is small (ids, times, status, a few flags); transcripts, analysis and audio are generated from it on
demand, deterministically, so a fake holding 100,000 conversations stays light. Shapes follow ElevenLabs' SDK models
(`elevenlabs.types`), checked by tests/test_fake_platform_sdk.py: durations are integers, a phone call's detail
carries `metadata.phone_call` (Twilio: direction, numbers, call SID) and its summary the `direction`, a batch call's
`metadata.batch_call`, and every detail ElevenLabs' `has_audio`, `has_user_audio` and `has_response_audio`.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

STATUSES = ("initiated", "in-progress", "processing", "done", "failed")
_ALNUM = string.ascii_lowercase + string.digits


@dataclass
class FakeConversation:
    conversation_id: str
    agent_id: str
    start_time_unix_secs: int
    status: str = "done"
    call_duration_secs: int = 60
    has_audio: bool = True
    user_id: str | None = None
    branch_id: str | None = None
    environment: str | None = None
    turns: int = 4
    phone_call: dict[str, Any] | None = None  # metadata.phone_call (see twilio_call)
    batch_call: dict[str, Any] | None = None  # metadata.batch_call: batch_call_id, batch_call_recipient_id
    # ElevenLabs' flags for each side of the call; None: as `has_audio` says.
    has_user_audio: bool | None = None
    has_response_audio: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # anything else a test wants in the detail
    summary_extra: dict[str, Any] = field(default_factory=dict)  # … or in its list entry

    @property
    def final(self) -> bool:
        return self.status in ("done", "failed")

    def summary(self) -> dict[str, Any]:
        """A `GET /v1/convai/conversations` entry (ConversationSummaryResponseModel), `transcript_summary` included
        (the platform leaves it out unless asked for it with `summary_mode=include`)."""
        done = self.status == "done"
        summary = {
            "agent_id": self.agent_id,
            "agent_name": f"Agent {self.agent_id}",
            "branch_id": self.branch_id,
            "conversation_id": self.conversation_id,
            "start_time_unix_secs": self.start_time_unix_secs,
            "call_duration_secs": self.call_duration_secs,
            "message_count": self.turns if done else 0,
            "status": self.status,
            "call_successful": "success" if done else "unknown",
            "transcript_summary": self._summary_text() if done else None,
            "call_summary_title": "A fake call" if done else None,
            "main_language": "en",
            "conversation_initiation_source": self._source(),
            "direction": self.phone_call["direction"] if self.phone_call else None,
            "future_field": {"kept": True},  # unknown fields must be tolerated
        }
        summary.update(self.summary_extra)
        return summary

    def detail(self) -> dict[str, Any]:
        """`GET /v1/convai/conversations/{id}` (GetConversationResponseModel); also a transcription webhook's data."""
        done = self.status == "done"
        detail: dict[str, Any] = {
            "agent_id": self.agent_id,
            "agent_name": f"Agent {self.agent_id}",
            "conversation_id": self.conversation_id,
            "status": self.status,
            "user_id": self.user_id,
            "branch_id": self.branch_id,
            "environment": self.environment,
            "transcript": self.transcript() if done else [],
            "metadata": {
                "start_time_unix_secs": self.start_time_unix_secs,
                "call_duration_secs": self.call_duration_secs if done else 0,
                "termination_reason": "end_call tool was called." if done else "",
                "main_language": "en",
                "conversation_initiation_source": self._source(),
                "cost": 120,
                **({"phone_call": self.phone_call} if self.phone_call else {}),
                **({"batch_call": self.batch_call} if self.batch_call else {}),
            },
            "analysis": {
                "call_successful": "success",
                "transcript_summary": self._summary_text(),
                "call_summary_title": "A fake call",
                "evaluation_criteria_results": {},
                "data_collection_results": {},
            }
            if done
            else None,
            "conversation_initiation_client_data": {
                "user_id": self.user_id,
                "dynamic_variables": {"order_id": f"o-{self.conversation_id[-6:]}"},
                "source_info": {"source": "python_sdk", "version": "2.0.0"},
            },
            "has_audio": self.has_audio and done,
            "has_user_audio": _either(self.has_user_audio, self.has_audio) and done,
            "has_response_audio": _either(self.has_response_audio, self.has_audio) and done,
            "has_auxiliary_audio": False,
        }
        detail.update(self.extra)
        return detail

    def transcript(self) -> list[dict[str, Any]]:
        lines = []
        for turn in range(self.turns):
            role = "agent" if turn % 2 == 0 else "user"
            lines.append(
                {
                    "role": role,
                    "message": f"{role} turn {turn} of {self.conversation_id}",
                    "time_in_call_secs": turn * 5,
                    "interrupted": False,
                }
            )
        return lines

    def audio(self, size: int) -> bytes:
        """Deterministic bytes that start like an MP3 frame; `size` bytes long."""
        seed = hashlib.sha256(self.conversation_id.encode()).digest()
        body = (b"\xff\xfb\x90\x64" + seed) * (size // 36 + 1)
        return body[:size]

    def _summary_text(self) -> str:
        return f"The caller tested {self.conversation_id}."

    def _source(self) -> str:
        return "twilio" if self.phone_call else "python_sdk"


def _either(flag: bool | None, default: bool) -> bool:
    return default if flag is None else flag


def twilio_call(conversation_id: str, direction: str) -> dict[str, Any]:
    """A detail's `metadata.phone_call` for a Twilio call (ConversationHistoryTwilioPhoneCallModel); the other
    party's number (`external_number`) derived from the conversation id."""
    digest = int(hashlib.sha256(conversation_id.encode()).hexdigest(), 16)
    return {
        "type": "twilio",
        "direction": direction,
        "phone_number_id": f"phnum_{digest % 10**8:08d}",
        "agent_number": "+15550100000",
        "external_number": f"+1555{digest % 10**7:07d}",
        "stream_sid": f"MZ{digest % 16**32:032x}",
        "call_sid": f"CA{(digest >> 128) % 16**32:032x}",
    }


def telephony(conversation_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A share of the seeded conversations are phone calls, some of them from a batch call; which ones follows from
    the id alone (no draw from the seed's generator, so the rest of a seeded data set stays as it was)."""
    digest = hashlib.sha256(b"telephony:" + conversation_id.encode()).digest()
    if digest[0] % 4:  # three in four are web or SDK calls
        return None, None
    outbound = digest[1] % 2 == 0
    phone_call = twilio_call(conversation_id, "outbound" if outbound else "inbound")
    if not outbound or digest[2] % 2:
        return phone_call, None
    batch = {"batch_call_id": f"btcal_{digest[3] % 4}", "batch_call_recipient_id": f"btcrec_{digest[4:10].hex()}"}
    return phone_call, batch


def new_conversation_id(rng: random.Random | None = None, tag: str = "") -> str:
    """`conv_` and 26 lower-case letters and digits, like ElevenLabs' ids; the first ones are `tag` when given."""
    choice = secrets.choice if rng is None else rng.choice
    return "conv_" + tag + "".join(choice(_ALNUM) for _ in range(26 - len(tag)))


def seed_conversations(
    count: int,
    agents: tuple[str, ...] = ("agent_fake_1",),
    *,
    now: int,
    spread_seconds: int = 3 * 86400,
    processing_share: float = 0.0,
    failed_share: float = 0.0,
    audio_share: float = 1.0,
    seed: int = 1,
) -> list[FakeConversation]:
    """`count` conversations spread over the `spread_seconds` before `now` (at least 120 s before it)."""
    rng = random.Random(seed)
    conversations = []
    for i in range(count):
        draw = rng.random()
        if draw < processing_share:
            status = "processing"
        elif draw < processing_share + failed_share:
            status = "failed"
        else:
            status = "done"
        conversation_id = new_conversation_id(rng)
        phone_call, batch_call = telephony(conversation_id)
        conversations.append(
            FakeConversation(
                conversation_id=conversation_id,
                agent_id=agents[i % len(agents)],
                start_time_unix_secs=now - 120 - rng.randrange(max(spread_seconds - 120, 1)),
                status=status,
                call_duration_secs=rng.randrange(5, 600),
                has_audio=status != "failed" and rng.random() < audio_share,
                user_id=f"user-{rng.randrange(1000)}",
                turns=rng.randrange(2, 12),
                phone_call=phone_call,
                batch_call=batch_call,
            )
        )
    return conversations
