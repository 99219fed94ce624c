"""Reading one webhook body as it streams: size limit, pace, incremental HMAC and hash, and where it waits.

Nothing of a body is trusted, parsed or decoded before its signature (an HMAC over the whole body, known only at
its last byte) is checked, and what a body holds meanwhile is bounded (see pending.py):
- a small body (at most SMALL_BODY_BYTES: every transcription and failure event) waits in memory and is parsed
  whole once verified, the fast path;
- a larger one, almost surely an audio event, waits in an anonymous temp file in the data dir's tmp/ while it is
  hashed. Once verified, that file is read back through the audio splitter: `data.full_audio` is decoded in
  chunks into a temp file of the blob store, the rest is parsed. A forged body is never decoded, and its file,
  having no name, is gone as soon as it is closed, even if the process is killed.
So memory stays flat however large the body, and a forgery costs its sender as much disk as it costs us, up to
POSTCALL_MAX_PENDING_BYTES for all of them together. Nothing here knows about HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import anyio
import anyio.to_thread
import orjson
import pybase64

from service.record.payloads import PayloadError, may_hold_nul, without_nul
from service.storage.audio import AudioStoreError, BlobStore, TempBlob
from service.storage.db import StoreUnavailable
from service.webhook.audio_splitter import AudioSplitter, Base64Decoder, StreamFormatError
from service.webhook.pending import Hold, PendingBudget
from service.webhook.signature import BodyVerifier, SignatureHeader

SMALL_BODY_BYTES = 1 << 20
# A large body is handed to a worker thread in batches of this size: big enough that thread hops are rare,
# small enough that memory stays flat. The pending memory budget can make a batch smaller, never larger.
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


class _Spill:
    """A large body waiting for its signature check in an anonymous temp file, hashed as it is written."""

    def __init__(self, verifier: BodyVerifier, digest: Any, blobs: BlobStore) -> None:
        self.verifier = verifier
        self.digest = digest
        blobs.temp_dir.mkdir(parents=True, exist_ok=True)
        # No name: nothing can find it, and the kernel frees it when it is closed, whatever ends the process.
        self.file: IO[bytes] = tempfile.TemporaryFile(dir=blobs.temp_dir)  # noqa: SIM115 (closed by close())

    def write(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.verifier.update(piece)
            self.digest.update(piece)
            self.file.write(piece)

    def close(self) -> None:
        # Flushing the last bytes may fail (disk full); the descriptor is closed regardless.
        with contextlib.suppress(OSError):
            self.file.close()


class _Arrival:
    """A body as it arrives: in memory while it is small and the memory budget allows, else spilled to disk."""

    def __init__(self, verifier: BodyVerifier, digest: Any, blobs: BlobStore, hold: Hold) -> None:
        self.verifier = verifier
        self.digest = digest
        self.blobs = blobs
        self.hold = hold
        self.pieces: list[bytes] = []  # what arrived and is not on disk yet
        self.in_memory = 0
        self.spill: _Spill | None = None
        self.size = 0

    async def take(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.pieces.append(chunk)
        self.in_memory += len(chunk)
        if self.spill is None:
            if self.size <= SMALL_BODY_BYTES and self.hold.try_memory(self.size):
                return
            await self.to_disk()
        self.hold.cover_disk(self.size)
        if self.in_memory >= BATCH_BYTES or not self.hold.try_memory(self.in_memory):
            await self.flush()

    async def to_disk(self) -> None:
        """Hold what has arrived on the pending disk (PendingFull if it is spent), then open the spill file."""
        self.hold.cover_disk(self.size)
        self.spill = await anyio.to_thread.run_sync(_Spill, self.verifier, self.digest, self.blobs)

    async def flush(self) -> None:
        assert self.spill is not None
        if self.pieces:
            await anyio.to_thread.run_sync(self.spill.write, self.pieces)
            self.pieces = []
            self.in_memory = 0
        self.hold.try_memory(0)

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()


async def read_body(
    chunks: AsyncIterator[bytes],
    header: SignatureHeader,
    secrets: Sequence[bytes],
    blobs: BlobStore,
    *,
    max_bytes: int,
    pending: PendingBudget,
    declared: int | None = None,
    pace: Pace = DEFAULT_PACE,
) -> ReceivedBody:
    """Read and verify the body, then parse it. `declared` is the Content-Length, if the sender gave one: a large
    body that does not fit in the pending disk free now is then refused before any of it is read.

    Raises SignatureError, BodyTooLarge, BodyTooSlow, PendingFull, PayloadError or StoreUnavailable; on any error
    nothing is left behind in the data dir."""
    hold = pending.hold()
    arrival = _Arrival(BodyVerifier(header, secrets), hashlib.sha256(), blobs, hold)
    try:
        if declared is not None and declared > SMALL_BODY_BYTES:
            hold.admit(declared)
        await _arrive(arrival, chunks, max_bytes, pace)
        if arrival.spill is None:
            body = b"".join(arrival.pieces)
            arrival.verifier.update(body)
            arrival.verifier.verify()
            hold.release()
            return _small_body(body, arrival.digest)
        await arrival.flush()
        await anyio.to_thread.run_sync(arrival.verifier.verify)
        hold.release()  # verified: from here on the body is ElevenLabs', no longer pending
        return await anyio.to_thread.run_sync(_unpack, arrival.spill.file, arrival.digest, arrival.size, blobs)
    except AudioStoreError as exc:  # the bucket refused a part or did not answer in time
        raise StoreUnavailable(f"{blobs.describe()}: {exc.strerror}") from exc
    except OSError as exc:  # a temp file could not be written: disk full, data dir unwritable
        raise StoreUnavailable(f"data dir: {exc.strerror}") from exc
    finally:
        hold.release()
        arrival.close()


async def _arrive(arrival: _Arrival, chunks: AsyncIterator[bytes], max_bytes: int, pace: Pace) -> None:
    """Take every chunk, within the size limit and the pace."""
    # One cancel scope whose deadline moves on with every chunk: a scope per chunk cost more than the HMAC.
    with anyio.CancelScope() as pacing:
        started = anyio.current_time()
        pacing.deadline = started + pace.allowance(0)
        async for chunk in chunks:
            if arrival.size + len(chunk) > max_bytes:
                raise BodyTooLarge()
            pacing.deadline = started + pace.allowance(arrival.size + len(chunk))
            await arrival.take(chunk)
    if pacing.cancelled_caught:
        raise BodyTooSlow()


def _small_body(body: bytes, digest: Any) -> ReceivedBody:
    digest.update(body)
    return ReceivedBody(parse_json(body), digest.hexdigest(), len(body), raw=body, audio=None)


def _unpack(raw: IO[bytes], digest: Any, size: int, blobs: BlobStore) -> ReceivedBody:
    """Split a verified large body, read back from its spill file, into its parsed skeleton and decoded audio."""
    raw.seek(0)
    audio = blobs.open_temp()
    try:
        decoder = Base64Decoder(audio.write)
        splitter = AudioSplitter(decoder.feed)
        try:
            while chunk := raw.read(BATCH_BYTES):
                splitter.feed(chunk)
            skeleton = splitter.finish()
            decoder.finish()
        except StreamFormatError as exc:
            raise PayloadError(str(exc)) from exc
        payload = parse_json(skeleton)
    except BaseException:
        audio.discard()
        raise
    if not splitter.found_audio:
        audio.discard()
        return ReceivedBody(payload, digest.hexdigest(), size, raw=skeleton, audio=None)
    return ReceivedBody(payload, digest.hexdigest(), size, raw=None, audio=audio)


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
        raise StoreUnavailable(f"audio store: {exc.strerror}") from exc
    try:
        blob.write(audio)
    except OSError as exc:
        blob.discard()  # a disk that fills up half-way must not keep the half that fitted
        raise StoreUnavailable(f"audio store: {exc.strerror}") from exc
    return blob


def sync_audio(blob: TempBlob) -> None:
    """fsync the decoded audio. The last bytes may still sit in the write buffer, so a full disk can show only
    now: that is StoreUnavailable (503) like any other failed write, not an unexpected error."""
    try:
        blob.sync()
    except OSError as exc:
        raise StoreUnavailable(f"audio store: {exc.strerror}") from exc
