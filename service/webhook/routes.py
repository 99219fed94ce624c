"""`POST /webhooks/elevenlabs`: verify, read, store durably, then answer."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.record import payloads, store
from service.record.merge import Observation, Source
from service.storage.audio import TempBlob
from service.web.metrics import metrics_of, webhook_type_label
from service.web.state import AppState, app_state
from service.webhook.body import BodyTooLarge, ReceivedBody, audio_from_payload, read_body, sync_audio
from service.webhook.signature import check_timestamp, parse_header

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


async def _store(state: AppState, body: ReceivedBody, at: datetime) -> tuple[store.Outcome, str | None]:
    envelope = payloads.read_envelope(body.payload)
    delivery = store.Delivery(
        body_sha256=body.sha256,
        event_type=envelope.type[:128],
        conversation_id=envelope.conversation_id,
        received_at=at,
        body_bytes=body.size,
        body=None if envelope.type == payloads.AUDIO else body.raw,
    )
    if envelope.type == payloads.AUDIO:
        if body.audio is None:  # a small body carried its audio inline
            body.audio = await anyio.to_thread.run_sync(audio_from_payload, envelope.data, state.blobs)
        blob: TempBlob = body.audio
        await anyio.to_thread.run_sync(sync_audio, blob)  # the slow fsync happens outside the transaction
        agent_id: Any = envelope.data.get("agent_id")
        agent = agent_id if isinstance(agent_id, str) else None
        outcome = await state.write(lambda conn: store.record_audio_delivery(conn, delivery, agent, blob))
    else:
        observation = _observation(envelope, at)
        outcome = await state.writer.record(delivery, observation)
    return outcome, envelope.conversation_id


def _observation(envelope: payloads.Envelope, at: datetime) -> Observation | None:
    if envelope.type == payloads.TRANSCRIPTION:
        return payloads.detail_observation(envelope.data, Source.TRANSCRIPTION_WEBHOOK, at)
    if envelope.type == payloads.OTEL:
        return payloads.otel_observation(envelope.data, at)
    if envelope.type == payloads.FAILURE:
        return payloads.failure_observation(envelope.data, at, envelope.event_timestamp)
    return None


def routes() -> list[Route]:
    return [Route("/webhooks/elevenlabs", receive, methods=["POST"])]
