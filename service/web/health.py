"""`/healthz` (the process answers) and `/readyz` (it can reach its database, within a short timeout)."""

from __future__ import annotations

import anyio
import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.storage.db import StoreUnavailable, ping
from service.web.state import app_state

READY_TIMEOUT_SECONDS = 2.0


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """200 when `SELECT 1` answers in time; otherwise StoreUnavailable, which errors.py answers with 503."""
    engine = app_state(request).engine
    with anyio.move_on_after(READY_TIMEOUT_SECONDS):
        # A hung connection attempt keeps its worker thread, but the probe answers on time.
        await anyio.to_thread.run_sync(ping, engine, abandon_on_cancel=True)
        return JSONResponse({"status": "ready"})
    raise StoreUnavailable(f"database did not answer within {READY_TIMEOUT_SECONDS} s")


def routes() -> list[Route]:
    return [Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"])]
