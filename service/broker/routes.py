"""`POST /v1/sessions`: the session broker's route. Reads the body, asks ElevenLabs, records, answers."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.api.auth import bearer_protected
from service.broker import sessions
from service.storage.db import run_transaction
from service.web.state import app_state
from service.webhook.body import BodyTooLarge

log = logging.getLogger("postcall.sessions")

# A session body is a few hundred bytes; 64 labels at their longest stay well under this.
MAX_BODY_BYTES = 256 * 1024


async def create(request: Request) -> JSONResponse:
    state = app_state(request)
    session_request = sessions.parse_request(await _json_body(request))
    session = await sessions.open_session(state.elevenlabs, session_request)
    if session.conversation_id is not None:
        at = datetime.fromtimestamp(state.clock(), UTC)
        await run_transaction(state.engine, lambda conn: sessions.record_session(conn, session, session_request, at))
    log.info("session opened", extra={"conversation_id": session.conversation_id, "agent_id": session.agent_id})
    return JSONResponse(session.answer())


async def _json_body(request: Request) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BodyTooLarge()
    try:
        return orjson.loads(body)
    except (orjson.JSONDecodeError, RecursionError):
        raise sessions.InvalidSessionRequest("body", "is not valid JSON") from None


def routes() -> list[Route]:
    return [Route("/v1/sessions", bearer_protected(create), methods=["POST"])]
