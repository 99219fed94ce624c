"""A sender that trickles its body is cut off by the receiver's pace, and cannot hold the server up meanwhile."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import anyio
import httpx
import pytest
from sqlalchemy.engine import Engine

from service.config import Settings
from service.receiver import BodyTooSlow, Pace, paced
from service.web.app import create_app
from tests.support import webhooks as wh
from tests.support.live import live_server

QUICK = Pace(grace_seconds=0.5, min_bytes_per_second=1000)


async def drip(chunks: list[bytes], every: float) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await anyio.sleep(every)
        yield chunk


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


def test_a_body_at_a_fair_pace_passes_whole() -> None:
    chunks = [b"x" * 500] * 6  # 3,000 bytes in 0.06 s
    assert anyio.run(collect, paced(drip(chunks, 0.01), QUICK)) == b"x" * 3000


def test_a_trickle_is_cut_off_once_the_grace_is_spent() -> None:
    started = time.monotonic()
    with pytest.raises(BodyTooSlow):
        anyio.run(collect, paced(drip([b"x"] * 100, 0.05), QUICK))
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
