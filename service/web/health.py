"""`/healthz` (the process answers) and `/readyz` (it can store a webhook now, within a short timeout).

Ready means: the database takes a commit (db.ping), the audio store takes a new file (a bucket: an object put
and deleted, each call bounded by the client's timeouts and this probe's own), and each disk postcall writes
to — the data dir's and, for SQLite, the database's — has at least MIN_FREE_BYTES free. A commit probe alone is not
enough on a full disk: SQLite reuses the free room of its WAL after a checkpoint, so a one-page commit still fits
while every webhook's batch, which needs the WAL or the database file to grow, gets 503 (measured: /readyz 200
while 18 of 40 webhooks were refused).
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import anyio.to_thread
from sqlalchemy.engine import Engine
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.storage.audio import BlobStore
from service.storage.db import StoreUnavailable, database_dir, ping
from service.web.state import app_state

READY_TIMEOUT_SECONDS = 2.0
# Room for a burst of transcription batches and the WAL's growth; an audio file larger than what is free still
# gets its own 503. Far below any real disk, so a ready service is never held back by it.
MIN_FREE_BYTES = 16 * 1024 * 1024


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """200 when `ready` passes in time; otherwise StoreUnavailable, which errors.py answers with 503."""
    state = app_state(request)
    with anyio.move_on_after(READY_TIMEOUT_SECONDS):
        # A hung connection attempt keeps its worker thread, but the probe answers on time.
        await anyio.to_thread.run_sync(ready, state.engine, state.blobs, abandon_on_cancel=True)
        return JSONResponse({"status": "ready"})
    raise StoreUnavailable(f"storage did not answer within {READY_TIMEOUT_SECONDS} s")


def ready(engine: Engine, blobs: BlobStore) -> None:
    """Raise StoreUnavailable, saying why, unless a webhook could be stored now."""
    try:
        blobs.probe()
    except OSError as exc:
        raise StoreUnavailable(f"{blobs.describe()} cannot take a file: {exc.strerror}") from exc
    for path in (blobs.root, database_dir(engine)):
        free = None if path is None else _free_bytes(path)
        if free is not None and free < MIN_FREE_BYTES:
            raise StoreUnavailable(f"{free} bytes free on the disk of {path}, below {MIN_FREE_BYTES}")
    ping(engine)


def _free_bytes(path: Path) -> int:
    """What an unprivileged writer may still use (root's reserved blocks do not count)."""
    try:
        stat = os.statvfs(path)
    except OSError as exc:
        raise StoreUnavailable(f"cannot read the free space of {path}: {exc.strerror}") from exc
    return stat.f_bavail * stat.f_frsize


def routes() -> list[Route]:
    return [Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"])]
