"""The conversation_id inside a WebRTC conversation token or a WebSocket signed URL answer. Pure.

ElevenLabs' `GET /v1/convai/conversation/token` answers with a LiveKit access token: a JWT whose payload
carries a `video` grant naming the LiveKit `room`. ElevenLabs' own client SDK (`WebRTCConnection.ts` in
elevenlabs/packages) takes the conversation id from that room name: the first `conv_[a-zA-Z0-9]+` in it, else
the whole name. The server that fetched the token can read the same id without the browser's help.

The signature is not checked: it is LiveKit's, keyed with a secret only ElevenLabs holds, and the token came
straight from ElevenLabs over TLS. Anything not shaped like that yields None; nothing here raises.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from service.record.payloads import valid_conversation_id

CONVERSATION_ID = re.compile(r"conv_[a-zA-Z0-9]+")
# LiveKit tokens are a few hundred bytes; a bound keeps a hostile or broken answer from costing much.
MAX_TOKEN_CHARS = 16_384
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


def conversation_id_from_token(token: object) -> str | None:
    """The conversation id the ElevenLabs client SDK would use for this token, or None if it has none."""
    claims = token_claims(token)
    if claims is None:
        return None
    video = claims.get("video")
    room = video.get("room") if isinstance(video, dict) else None
    if not isinstance(room, str):
        return None
    return conversation_id_from_room(room)


def conversation_id_from_room(room: str) -> str | None:
    """First `conv_…` in the room name, else the whole name (as the SDK does); None if that is no usable id."""
    match = CONVERSATION_ID.search(room)
    candidate = match.group(0) if match else room
    return candidate if valid_conversation_id(candidate) else None


def token_claims(token: object) -> dict[str, Any] | None:
    """The JWT payload as a dict (signature unchecked), or None when `token` is not a JWT with a JSON object."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        return None
    parts = token.strip().split(".")
    if len(parts) != 3:
        return None
    segment = parts[1].rstrip("=")  # JWTs drop the padding; some encoders keep it
    if not _BASE64URL.fullmatch(segment):
        return None
    try:
        raw = binascii.a2b_base64(_padded(segment).replace("-", "+").replace("_", "/"), strict_mode=True)
        claims = orjson.loads(raw)
    except (ValueError, RecursionError):  # binascii.Error and orjson.JSONDecodeError are ValueErrors
        return None
    return claims if isinstance(claims, dict) else None


def _padded(segment: str) -> str:
    # A length of 1 mod 4 cannot be whole bytes; it is left for the decoder to refuse.
    return segment + "=" * (-len(segment) % 4)


def conversation_id_from_signed_url(answer: Mapping[str, Any]) -> str | None:
    """The id of a `get-signed-url?include_conversation_id=true` answer: its top-level `conversation_id`, else
    the `conversation_id` query parameter of its `signed_url` (the SDK model leaves the place undocumented)."""
    top = answer.get("conversation_id")
    if valid_conversation_id(top):
        assert isinstance(top, str)
        return top
    url = answer.get("signed_url")
    if not isinstance(url, str) or len(url) > MAX_TOKEN_CHARS:
        return None
    try:
        values = parse_qs(urlsplit(url).query).get("conversation_id", [])
    except ValueError:  # e.g. an invalid IPv6 host
        return None
    return values[0] if values and valid_conversation_id(values[0]) else None
