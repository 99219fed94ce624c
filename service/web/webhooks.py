"""`POST /webhooks/elevenlabs`: verify, read, store durably, then answer."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
from sqlalchemy.engine import Connection
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service import events, ingest
from service.blobs import TempBlob
from service.merge import Audio, Observation, Source
from service.receiver import BodyTooLarge, ReceivedBody, audio_from_payload, read_body, sync_audio
from service.signature import check_timestamp, parse_header
from service.web.metrics import metrics_of, webhook_type_label
from service.web.state import AppState, app_state

log = logging.getLogger("postcall.webhooks")

SIGNATURE_HEADER = "elevenlabs-signature"


async def receive(request: Request) -> JSONResponse:
    state = app_state(request)
    now = state.clock()
    header = parse_header(request.headers.get(SIGNATURE_HEADER))
    check_timestamp(header, now, state.settings.webhook_tolerance_seconds)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > state.settings.max_body_bytes:
        raise BodyTooLarge()
    body = await read_body(
        request.stream(), header, state.webhook_secrets, state.settings.max_body_bytes, state.blobs, state.pace
    )
    try:
        outcome, conversation_id = await _store(state, body, datetime.fromtimestamp(now, UTC))
    finally:
        body.discard()  # a no-op once the audio was renamed into place
    metrics_of(request).webhook(webhook_type_label(body.payload), outcome.value)
    log.info("webhook %s", outcome.value, extra={"conversation_id": conversation_id})
    return JSONResponse({"status": outcome.value, "conversation_id": conversation_id})


async def _store(state: AppState, body: ReceivedBody, at: datetime) -> tuple[ingest.Outcome, str | None]:
    envelope = events.read_envelope(body.payload)
    delivery = ingest.Delivery(
        body_sha256=body.sha256,
        event_type=envelope.type[:128],
        conversation_id=envelope.conversation_id,
        received_at=at,
        body_bytes=body.size,
        body=None if envelope.type == events.AUDIO else body.raw,
    )
    if envelope.type == events.AUDIO:
        if body.audio is None:  # a small body carried its audio inline
            body.audio = await anyio.to_thread.run_sync(audio_from_payload, envelope.data, state.blobs)
        blob: TempBlob = body.audio
        await anyio.to_thread.run_sync(sync_audio, blob)  # the slow fsync happens outside the transaction
        outcome = await state.write(lambda conn: _record_audio(conn, delivery, envelope, blob))
    else:
        observation = _observation(envelope, at)
        outcome = await state.writer.record(delivery, observation)
    return outcome, envelope.conversation_id


def _observation(envelope: events.Envelope, at: datetime) -> Observation | None:
    if envelope.type == events.TRANSCRIPTION:
        return events.detail_observation(envelope.data, Source.TRANSCRIPTION_WEBHOOK, at)
    if envelope.type == events.FAILURE:
        return events.failure_observation(envelope.data, at)
    return None


def _record_audio(
    conn: Connection, delivery: ingest.Delivery, envelope: events.Envelope, blob: TempBlob
) -> ingest.Outcome:
    if not ingest.archive(conn, delivery):
        return ingest.Outcome.DUPLICATE
    assert envelope.conversation_id is not None
    relpath = blob.commit(envelope.conversation_id)
    agent_id: Any = envelope.data.get("agent_id")
    observation = events.audio_observation(
        envelope.conversation_id,
        agent_id if isinstance(agent_id, str) else None,
        Audio(relpath, blob.size),
        Source.AUDIO_WEBHOOK,
        delivery.received_at,
    )
    ingest.apply(conn, observation, now=delivery.received_at)
    return ingest.Outcome.ACCEPTED


def routes() -> list[Route]:
    return [Route("/webhooks/elevenlabs", receive, methods=["POST"])]
