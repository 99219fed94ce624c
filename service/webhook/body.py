"""Reading one webhook body as it streams: size limit, incremental HMAC and hash, audio split off to disk.

Small bodies (every transcription and failure event) stay in memory and are parsed whole. Once a body
outgrows SMALL_BODY_BYTES it is treated as what it almost surely is, an audio event: from then on the
`data.full_audio` text is decoded to a temp file in the blob store as it arrives, so memory stays bounded
however large the audio is. Nothing here knows about HTTP.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import orjson
import pybase64

from service.record.payloads import PayloadError, may_hold_nul, without_nul
from service.storage.audio import BlobStore, TempBlob
from service.storage.db import StoreUnavailable
from service.webhook.audio_splitter import AudioSplitter, Base64Decoder, StreamFormatError
from service.webhook.signature import BodyVerifier, SignatureHeader

SMALL_BODY_BYTES = 1 << 20
# Large bodies are handed to a worker thread in batches of this size: big enough that thread hops are rare,
# small enough that memory stays flat.
BATCH_BYTES = 1 << 20
NO_AUDIO = "post_call_audio has no data.full_audio"


_LINE_BREAKS = str.maketrans("", "", "\n\r\t")


class BodyTooLarge(Exception):
    """The body is over POSTCALL_MAX_BODY_BYTES."""


class BodyTooSlow(Exception):
    """The sender fell behind the minimum pace; the connection is answered 408 and closed."""


@dataclass(frozen=True)
class Pace:
    """How slowly a body may arrive: by `grace + size / min_rate` seconds after the first byte was awaited.

    A fixed deadline would either cut off a large audio body on a fair link or let a trickle (a byte a second)
    hold its connection for minutes. A minimum average rate does neither: a 24 KB body gets about 10 s, an
    80 MB body about 20 min, and a trickle is cut off once the grace is spent.
    """

    grace_seconds: float = 10.0
    min_bytes_per_second: float = 64 * 1024

    def allowance(self, size: int) -> float:
        return self.grace_seconds + size / self.min_bytes_per_second


DEFAULT_PACE = Pace()


@dataclass
class ReceivedBody:
    payload: Any
    sha256: str
    size: int
    raw: bytes | None  # the body as received, unless audio was split off
    audio: TempBlob | None  # decoded data.full_audio of a large body, in a temp file

    def discard(self) -> None:
        if self.audio is not None:
            self.audio.discard()
            self.audio = None


class _Streaming:
    """The large-body path: signature, hash and audio split computed off the event loop, batch by batch."""

    def __init__(self, verifier: BodyVerifier, digest: Any, blobs: BlobStore) -> None:
        self.verifier = verifier
        self.digest = digest
        self.blob = blobs.open_temp()
        self.decoder = Base64Decoder(self.blob.write)
        self.splitter = AudioSplitter(self.decoder.feed)
        self.unreadable: StreamFormatError | None = None

    def feed(self, data: bytes) -> None:
        self.verifier.update(data)
        self.digest.update(data)
        if self.unreadable is None:
            try:
                self.splitter.feed(data)
            except StreamFormatError as exc:
                # Not an answer yet: whether this is a 400 or a forgery (401) is known only once the whole body
                # is hashed. Stop splitting, keep verifying.
                self.unreadable = exc


async def read_body(
    chunks: AsyncIterator[bytes],
    header: SignatureHeader,
    secrets: Sequence[bytes],
    max_bytes: int,
    blobs: BlobStore,
    pace: Pace = DEFAULT_PACE,
) -> ReceivedBody:
    """Read and verify the body. Raises SignatureError, BodyTooLarge, BodyTooSlow, PayloadError or
    StoreUnavailable; on any error nothing is left behind in the blob store."""
    verifier = BodyVerifier(header, secrets)
    digest = hashlib.sha256()
    buffer = bytearray()
    streaming: _Streaming | None = None
    size = 0
    try:
        # One cancel scope whose deadline moves on with every chunk: a scope per chunk cost more than the HMAC.
        with anyio.CancelScope() as pacing:
            started = anyio.current_time()
            pacing.deadline = started + pace.allowance(0)
            async for chunk in chunks:
                size += len(chunk)
                pacing.deadline = started + pace.allowance(size)
                if size > max_bytes:
                    raise BodyTooLarge()
                buffer += chunk
                if streaming is None and len(buffer) <= SMALL_BODY_BYTES:
                    continue
                if streaming is None:
                    streaming = await anyio.to_thread.run_sync(_Streaming, verifier, digest, blobs)
                if len(buffer) >= BATCH_BYTES:
                    await anyio.to_thread.run_sync(streaming.feed, bytes(buffer))
                    buffer.clear()
        if pacing.cancelled_caught:
            raise BodyTooSlow()
        if streaming is None:
            return _small_body(bytes(buffer), verifier, digest)
        if buffer:
            await anyio.to_thread.run_sync(streaming.feed, bytes(buffer))
        return await anyio.to_thread.run_sync(_finish_streaming, streaming, size)
    except OSError as exc:  # the temp file could not be written: disk full, data dir unwritable
        _discard(streaming)
        raise StoreUnavailable(f"data dir: {exc.strerror}") from exc
    except BaseException:
        _discard(streaming)
        raise


def _discard(streaming: _Streaming | None) -> None:
    if streaming is not None:
        streaming.blob.discard()


def _small_body(body: bytes, verifier: BodyVerifier, digest: Any) -> ReceivedBody:
    verifier.update(body)
    verifier.verify()
    digest.update(body)
    return ReceivedBody(parse_json(body), digest.hexdigest(), len(body), raw=body, audio=None)


def _finish_streaming(streaming: _Streaming, size: int) -> ReceivedBody:
    streaming.verifier.verify()
    try:
        if streaming.unreadable is not None:
            raise streaming.unreadable
        skeleton = streaming.splitter.finish()
        streaming.decoder.finish()
    except StreamFormatError as exc:
        raise PayloadError(str(exc)) from exc
    payload = parse_json(skeleton)
    if not streaming.splitter.found_audio:
        streaming.blob.discard()
        return ReceivedBody(payload, streaming.digest.hexdigest(), size, raw=skeleton, audio=None)
    return ReceivedBody(payload, streaming.digest.hexdigest(), size, raw=None, audio=streaming.blob)


def parse_json(body: bytes) -> Any:
    try:
        payload = orjson.loads(body)
    except (orjson.JSONDecodeError, RecursionError) as exc:
        raise PayloadError("body is not valid JSON") from exc
    return without_nul(payload) if may_hold_nul(body) else payload


def audio_of(body: ReceivedBody, data: Mapping[str, Any], blobs: BlobStore) -> TempBlob:
    """The decoded audio of an audio event, whichever path read it. An event without audio is a PayloadError on
    both paths alike: empty base64 (or only line breaks) decodes to nothing, and a 0-byte file is no recording."""
    if body.audio is None:  # a small body carried its audio inline
        body.audio = audio_from_payload(data, blobs)
    if body.audio.size == 0:
        raise PayloadError(NO_AUDIO)
    return body.audio


def audio_from_payload(data: Mapping[str, Any], blobs: BlobStore) -> TempBlob:
    """A small audio event carries its base64 inline: decode it into a temp file like the streamed path."""
    text = data.get("full_audio")
    if not isinstance(text, str):
        raise PayloadError(NO_AUDIO)
    try:
        # Line breaks carry no data (the streamed path drops them too): only the base64 alphabet is validated.
        audio = pybase64.b64decode(text.translate(_LINE_BREAKS), validate=True)
    except ValueError as exc:
        raise PayloadError("data.full_audio is not valid base64") from exc
    try:
        blob = blobs.open_temp()
    except OSError as exc:
        raise StoreUnavailable(f"data dir: {exc.strerror}") from exc
    try:
        blob.write(audio)
    except OSError as exc:
        blob.discard()  # a disk that fills up half-way must not keep the half that fitted
        raise StoreUnavailable(f"data dir: {exc.strerror}") from exc
    return blob


def sync_audio(blob: TempBlob) -> None:
    """fsync the decoded audio. The last bytes may still sit in the write buffer, so a full disk can show only
    now: that is StoreUnavailable (503) like any other failed write, not an unexpected error."""
    try:
        blob.sync()
    except OSError as exc:
        raise StoreUnavailable(f"data dir: {exc.strerror}") from exc
