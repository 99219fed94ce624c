"""An 80 MB audio webhook, streamed with chunked encoding to a real `postcall serve`: memory stays bounded."""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

import httpx

from service.storage.db import create_engine
from tests.support.audio_body import BLOCK, AudioBody
from tests.support.databases import migrated_sqlite
from tests.support.process import peak_rss_bytes, reset_peak_rss, rss_bytes, serve_process
from tests.support.records import get_record
from tests.support.webhooks import SECRET

AUDIO = AudioBody("conv_80mb", blocks=107)  # just over 80 MiB of MP3, ~112 MB of body
LIMIT = 64 * 1024 * 1024


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
        header = AUDIO.signature(int(time.time()))
        answer = httpx.post(endpoint, content=AUDIO.pieces(), headers={"ElevenLabs-Signature": header}, timeout=120)
        growth = peak_rss_bytes(proc.pid) - baseline

    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "accepted"
    print(f"peak RSS growth while taking {AUDIO.audio_bytes / 2**20:.0f} MiB of audio: {growth / 2**20:.1f} MiB")
    assert growth <= LIMIT, f"peak RSS grew by {growth / 2**20:.1f} MiB"
    engine = create_engine(url)
    with engine.connect() as conn:
        stored = get_record(conn, "conv_80mb")
    engine.dispose()
    assert stored is not None and stored["audio_bytes"] == AUDIO.audio_bytes
    assert (tmp_path / stored["audio_path"]).stat().st_size == AUDIO.audio_bytes
    assert file_sha256(tmp_path / stored["audio_path"]) == audio_sha256(AUDIO)  # byte for byte
    assert [path for path in (tmp_path / "tmp").iterdir() if path.is_file()] == []


def audio_sha256(body: AudioBody) -> str:
    digest = hashlib.sha256()
    for _ in range(body.blocks):
        digest.update(BLOCK)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
