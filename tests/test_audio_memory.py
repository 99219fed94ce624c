"""An 80 MB audio webhook, streamed with chunked encoding to a real `postcall serve`: memory stays bounded."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from service.db import create_engine
from service.ingest import get_record
from tests.support.databases import migrated_sqlite
from tests.support.process import peak_rss_bytes, reset_peak_rss, rss_bytes, serve_process
from tests.support.webhooks import SECRET

BLOCK = os.urandom(3 * 1024 * 256)  # 768 KiB, a multiple of 3 so block encodings concatenate
BLOCKS = 107
AUDIO_BYTES = BLOCKS * len(BLOCK)  # just over 80 MiB of MP3, ~112 MB of body
LIMIT = 64 * 1024 * 1024


def body_pieces(conversation_id: str) -> Iterator[bytes]:
    yield b'{"type":"post_call_audio","event_timestamp":1,"data":{"agent_id":"a","conversation_id":"'
    yield conversation_id.encode() + b'","full_audio":"'
    encoded = base64.b64encode(BLOCK)
    for _ in range(BLOCKS):
        for start in range(0, len(encoded), 64 * 1024):
            yield encoded[start : start + 64 * 1024]
    yield b'"}}'


def signature(conversation_id: str, timestamp: int) -> str:
    mac = hmac.new(SECRET.encode(), f"{timestamp}.".encode(), hashlib.sha256)
    for piece in body_pieces(conversation_id):
        mac.update(piece)
    return f"t={timestamp},v0={mac.hexdigest()}"


def test_80_mb_audio_grows_the_server_by_at_most_64_mib(tmp_path: Path) -> None:
    url = migrated_sqlite(str(tmp_path / "postcall.db"))
    env = {"POSTCALL_DATABASE_URL": url, "POSTCALL_WEBHOOK_SECRETS": SECRET, "POSTCALL_DATA_DIR": str(tmp_path)}
    with serve_process(env, "--no-migrate") as (base_url, proc):
        endpoint = f"{base_url}/webhooks/elevenlabs"
        warm = b'{"type":"warm-up","data":{}}'
        ts = int(time.time())
        mac = hmac.new(SECRET.encode(), f"{ts}.".encode() + warm, hashlib.sha256).hexdigest()
        assert (
            httpx.post(endpoint, content=warm, headers={"ElevenLabs-Signature": f"t={ts},v0={mac}"}).status_code == 200
        )

        baseline = rss_bytes(proc.pid)
        reset_peak_rss(proc.pid)
        header = signature("conv_80mb", int(time.time()))
        answer = httpx.post(
            endpoint, content=body_pieces("conv_80mb"), headers={"ElevenLabs-Signature": header}, timeout=120
        )
        growth = peak_rss_bytes(proc.pid) - baseline

    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "accepted"
    print(f"peak RSS growth while taking {AUDIO_BYTES / 2**20:.0f} MiB of audio: {growth / 2**20:.1f} MiB")
    assert growth <= LIMIT, f"peak RSS grew by {growth / 2**20:.1f} MiB"
    engine = create_engine(url)
    with engine.connect() as conn:
        stored = get_record(conn, "conv_80mb")
    engine.dispose()
    assert stored is not None and stored["audio_bytes"] == AUDIO_BYTES
    assert (tmp_path / stored["audio_path"]).stat().st_size == AUDIO_BYTES
