"""The receiver over real HTTP (uvicorn): concurrent duplicates, and audio streamed with chunked encoding."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy.engine import Engine

from service.config import Settings
from service.web.app import create_app
from tests.support import webhooks as wh
from tests.support.live import live_server
from tests.support.records import get_record


@pytest.fixture
def base_url(settings: Settings, engine: Engine) -> Iterator[str]:
    with live_server(create_app(settings, engine=engine)) as url:
        yield url


def count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())


async def deliver_concurrently(url: str, body: bytes, copies: int) -> list[httpx.Response]:
    headers = wh.signed_headers(body)
    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(*(client.post(url, content=body, headers=headers) for _ in range(copies)))


def test_fifty_concurrent_deliveries_of_one_event_make_one_record(base_url: str, engine: Engine) -> None:
    body = wh.encode(wh.transcription("conv_race"))
    answers = asyncio.run(deliver_concurrently(f"{base_url}/webhooks/elevenlabs", body, 50))
    assert [a.status_code for a in answers] == [200] * 50
    statuses = sorted(a.json()["status"] for a in answers)
    assert statuses == ["accepted"] + ["duplicate"] * 49
    assert count(engine, "conversation") == 1
    assert count(engine, "webhook_event") == 1


def test_transcription_and_audio_racing_for_a_new_conversation(
    base_url: str, engine: Engine, settings: Settings
) -> None:
    url = f"{base_url}/webhooks/elevenlabs"
    mp3 = b"ID3" + b"\x55" * 5000

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            bodies = [wh.encode(wh.transcription(f"conv_{i}")) for i in range(10)]
            bodies += [wh.encode(wh.audio(f"conv_{i}", mp3)) for i in range(10)]
            return await asyncio.gather(*(client.post(url, content=b, headers=wh.signed_headers(b)) for b in bodies))

    answers = asyncio.run(both())
    assert {a.json()["status"] for a in answers} == {"accepted"}
    with engine.connect() as conn:
        for i in range(10):
            stored = get_record(conn, f"conv_{i}")
            assert stored is not None
            assert stored["status"] == "done" and stored["audio_stored"] is True and stored["complete"] is True
            assert (settings.data_dir / stored["audio_path"]).read_bytes() == mp3


def chunked_audio_body(conversation_id: str, audio_block: bytes, blocks: int) -> Iterator[bytes]:
    """An audio event generated piece by piece, never whole in memory (the block length is a multiple of 3)."""
    assert len(audio_block) % 3 == 0
    yield b'{"type": "post_call_audio", "event_timestamp": 1, "data": {"agent_id": "a", '
    yield b'"conversation_id": "' + conversation_id.encode() + b'", "full_audio": "'
    encoded = base64.b64encode(audio_block)
    for _ in range(blocks):
        yield encoded
    yield b'"}}'


def test_large_audio_is_streamed_to_disk(base_url: str, engine: Engine, settings: Settings) -> None:
    block = bytes(range(256)) * 12 * 3  # 9 KiB
    body = b"".join(chunked_audio_body("conv_big_audio", block, 400))  # ~4.7 MB of base64
    headers = wh.signed_headers(body)
    pieces = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    answer = httpx.post(f"{base_url}/webhooks/elevenlabs", content=iter(pieces), headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "accepted", "conversation_id": "conv_big_audio"}
    with engine.connect() as conn:
        stored = get_record(conn, "conv_big_audio")
    assert stored is not None and stored["audio_stored"] is True and stored["audio_bytes"] == len(block) * 400
    assert (settings.data_dir / stored["audio_path"]).read_bytes() == block * 400
    assert list((settings.data_dir / "tmp").glob("*")) == []
    # The replay of a large audio body is a duplicate too, and leaves no temp file behind.
    again = httpx.post(f"{base_url}/webhooks/elevenlabs", content=iter(pieces), headers=headers, timeout=60)
    assert again.json()["status"] == "duplicate"
    assert list((settings.data_dir / "tmp").glob("*")) == []


def test_large_body_with_a_bad_signature_leaves_nothing(base_url: str, engine: Engine, settings: Settings) -> None:
    body = b"".join(chunked_audio_body("conv_forged", b"abc" * 3000, 300))
    headers = wh.signed_headers(body, secret="not-the-secret")
    answer = httpx.post(f"{base_url}/webhooks/elevenlabs", content=iter([body[:100], body[100:]]), headers=headers)
    assert answer.status_code == 401
    assert count(engine, "conversation") == 0
    assert not any((settings.data_dir / "audio").glob("**/*.mp3"))
    assert list((settings.data_dir / "tmp").glob("*")) == []
