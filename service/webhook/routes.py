"""`POST /webhooks/elevenlabs`: verify, read, store durably, then answer.

The route needs nothing of the app shell: what it uses is a `Receiver`, built once by the app's lifespan and handed
to `routes()` as a getter (the route exists before the lifespan has run).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
from sqlalchemy.engine import Engine
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.record import payloads, store
from service.record.merge import Observation, Source
from service.storage.audio import BlobStore
from service.storage.db import run_transaction
from service.webhook.body import DEFAULT_PACE, BodyTooLarge, Pace, ReceivedBody, audio_of, read_body, sync_audio
from service.webhook.pending import PendingBudget
from service.webhook.signature import check_timestamp, parse_header
from service.webhook.writer import BatchWriter

log = logging.getLogger("postcall.webhooks")

SIGNATURE_HEADER = "elevenlabs-signature"
PATH = "/webhooks/elevenlabs"


@dataclass
class Receiver:
    """What the webhook route works with. `count(event_type, outcome)` is told each answered delivery."""

    secrets: list[bytes]
    tolerance_seconds: int
    max_body_bytes: int
    engine: Engine
    blobs: BlobStore
    writer: BatchWriter  # group commit for transcription and failure deliveries; its owner stops it
    pending: PendingBudget  # what bodies not yet verified hold, together
    count: Callable[[str, str], None] = field(default=lambda event_type, outcome: None)
    clock: Callable[[], float] = field(default=time.time)
    pace: Pace = field(default=DEFAULT_PACE)  # how slowly a body may arrive


async def receive(receiver: Receiver, request: Request) -> JSONResponse:
    now = receiver.clock()
    header = parse_header(request.headers.get(SIGNATURE_HEADER))
    check_timestamp(header, now, receiver.tolerance_seconds)
    declared = _declared_length(request)
    if declared is not None and declared > receiver.max_body_bytes:
        raise BodyTooLarge()
    body = await read_body(
        request.stream(),
        header,
        receiver.secrets,
        receiver.blobs,
        max_bytes=receiver.max_body_bytes,
        pending=receiver.pending,
        declared=declared,
        pace=receiver.pace,
    )
    try:
        outcome, conversation_id = await _store(receiver, body, datetime.fromtimestamp(now, UTC))
    finally:
        body.discard()  # a no-op once the audio was renamed into place
    receiver.count(type_label(body.payload), outcome.value)
    log.info("webhook %s", outcome.value, extra={"conversation_id": conversation_id})
    return JSONResponse({"status": outcome.value, "conversation_id": conversation_id})


def type_label(payload: Any) -> str:
    """The event type as a metric label: one of the known types or "other", so senders cannot grow the series."""
    event_type = payload.get("type") if isinstance(payload, Mapping) else None
    return event_type if event_type in payloads.KNOWN_TYPES else "other"


async def _store(receiver: Receiver, body: ReceivedBody, at: datetime) -> tuple[store.Outcome, str | None]:
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
        blob = await anyio.to_thread.run_sync(audio_of, body, envelope.data, receiver.blobs)
        await anyio.to_thread.run_sync(sync_audio, blob)  # the slow fsync happens outside the transaction
        agent_id: Any = envelope.data.get("agent_id")
        agent = agent_id if isinstance(agent_id, str) else None
        outcome = await run_transaction(
            receiver.engine, lambda conn: store.record_audio_delivery(conn, delivery, agent, blob)
        )
    else:
        observation = _observation(envelope, at)
        outcome = await receiver.writer.record(delivery, observation)
    return outcome, envelope.conversation_id


def _declared_length(request: Request) -> int | None:
    """The Content-Length, when the sender declared one (the HTTP parser holds the body to it)."""
    declared = request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else None


def _observation(envelope: payloads.Envelope, at: datetime) -> Observation | None:
    if envelope.type == payloads.TRANSCRIPTION:
        return payloads.detail_observation(envelope.data, Source.TRANSCRIPTION_WEBHOOK, at)
    if envelope.type == payloads.OTEL:
        return payloads.otel_observation(envelope.data, at)
    if envelope.type == payloads.FAILURE:
        return payloads.failure_observation(envelope.data, at, envelope.event_timestamp)
    return None


def routes(receiver: Callable[[], Receiver]) -> list[Route]:
    async def endpoint(request: Request) -> JSONResponse:
        return await receive(receiver(), request)

    return [Route(PATH, endpoint, methods=["POST"])]
