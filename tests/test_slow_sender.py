"""A sender that trickles its body is cut off by the receiver's pace, and cannot hold the server up meanwhile."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import anyio
import httpx
import pytest
from sqlalchemy.engine import Engine

from service.config import Settings
from service.storage.audio import BlobStore
from service.web.app import create_app
from service.webhook.body import BodyTooSlow, Pace, read_body
from service.webhook.pending import PendingBudget
from service.webhook.signature import parse_header
from tests.support import webhooks as wh
from tests.support.live import live_server

QUICK = Pace(grace_seconds=0.5, min_bytes_per_second=1000)


async def drip(chunks: list[bytes], every: float) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await anyio.sleep(every)
        yield chunk


def read_dripped(body: bytes, piece: int, every: float, blobs: BlobStore) -> bytes:
    """Read a signed body that arrives `piece` bytes every `every` seconds, at the QUICK pace."""
    header = parse_header(wh.signed_headers(body)["ElevenLabs-Signature"])
    chunks = [body[i : i + piece] for i in range(0, len(body), piece)]
    read = partial(read_body, max_bytes=1 << 20, pending=PendingBudget(1 << 20), pace=QUICK)
    received = anyio.run(read, drip(chunks, every), header, [wh.SECRET.encode()], blobs)
    assert received.raw is not None
    return received.raw


def test_a_body_at_a_fair_pace_passes_whole(tmp_path: Path) -> None:
    body = wh.encode(wh.transcription("conv_fair"))  # ~700 bytes in 0.05 s: well above 1,000 bytes/s
    assert read_dripped(body, 150, 0.01, BlobStore(tmp_path)) == body


def test_a_trickle_is_cut_off_once_the_grace_is_spent(tmp_path: Path) -> None:
    body = wh.encode(wh.transcription("conv_trickle"))
    started = time.monotonic()
    with pytest.raises(BodyTooSlow):
        read_dripped(body, 1, 0.05, BlobStore(tmp_path))  # 20 bytes/s
    assert 0.4 < time.monotonic() - started < 2


def test_the_allowance_grows_with_what_has_arrived() -> None:
    pace = Pace(grace_seconds=10, min_bytes_per_second=64 * 1024)
    assert pace.allowance(0) == 10
    assert pace.allowance(80 * 1024 * 1024) == pytest.approx(10 + 1280)


def trickle(base_url: str, body: bytes, every: float, budget: float) -> bytes:
    """Send the headers, then the body a byte at a time; return whatever the server answered."""
    host, port = base_url.removeprefix("http://").split(":")
    signature = wh.signed_headers(body)["ElevenLabs-Signature"]
    head = (
        f"POST /webhooks/elevenlabs HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nElevenLabs-Signature: {signature}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=budget) as sock:
        sock.sendall(head.encode())
        deadline = time.monotonic() + budget
        sock.setblocking(False)
        answer = b""
        for byte in body:
            if time.monotonic() > deadline:
                break
            try:
                sock.send(bytes([byte]))
            except OSError:  # the server closed the connection
                break
            time.sleep(every)
            try:
                answer += sock.recv(4096)
            except BlockingIOError:
                continue
            if answer:
                break
        return answer


def test_a_trickling_sender_gets_408_and_others_are_served_meanwhile(settings: Settings, engine: Engine) -> None:
    slow = wh.encode(wh.transcription("conv_slow"))
    fast = wh.encode(wh.transcription("conv_fast"))
    with live_server(create_app(settings, engine=engine, pace=QUICK)) as base_url, ThreadPoolExecutor(1) as pool:
        future = pool.submit(trickle, base_url, slow, 0.05, 10.0)
        time.sleep(0.2)  # the trickle is under way
        served = httpx.post(f"{base_url}/webhooks/elevenlabs", content=fast, headers=wh.signed_headers(fast))
        answer = future.result(timeout=15)
    assert served.status_code == 200
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body arrived too slowly" in answer
    with engine.connect() as conn:
        ids = conn.exec_driver_sql("SELECT conversation_id FROM conversation").scalars().all()
    assert ids == ["conv_fast"]
