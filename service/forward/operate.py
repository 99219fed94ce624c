"""Operating forwarding over HTTP: `GET /v1/forward` (each sink's backlog) and `POST /v1/forward/replay` (admin)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
import orjson
from sqlalchemy.engine import Connection, Engine
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.api.auth import Caller, admin_protected, bearer_protected
from service.forward import deliveries
from service.forward.configured import sink_names
from service.forward.replay import ReplayError, choose_sinks, parse_since, replay
from service.record.public import iso
from service.storage.db import transaction
from service.web.state import app_state

log = logging.getLogger("postcall.forward")

MAX_REPLAY_BODY = 4096


def status_document(engine: Engine, names: Sequence[str], now: datetime) -> dict[str, Any]:
    """The answer of GET /v1/forward."""
    return {"sinks": transaction(engine, lambda conn: sinks_status(conn, names, now))}


def sinks_status(conn: Connection, names: Sequence[str], now: datetime) -> list[dict[str, Any]]:
    """Each sink's backlog, as GET /v1/forward and the console's coverage page show it."""
    report = deliveries.status(conn, names)
    return [
        {
            "sink": sink.sink,
            "pending": sink.pending,
            "dead": sink.dead,
            "oldest_pending_seconds": (
                max((now - sink.oldest_pending_at).total_seconds(), 0.0) if sink.oldest_pending_at else None
            ),
            "last_success_at": iso(sink.last_success_at) if sink.last_success_at else None,
            "last_error": sink.last_error,
        }
        for sink in report
    ]


async def forward_status(request: Request) -> Response:
    state = app_state(request)
    now = datetime.fromtimestamp(state.clock(), UTC)
    document = await anyio.to_thread.run_sync(status_document, state.engine, sink_names(state.settings), now)
    return JSONResponse(document)


def read_replay_request(body: bytes) -> tuple[str, str | None]:
    """`since` (a string or unix seconds) and `sink` (optional) of a replay request; ReplayError otherwise."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ReplayError("body", "is not JSON") from None
    if not isinstance(request, dict):
        raise ReplayError("body", 'must be an object: {"since": "7d", "sink": <optional>}')
    unknown = set(request) - {"since", "sink"}
    if unknown:
        raise ReplayError(sorted(unknown)[0], "unknown field: a replay takes since and sink")
    since = request.get("since")
    if isinstance(since, int) and not isinstance(since, bool):
        since = str(since)
    if not isinstance(since, str) or not since.strip():
        raise ReplayError("since", "is required: 7d, ISO-8601 or unix seconds")
    sink = request.get("sink")
    if sink is not None and not isinstance(sink, str):
        raise ReplayError("sink", "must be a sink's name as GET /v1/forward shows it")
    return since, sink


async def replay_events(request: Request, caller: Caller) -> Response:
    state = app_state(request)
    now = datetime.fromtimestamp(state.clock(), UTC)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REPLAY_BODY:
            return JSONResponse({"error": "body too large"}, status_code=413)
    try:
        since_text, sink = read_replay_request(body)
        since = parse_since(since_text, now)
        names = choose_sinks(sink_names(state.settings), sink)
    except ReplayError as exc:
        return JSONResponse({"error": f"{exc.field}: {exc}", "field": exc.field}, status_code=422)
    count = await anyio.to_thread.run_sync(replay, state.engine, names, since, now)
    log.info("replay by %s: %d deliveries since %s to %s", caller.name, count, iso(since), ", ".join(names))
    return JSONResponse({"replayed": count, "since": iso(since), "sinks": names})


def routes() -> list[Route]:
    return [
        Route("/v1/forward", bearer_protected(forward_status), methods=["GET"]),
        Route("/v1/forward/replay", admin_protected(replay_events), methods=["POST"]),
    ]
