"""The API: stored conversations, their audio, and the reconciler's runs. Every route needs a bearer token;
erasing a conversation (`DELETE`) an admin token.

Audio and `Range` (RFC 9110 §14): one range is answered 206 with `Content-Range`; a range starting beyond the end
(or a suffix of zero bytes) is 416 with `Content-Range: bytes */<size>`; a header that is not one well-formed
bytes range — another unit, a syntax error, several ranges, or an `If-Range` we cannot validate — is ignored and
the whole file is sent with 200, as §14.2 allows. (Players ask for one range at a time; multipart answers would
buy nothing.)
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import orjson
from sqlalchemy.engine import Connection, Engine
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from service.api import reads, stats
from service.api.auth import Caller, admin_protected, bearer_protected
from service.api.query_params import encode_cursor, parse_filter, parse_runs_limit
from service.erase import erasure
from service.record.payloads import valid_conversation_id
from service.storage.audio import AudioReader
from service.storage.db import StoreUnavailable, unavailable_as_store_error
from service.web.state import app_state

log = logging.getLogger("postcall.read_api")

T = TypeVar("T")
AUDIO_CHUNK_BYTES = 64 * 1024
_DIGITS = re.compile(r"[0-9]*")


class NotFound(Exception):
    """The thing a read asked for is not stored; `str()` says what, for the 404 body."""


class RangeNotSatisfiable(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable for {size} bytes")
        self.size = size


def json_bytes(content: Any) -> bytes:
    """How the API writes JSON (`postcall export` writes its records with it too)."""
    try:
        return orjson.dumps(content)
    except TypeError:  # an integer beyond 64 bits inside stored JSON: slower, but never a 500
        return json.dumps(content, default=str).encode()


class JSONBody(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def _read(engine: Engine, work: Callable[[Connection], T]) -> T:
    with unavailable_as_store_error(), engine.connect() as conn:
        return work(conn)


async def read(request: Request, work: Callable[[Connection], T]) -> T:
    """Run `work` on a connection in a worker thread (the drivers are synchronous)."""
    return await anyio.to_thread.run_sync(_read, app_state(request).engine, work)


async def list_conversations(request: Request) -> Response:
    wanted = parse_filter(request.query_params.multi_items())
    page = await read(request, lambda conn: reads.list_conversations(conn, wanted))
    cursor = encode_cursor(page.next_cursor) if page.next_cursor is not None else None
    return JSONBody({"conversations": page.records, "next_cursor": cursor, "has_more": page.has_more})


def _conversation_id(request: Request) -> str:
    conversation_id: str = request.path_params["conversation_id"]
    if not valid_conversation_id(conversation_id):
        raise NotFound("conversation not found")  # no stored id looks like this
    return conversation_id


async def get_conversation(request: Request) -> Response:
    conversation_id = _conversation_id(request)
    record = await read(request, lambda conn: reads.get_conversation(conn, conversation_id))
    if record is None:
        raise NotFound("conversation not found")
    return JSONBody(record)


async def get_audio(request: Request) -> Response:
    conversation_id = _conversation_id(request)
    relpath = await read(request, lambda conn: reads.stored_audio(conn, conversation_id))
    if relpath is None:
        raise NotFound("no audio stored for this conversation")
    blobs = app_state(request).blobs
    try:
        audio = await anyio.to_thread.run_sync(blobs.open_audio, relpath)
    except (FileNotFoundError, ValueError):
        log.warning("audio file missing from the blob store", extra={"conversation_id": conversation_id})
        raise NotFound("no audio stored for this conversation") from None
    except OSError as exc:  # the store did not answer: 503, like any storage outage
        raise StoreUnavailable(f"{blobs.describe()}: {exc.strerror}") from None
    size = audio.size
    try:
        wanted = None if "if-range" in request.headers else requested_range(request.headers.get("range"), size)
    except RangeNotSatisfiable:
        audio.close()
        raise
    headers = {"accept-ranges": "bytes"}
    if wanted is None:
        wanted, status = ByteRange(0, size - 1), 200
    else:
        status = 206
        headers["content-range"] = f"bytes {wanted.start}-{wanted.end}/{size}"
    headers["content-length"] = str(wanted.length)
    return StreamingResponse(_chunks(audio, wanted), status_code=status, headers=headers, media_type="audio/mpeg")


async def delete_conversation(request: Request, caller: Caller) -> Response:
    """Erase one stored conversation (erase/erasure.py); 404 when none is stored under this id, erased before
    included. The erase log names the caller's token by its position, never the token."""
    conversation_id = _conversation_id(request)
    state = app_state(request)
    plan = erasure.named([conversation_id], tombstone_unstored=False)
    report = await erasure.erase(state.engine, state.blobs, plan, caller.name, clock=state.clock)
    if not report.conversations:
        raise NotFound("conversation not found")
    log.info("conversation erased by %s", caller.name, extra={"conversation_id": conversation_id})
    return Response(status_code=204)


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive, as in Content-Range; end = start - 1 for an empty file

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def requested_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range to send, None to send everything; RangeNotSatisfiable when it starts past the end."""
    if header is None:
        return None
    unit, equals, spec = header.partition("=")
    if not equals or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = (part.strip() for part in spec.partition("-"))
    if not dash or not _DIGITS.fullmatch(first) or not _DIGITS.fullmatch(last) or not (first or last):
        return None
    if not first:  # a suffix: the last N bytes
        if int(last) == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return ByteRange(max(size - int(last), 0), size - 1)
    start = int(first)
    if last and int(last) < start:
        return None  # syntactically invalid: ignored
    if start >= size:
        raise RangeNotSatisfiable(size)
    return ByteRange(start, min(int(last), size - 1) if last else size - 1)


async def _chunks(audio: AudioReader, wanted: ByteRange) -> AsyncIterator[bytes]:
    """The range, chunk by chunk, each read in a worker thread (a file or a bucket's ranged GET alike)."""
    chunks = audio.chunks(wanted.start, wanted.length, AUDIO_CHUNK_BYTES)
    try:
        while (chunk := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
            yield chunk
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_close, chunks, audio)


def _close(chunks: Iterator[bytes], audio: AudioReader) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()
    audio.close()


async def list_runs(request: Request) -> Response:
    limit = parse_runs_limit(request.query_params.multi_items())
    runs = await read(request, lambda conn: reads.recent_runs(conn, limit))
    return JSONBody({"runs": runs})


async def get_stats(request: Request) -> Response:
    days = stats.parse_days(request.query_params.multi_items())
    now = app_state(request).clock()
    counted = await read(request, lambda conn: stats.daily_stats(conn, days, now))
    return JSONBody(counted.as_json())


def routes() -> list[Route]:
    return [
        Route("/v1/conversations", bearer_protected(list_conversations), methods=["GET"]),
        Route("/v1/conversations/{conversation_id}", bearer_protected(get_conversation), methods=["GET"]),
        Route("/v1/conversations/{conversation_id}", admin_protected(delete_conversation), methods=["DELETE"]),
        Route("/v1/conversations/{conversation_id}/audio", bearer_protected(get_audio), methods=["GET"]),
        Route("/v1/reconcile/runs", bearer_protected(list_runs), methods=["GET"]),
        Route("/v1/stats", bearer_protected(get_stats), methods=["GET"]),
    ]
