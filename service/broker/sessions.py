"""The session broker: fetch a WebRTC conversation token (or WebSocket signed URL) for the app's server, read the
conversation_id from it, and record the conversation before the call starts.

The recorded row is an ordinary observation (source `session`, status `initiated`, the caller's user_id and
labels), so the post-call webhook and the reconciler later merge into the same record under the usual rules.

ElevenLabs is asked through the one client (service/elevenlabs.py), built for the broker by `elevenlabs_client`:
- no retries: a caller is waiting, and each token request mints a conversation at ElevenLabs, so a retry after a
  lost answer would mint a second one; a 429 or 5xx goes back at once as a 503 with the upstream's Retry-After,
  and the caller decides when to try again;
- one deadline for the whole call (DEADLINE_SECONDS), however slowly the upstream drips its answer;
- an answer read up to MAX_ANSWER_BYTES (a token answer is a few hundred bytes).

Errors are types; `service/web/errors.py` turns them into answers:
- InvalidSessionRequest(field, message): the body does not describe a session (422), before ElevenLabs is asked;
  the string fields are printable, so NUL (which PostgreSQL cannot store) never gets past the door.
- BrokerNotConfigured: no POSTCALL_ELEVENLABS_API_KEY (503).
- the client's ElevenLabsError tree: upstream 401/403 and other refusals 502, 404 404, 429/5xx/no answer 503,
  an answer that cannot be read 502 — each with ElevenLabs' own reason, the API key scrubbed from it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import httpx
from sqlalchemy.engine import Connection

from service.broker.token import conversation_id_from_signed_url, conversation_id_from_token
from service.config import Settings
from service.elevenlabs import NO_RETRIES, ElevenLabsClient
from service.record import payloads, store

log = logging.getLogger("postcall.sessions")

DEADLINE_SECONDS = 10.0
TIMEOUT = httpx.Timeout(DEADLINE_SECONDS, connect=5.0)  # a host that does not accept is given up on sooner
MAX_ANSWER_BYTES = 1024 * 1024
# Sessions are started by people waiting for a call; more at once than this wait for a slot (within the deadline).
CONCURRENCY = 64
MAX_LABELS = 64
# Lengths bounded by the columns they land in (models.Conversation), so a long value is a 422, not a 500.
MAX_CHARS = {"agent_id": 256, "branch_id": 256, "user_id": 1024, "participant_name": 256, "environment": 256}
MAX_LABEL_KEY_CHARS = 128
MAX_LABEL_VALUE_CHARS = 1024


class Transport(StrEnum):
    WEBRTC = "webrtc"
    WEBSOCKET = "websocket"


@dataclass(frozen=True)
class SessionRequest:
    agent_id: str
    transport: Transport
    participant_name: str | None = None
    branch_id: str | None = None
    environment: str | None = None
    user_id: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Session:
    """What the app's server gets back: the credential its client starts the call with, and the id if known."""

    agent_id: str
    transport: Transport
    credential: str  # the conversation token (webrtc) or the signed URL (websocket)
    conversation_id: str | None

    def answer(self) -> dict[str, Any]:
        credential = "token" if self.transport is Transport.WEBRTC else "signed_url"
        return {"conversation_id": self.conversation_id, credential: self.credential, "agent_id": self.agent_id}


class InvalidSessionRequest(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class BrokerNotConfigured(Exception):
    """No ElevenLabs API key: the broker cannot fetch tokens."""


# --- the request body ------------------------------------------------------------------------------------------

_OPTIONAL = ("participant_name", "branch_id", "environment", "user_id")
_KNOWN = frozenset({"agent_id", "transport", "labels", *_OPTIONAL})


def parse_request(payload: Any) -> SessionRequest:
    """Validate a `POST /v1/sessions` body; unknown fields are refused so that a typo (`userId`) is not lost."""
    if not isinstance(payload, dict):
        raise InvalidSessionRequest("body", "must be a JSON object")
    for name in payload:
        if name not in _KNOWN:
            raise InvalidSessionRequest(name, "is not a known field")
    agent_id = _string(payload, "agent_id", required=True)
    assert agent_id is not None
    transport = payload.get("transport", None)
    if not isinstance(transport, str) or transport not in {t.value for t in Transport}:  # a list is unhashable
        raise InvalidSessionRequest("transport", 'must be "webrtc" or "websocket"')
    optional = {name: _string(payload, name, required=False) for name in _OPTIONAL}
    return SessionRequest(
        agent_id=agent_id, transport=Transport(transport), labels=_labels(payload.get("labels")), **optional
    )


def _string(payload: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = payload.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidSessionRequest(name, "must be a non-empty string")
    if len(value) > MAX_CHARS[name] or not value.isprintable():
        raise InvalidSessionRequest(name, f"must be printable and at most {MAX_CHARS[name]} characters")
    return value


def _labels(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidSessionRequest("labels", "must be an object of strings")
    if len(value) > MAX_LABELS:
        raise InvalidSessionRequest("labels", f"may hold at most {MAX_LABELS} labels")
    # NUL is refused, not replaced: PostgreSQL cannot store it, and a label altered on the way would no longer
    # find the conversation by the value the caller knows. Refused here, before ElevenLabs mints a conversation.
    for key, item in value.items():
        if not key or len(key) > MAX_LABEL_KEY_CHARS or "\x00" in key:
            raise InvalidSessionRequest("labels", f"names must have 1 to {MAX_LABEL_KEY_CHARS} characters, no NUL")
        if not isinstance(item, str) or len(item) > MAX_LABEL_VALUE_CHARS or "\x00" in item:
            raise InvalidSessionRequest(
                f"labels.{key}", f"must be a string of at most {MAX_LABEL_VALUE_CHARS} characters, no NUL"
            )
    return dict(value)


# --- ElevenLabs ------------------------------------------------------------------------------------------------


def elevenlabs_client(settings: Settings) -> ElevenLabsClient | None:
    """The client the broker asks ElevenLabs with (None without an API key); the app's lifespan closes it."""
    if settings.elevenlabs_api_key is None:
        return None
    return ElevenLabsClient.open(
        settings.elevenlabs_base_url,
        settings.elevenlabs_api_key.get_secret_value(),
        timeout=TIMEOUT,
        concurrency=CONCURRENCY,
        retries=NO_RETRIES,
        deadline=DEADLINE_SECONDS,
        max_json_bytes=MAX_ANSWER_BYTES,
    )


async def open_session(client: ElevenLabsClient | None, request: SessionRequest) -> Session:
    """Ask ElevenLabs for the credential the client starts the call with, and read the conversation_id from it."""
    if client is None:
        raise BrokerNotConfigured("the session broker is not configured: set POSTCALL_ELEVENLABS_API_KEY")
    where = {"branch_id": request.branch_id, "environment": request.environment}
    if request.transport is Transport.WEBRTC:
        answer = await client.conversation_token(request.agent_id, participant_name=request.participant_name, **where)
        credential = answer["token"]
        conversation_id = conversation_id_from_token(credential)
    else:
        answer = await client.signed_url(request.agent_id, **where)
        credential = answer["signed_url"]
        conversation_id = conversation_id_from_signed_url(answer)
    if conversation_id is None:
        _warn_unrecognized(request.transport)
    return Session(request.agent_id, request.transport, credential, conversation_id)


def record_session(conn: Connection, session: Session, request: SessionRequest, at: datetime) -> store.Change:
    """Record the new conversation (inside the caller's transaction) so it is queryable before the call starts."""
    assert session.conversation_id is not None
    observation = payloads.session_observation(
        session.conversation_id, request.agent_id, request.user_id, request.branch_id, request.labels, at
    )
    return store.apply(conn, observation, now=at)


_unrecognized_warned = False


def _warn_unrecognized(transport: Transport) -> None:
    """Once per process: a shape we cannot read is a fact about ElevenLabs, not about each request."""
    global _unrecognized_warned
    if _unrecognized_warned:
        log.debug("no conversation_id in the %s answer", transport.value)
        return
    _unrecognized_warned = True
    log.warning(
        "ElevenLabs answered a %s session in a shape postcall cannot read a conversation_id from; answering "
        "conversation_id null (the webhook and the reconciler still record the conversation). Logged once.",
        transport.value,
    )
