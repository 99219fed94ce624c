"""What a webhook body holds before its signature is checked (issue 18, item 4): little memory whatever its size,
at most POSTCALL_MAX_PENDING_BYTES of disk for all of them together (503 at once past it), nothing once refused."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.testclient import TestClient

from service.config import Settings
from service.storage.audio import BlobStore
from service.web.app import create_app
from service.web.state import AppState
from service.webhook.body import read_body
from service.webhook.pending import PendingBudget, PendingFull
from service.webhook.signature import parse_header, sign
from tests.bench.forged import forged_body
from tests.support import webhooks as wh
from tests.support.databases import migrated_sqlite
from tests.support.live import live_server
from tests.support.process import disk_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes, serve_process
from tests.support.records import get_record

URL = "/webhooks/elevenlabs"
MIB = 1 << 20


def files_in(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()]


# --- against a real `postcall serve` ----------------------------------------------------------------------------------

FORGED_MIB = 96
# Before the fix a forged body of the JSON shape stayed whole in memory (+96 MiB and more); now a batch of 1 MiB.
MEMORY_MARGIN = 32 * MIB


def test_a_forged_large_body_holds_little_memory_and_leaves_nothing_behind(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {
        "POSTCALL_DATABASE_URL": migrated_sqlite(str(tmp_path / "postcall.db")),
        "POSTCALL_WEBHOOK_SECRETS": wh.SECRET,
        "POSTCALL_DATA_DIR": str(data_dir),
    }
    with serve_process(env, "--no-migrate") as (base_url, proc):
        forged = {"ElevenLabs-Signature": sign(b"another body", wh.SECRET.encode(), int(time.time()))}
        assert httpx.post(base_url + URL, content=b"{}", headers=forged, timeout=30).status_code == 401  # warm-up
        for shape in ("json", "audio"):
            baseline = rss_bytes(proc.pid)
            reset_peak_rss(proc.pid)

            answer = httpx.post(base_url + URL, content=forged_body(shape, FORGED_MIB), headers=forged, timeout=300)

            growth = peak_rss_bytes(proc.pid) - baseline
            assert answer.status_code == 401, (shape, answer.text)
            assert growth < MEMORY_MARGIN, f"{shape}: peak RSS grew by {growth / MIB:.1f} MiB"
            # Neither a file under the data dir nor one the server still holds open there without a name.
            assert disk_bytes(data_dir, proc.pid) == 0, shape


def test_serve_splits_the_pending_budget_between_its_workers(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    env = {
        "POSTCALL_DATABASE_URL": migrated_sqlite(str(tmp_path / "postcall.db")),
        "POSTCALL_WEBHOOK_SECRETS": wh.SECRET,
        "POSTCALL_DATA_DIR": str(tmp_path / "data"),
        "POSTCALL_MAX_BODY_BYTES": str(2 * MIB),
        "POSTCALL_MAX_PENDING_BYTES": str(2 * MIB),
    }
    body = wh.encode(wh.audio("conv_shared", b"ID3" + bytes(MIB)))  # 1.3 MiB: more than a worker's 1 MiB share
    with serve_process(env, "--no-migrate", "--workers", "2", log=log) as (base_url, _):
        answers = [
            httpx.post(base_url + URL, content=body, headers=wh.signed_headers(body), timeout=30).status_code
            for _ in range(4)  # whichever worker takes it
        ]
    assert answers == [503] * 4
    assert "each of 2 workers may hold 1048576 bytes of unverified bodies" in log.read_text()


# --- the pending budget over real HTTP, on both databases ------------------------------------------------------------


@pytest.fixture
def tight(settings: Settings, engine: Engine) -> Iterator[tuple[str, Starlette, Settings]]:
    """The app behind uvicorn, where bodies not yet verified may hold 3 MiB of disk together."""
    tight = settings.model_copy(update={"max_body_bytes": 3 * MIB, "max_pending_bytes": 3 * MIB})
    app = create_app(tight, engine=engine)
    with live_server(app) as url:
        yield url, app, tight


def audio_body(conversation_id: str, audio_bytes: int) -> tuple[bytes, bytes]:
    audio = hashlib.shake_256(conversation_id.encode()).digest(audio_bytes)
    return wh.encode(wh.audio(conversation_id, audio)), audio


def head(body: bytes, *, chunked: bool = False) -> bytes:
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    signature = wh.signed_headers(body)["ElevenLabs-Signature"]
    return (
        f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n"
        f"ElevenLabs-Signature: {signature}\r\n\r\n"
    ).encode()


def address(base_url: str) -> tuple[str, int]:
    host, port = base_url.removeprefix("http://").split(":")
    return host, int(port)


def status_of(sock: socket.socket) -> int:
    answer = b""
    while b"\r\n" not in answer and (chunk := sock.recv(65536)):
        answer += chunk
    return int(answer.split(b" ", 2)[1])


def pending_of(app: Starlette) -> PendingBudget:
    state: AppState = app.state.postcall
    return state.webhooks.pending


def wait_until_held(budget: PendingBudget, size: int) -> None:
    deadline = time.monotonic() + 30
    while budget.disk < size:
        assert time.monotonic() < deadline, f"the held body never reached the pending budget ({budget.disk})"
        time.sleep(0.01)


def stored_audio(engine: Engine, settings: Settings, conversation_id: str) -> bytes:
    with engine.connect() as conn:
        record = get_record(conn, conversation_id)
    assert record is not None and record["audio_path"], conversation_id
    return (settings.data_dir / str(record["audio_path"])).read_bytes()


def test_past_the_pending_budget_a_body_is_503_at_once_and_the_budget_comes_back(
    tight: tuple[str, Starlette, Settings], engine: Engine
) -> None:
    base_url, app, settings = tight
    budget = pending_of(app)
    held, held_audio = audio_body("conv_held", 1_800_000)  # 2.4 MB of body
    late, late_audio = audio_body("conv_late", 900_000)  # 1.2 MB
    with socket.create_connection(address(base_url), timeout=10) as first:
        first.sendall(head(held) + held[: 2 * MIB])  # all but the end: its signature cannot be checked yet
        wait_until_held(budget, 2 * MIB)  # what arrived, 1 MiB short of the budget

        # Declared: refused before a byte of the body is sent.
        with socket.create_connection(address(base_url), timeout=10) as second:
            second.sendall(head(late))
            assert status_of(second) == 503
        # Chunked: refused once what has arrived would pass the budget.
        chunked = httpx.post(
            base_url + URL, content=iter([late[:MIB], late[MIB:]]), headers=wh.signed_headers(late), timeout=30
        )
        assert chunked.status_code == 503
        assert chunked.json() == {"error": "too many webhook bodies in progress, try again later"}

        first.sendall(held[2 * MIB :])
        assert status_of(first) == 200

    assert (budget.disk, budget.memory) == (0, 0)  # every share was given back: the accepted, the refused
    answer = httpx.post(base_url + URL, content=late, headers=wh.signed_headers(late), timeout=30)
    assert answer.json() == {"status": "accepted", "conversation_id": "conv_late"}
    assert stored_audio(engine, settings, "conv_held") == held_audio
    assert stored_audio(engine, settings, "conv_late") == late_audio
    assert (budget.disk, budget.memory) == (0, 0)
    assert files_in(settings.data_dir / "tmp") == []


def test_a_body_holds_what_has_arrived_of_it_not_what_it_declares(
    tight: tuple[str, Starlette, Settings], engine: Engine
) -> None:
    base_url, app, settings = tight
    budget = pending_of(app)
    # Of the 3 MiB (3.1 MB) budget, a body that declared 2.4 MB holds the 1.1 MB it sent; 1.9 MB more fits.
    slow, slow_audio = audio_body("conv_slow", 1_800_000)
    other, other_audio = audio_body("conv_other", 1_400_000)
    with socket.create_connection(address(base_url), timeout=10) as first:
        first.sendall(head(slow) + slow[:1_100_000])
        wait_until_held(budget, 1_100_000)

        answer = httpx.post(base_url + URL, content=other, headers=wh.signed_headers(other), timeout=30)
        assert answer.json() == {"status": "accepted", "conversation_id": "conv_other"}

        first.sendall(slow[1_100_000:])
        assert status_of(first) == 200
    assert stored_audio(engine, settings, "conv_slow") == slow_audio
    assert stored_audio(engine, settings, "conv_other") == other_audio
    assert (budget.disk, budget.memory) == (0, 0)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_signed_large_audio_is_stored_byte_for_byte_and_its_temp_files_go(
    settings: Settings, engine: Engine, chunked: bool
) -> None:
    body, audio = audio_body("conv_large", 3 * MIB)
    content = iter([body[i : i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    with TestClient(create_app(settings, engine=engine)) as client:
        answer = client.post(URL, content=content, headers=wh.signed_headers(body))
    assert answer.json() == {"status": "accepted", "conversation_id": "conv_large"}
    assert stored_audio(engine, settings, "conv_large") == audio
    assert files_in(settings.data_dir / "tmp") == []


# --- reading a body, the budget exhausted ---------------------------------------------------------------------------


def read(body: bytes, budget: PendingBudget, blobs: BlobStore, piece: int = 65536) -> bytes | None:
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), piece):
            yield body[start : start + piece]

    header = parse_header(wh.signed_headers(body)["ElevenLabs-Signature"])
    reading = partial(read_body, max_bytes=64 * MIB, pending=budget)
    received = anyio.run(reading, chunks(), header, [wh.SECRET.encode()], blobs)
    received.discard()
    return received.raw


def test_a_small_body_goes_to_disk_when_the_memory_budget_is_spent_and_reads_the_same(tmp_path: Path) -> None:
    body = wh.encode(wh.transcription("conv_small", transcript_summary="x" * 200_000))
    budget = PendingBudget(disk_bytes=MIB, memory_bytes=0)  # not a byte may wait in memory
    assert read(body, budget, BlobStore(tmp_path)) == body
    assert (budget.disk, budget.memory) == (0, 0)
    assert files_in(tmp_path) == []


def test_a_body_past_a_spent_disk_budget_raises_pending_full_and_leaves_nothing(tmp_path: Path) -> None:
    body = wh.encode(wh.transcription("conv_small", transcript_summary="x" * 200_000))
    budget = PendingBudget(disk_bytes=100_000, memory_bytes=0)
    with pytest.raises(PendingFull):
        read(body, budget, BlobStore(tmp_path))
    assert (budget.disk, budget.memory) == (0, 0)
    assert files_in(tmp_path) == []


# --- the budget's bookkeeping ---------------------------------------------------------------------------------------

KINDS = st.sampled_from(["disk", "memory", "admit", "release"])
STEPS = st.lists(st.tuples(st.integers(0, 3), KINDS, st.integers(0, 2000)), max_size=60)


@given(steps=STEPS)
def test_holds_never_pass_the_budget_and_give_everything_back(steps: list[tuple[int, str, int]]) -> None:
    budget = PendingBudget(disk_bytes=3000, memory_bytes=1000)
    holds = [budget.hold() for _ in range(4)]
    for which, kind, size in steps:
        hold = holds[which]
        before = (hold.disk, hold.memory, budget.disk, budget.memory)
        if kind == "disk":
            try:
                hold.cover_disk(size)
            except PendingFull:
                assert before[2] + size - before[0] > 3000 and hold.disk == before[0]
            else:
                assert hold.disk == max(before[0], size)
        elif kind == "memory":
            if hold.try_memory(size):
                assert hold.memory == size
            else:
                assert before[3] + size - before[1] > 1000 and hold.memory == before[1]
        elif kind == "admit":
            try:
                hold.admit(size)
            except PendingFull:
                assert size - before[0] > 3000 - before[2]
            else:
                assert size - before[0] <= 3000 - before[2]
            assert (hold.disk, hold.memory, budget.disk, budget.memory) == before  # nothing reserved
        else:
            hold.release()
            assert (hold.disk, hold.memory) == (0, 0)
        assert budget.disk == sum(h.disk for h in holds) <= 3000
        assert budget.memory == sum(h.memory for h in holds) <= 1000
    for hold in holds:
        hold.release()
    assert (budget.disk, budget.memory) == (0, 0)
