"""The session broker: fetch a WebRTC conversation token (or WebSocket signed URL) for the app's server, read the
conversation_id from it, and record the conversation before the call starts.

The recorded row is an ordinary observation (source `session`, status `initiated`, the caller's user_id and
labels), so the post-call webhook and the reconciler later merge into the same record under the usual rules.

Errors are types; `service/web/errors.py` turns them into answers:
- InvalidSessionRequest(field, message): the body does not describe a session (422).
- BrokerNotConfigured: no POSTCALL_ELEVENLABS_API_KEY (503).
- UpstreamError(kind, …): ElevenLabs refused or failed, with ElevenLabs' own reason —
  REJECTED (401/403 and other 4xx: 502), NOT_FOUND (404), UNAVAILABLE (429, 5xx, timeouts, connection
  failures: 503), BAD_ANSWER (a 2xx without the token or URL: 502).
The API key goes out only in the `xi-api-key` header; reasons are scrubbed of it before they travel further.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import httpx
from pydantic import SecretStr
from sqlalchemy.engine import Connection

from service.broker.token import conversation_id_from_signed_url, conversation_id_from_token
from service.elevenlabs import scrub_key
from service.record import payloads, store

log = logging.getLogger("postcall.sessions")

TOKEN_PATH = "/v1/convai/conversation/token"  # noqa: S105 (a path, not a secret)
SIGNED_URL_PATH = "/v1/convai/conversation/get-signed-url"
TIMEOUT = httpx.Timeout(10.0, connect=5.0)
MAX_REASON_CHARS = 300
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


class UpstreamKind(StrEnum):
    REJECTED = "rejected"
    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"
    BAD_ANSWER = "bad_answer"


class UpstreamError(Exception):
    def __init__(
        self, kind: UpstreamKind, reason: str, upstream_status: int | None = None, retry_after: str | None = None
    ) -> None:
        super().__init__(f"{kind.value}: {upstream_status} {reason}")
        self.kind = kind
        self.reason = reason
        self.upstream_status = upstream_status
        self.retry_after = retry_after


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
    if transport not in {t.value for t in Transport}:
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
    for key, item in value.items():
        if not key or len(key) > MAX_LABEL_KEY_CHARS:
            raise InvalidSessionRequest("labels", f"names must have 1 to {MAX_LABEL_KEY_CHARS} characters")
        if not isinstance(item, str) or len(item) > MAX_LABEL_VALUE_CHARS:
            raise InvalidSessionRequest(f"labels.{key}", f"must be a string of at most {MAX_LABEL_VALUE_CHARS} chars")
    return dict(value)


# --- ElevenLabs ------------------------------------------------------------------------------------------------


def elevenlabs_client(base_url: str) -> httpx.AsyncClient:
    """The client the broker talks to ElevenLabs with; the owner (the app's lifespan) closes it."""
    return httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT, headers={"user-agent": "postcall"})


async def open_session(client: httpx.AsyncClient, api_key: SecretStr | None, request: SessionRequest) -> Session:
    """Ask ElevenLabs for the credential the client starts the call with, and read the conversation_id from it."""
    if api_key is None:
        raise BrokerNotConfigured("the session broker is not configured: set POSTCALL_ELEVENLABS_API_KEY")
    if request.transport is Transport.WEBRTC:
        params = _params(request, agent_id=request.agent_id, participant_name=request.participant_name)
        answer = await _get(client, TOKEN_PATH, params, api_key)
        credential = _credential(answer, "token")
        conversation_id = conversation_id_from_token(credential)
    else:
        params = _params(request, agent_id=request.agent_id, include_conversation_id="true")
        answer = await _get(client, SIGNED_URL_PATH, params, api_key)
        credential = _credential(answer, "signed_url")
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


def _params(request: SessionRequest, **params: str | None) -> dict[str, str]:
    params.update(branch_id=request.branch_id, environment=request.environment)
    return {name: value for name, value in params.items() if value is not None}


async def _get(client: httpx.AsyncClient, path: str, params: dict[str, str], api_key: SecretStr) -> dict[str, Any]:
    key = api_key.get_secret_value()
    try:
        response = await client.get(path, params=params, headers={"xi-api-key": key})
    except httpx.TimeoutException as exc:
        raise UpstreamError(
            UpstreamKind.UNAVAILABLE, f"ElevenLabs did not answer in time ({type(exc).__name__})"
        ) from None
    except httpx.TransportError as exc:
        reason = scrub_key(f"cannot reach ElevenLabs: {type(exc).__name__}: {exc}", key)
        raise UpstreamError(UpstreamKind.UNAVAILABLE, reason) from None
    except httpx.HTTPError as exc:  # decoding errors, redirect loops: an answer we cannot use
        raise UpstreamError(UpstreamKind.BAD_ANSWER, scrub_key(f"{type(exc).__name__}: {exc}", key)) from None
    if response.is_success:
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise UpstreamError(UpstreamKind.BAD_ANSWER, "the answer is not a JSON object", response.status_code)
        return answer
    raise UpstreamError(
        _kind(response.status_code),
        upstream_reason(response, key),
        response.status_code,
        retry_after=response.headers.get("retry-after") if response.status_code in (429, 503) else None,
    )


def _kind(status: int) -> UpstreamKind:
    if status == 404:
        return UpstreamKind.NOT_FOUND
    if status == 429 or status >= 500:
        return UpstreamKind.UNAVAILABLE
    return UpstreamKind.REJECTED


def _credential(answer: Mapping[str, Any], name: str) -> str:
    value = answer.get(name)
    if not isinstance(value, str) or not value:
        raise UpstreamError(UpstreamKind.BAD_ANSWER, f"the answer has no {name!r}", 200)
    return value


def upstream_reason(response: httpx.Response, key: str = "") -> str:
    """ElevenLabs' own words for an error: `detail.message`, a `detail` string, the first validation message,
    else the status line's reason phrase; with `key` scrubbed from it."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        detail = detail.get("message") or detail.get("status")
    elif isinstance(detail, list) and detail and isinstance(detail[0], dict):
        detail = detail[0].get("msg")
    reason = detail if isinstance(detail, str) and detail.strip() else response.reason_phrase or "no reason given"
    # Scrub, then shorten: shortening first could cut an echoed key in two, and a half key escapes the scrub.
    return scrub_key(reason, key)[:MAX_REASON_CHARS]


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
