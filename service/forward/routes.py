"""`GET /v1/events`: the feed over HTTP, with a cursor and long-polling (forward/feed.py has the ordering)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio
import anyio.to_thread
from sqlalchemy.engine import Engine
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.api.auth import bearer_protected
from service.api.query_params import QueryError, only_parameters, whole_number
from service.forward import feed
from service.storage.db import transaction, unavailable_as_store_error
from service.web.state import app_state

DEFAULT_LIMIT = 100
POLL_SECONDS = 0.05  # while long-polling: how often to look again (the look is one indexed probe when idle)


def parse_events_query(items: Sequence[tuple[str, str]]) -> tuple[int, int, float]:
    """`after`, `limit` and `wait` of GET /v1/events; QueryError (422) for anything else or a bad value."""
    given = only_parameters(items, ("after", "limit", "wait"))
    try:
        after = feed.decode_cursor(given.get("after"))
    except feed.BadCursor as exc:
        raise QueryError("after", str(exc)) from None
    limit = whole_number("limit", given["limit"], feed.MAX_PAGE) if "limit" in given else DEFAULT_LIMIT
    wait = whole_number("wait", given["wait"], feed.MAX_WAIT_SECONDS, minimum=0) if "wait" in given else 0
    return after, limit, float(wait)


def _sequence_and_read(engine: Engine, after: int, limit: int) -> feed.FeedPage:
    with unavailable_as_store_error():
        transaction(engine, feed.sequence)
        with engine.connect() as conn:
            return feed.read(conn, after, limit)


async def list_events(request: Request) -> Response:
    after, limit, wait = parse_events_query(request.query_params.multi_items())
    engine = app_state(request).engine
    deadline = time.monotonic() + wait
    while True:
        page = await anyio.to_thread.run_sync(_sequence_and_read, engine, after, limit)
        if page.bodies or time.monotonic() >= deadline:
            return Response(page.json(), media_type="application/json")
        await anyio.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0)))


def routes() -> list[Route]:
    return [Route("/v1/events", bearer_protected(list_events), methods=["GET"])]
