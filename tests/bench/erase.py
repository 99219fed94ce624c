"""Erase benchmark: `postcall erase --user-id` of 10,000 conversations on PostgreSQL, and the webhook receiver's
latency while it runs.

    uv run python -m tests.bench.erase [--conversations 10000] [--others 90000] [--rate 50] [--baseline 5]

A throw-away database on POSTCALL_TEST_PG_URL's server (default postgres@127.0.0.1:5432), migrated to head, then
loaded with COPY (not through record.store: a benchmark needs its rows in seconds; their shape is what record.store
stores): the user's conversations, each with a transcript and one archived transcription webhook body, 30% of them
with a 16 KiB audio file on disk; and `--others` conversations of other users around them. A real `postcall serve`
child process then receives a steady stream of signed transcription webhooks (`--rate` per second, open loop: each
is sent at its scheduled time whatever the previous ones are doing, so a stall shows as latency, not as fewer
requests), first alone (`--baseline` seconds), then while `postcall erase --user-id` runs as a child process of its
own. Printed: the erase's wall time (and that of an erase that finds nothing, the command's fixed cost), and the
webhook latencies (p50, p99, max) before and during the erase.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from service.storage.audio import audio_relpath
from service.storage.db import create_engine
from service.webhook.signature import sign
from tests.support.databases import postgres_database
from tests.support.process import ROOT, serve_process

SECRET = "bench-secret"
USER = "user-to-erase"
AUDIO_BYTES = 16 * 1024
AUDIO_SHARE = 0.3
CONVERSATION_COLUMNS = (
    "conversation_id",
    "agent_id",
    "status",
    "user_id",
    "start_time_unix_secs",
    "call_duration_secs",
    "transcript_summary",
    "transcript",
    "audio_stored",
    "audio_path",
    "audio_bytes",
    "first_seen_via",
    "first_seen_at",
    "webhook_received_at",
    "complete",
    "data_rank",
    "revision",
    "updated_at",
)
EVENT_COLUMNS = ("body_sha256", "event_type", "conversation_id", "received_at", "body_bytes", "body")


def transcript(n: int) -> list[dict[str, Any]]:
    return [
        {
            "role": "agent" if t % 2 else "user",
            "message": f"turn {t} of call {n}: " + "words " * 15,
            "time_in_call_secs": t,
        }
        for t in range(20)
    ]


def transcription_event(conversation_id: str, user_id: str, n: int) -> bytes:
    data = {
        "agent_id": "agent_bench",
        "conversation_id": conversation_id,
        "status": "done",
        "user_id": user_id,
        "transcript": transcript(n),
        "metadata": {"start_time_unix_secs": 1_760_000_000 + n, "call_duration_secs": 42},
        "analysis": {"call_successful": "success", "transcript_summary": "A benchmark call."},
    }
    return json.dumps({"type": "post_call_transcription", "event_timestamp": int(time.time()), "data": data}).encode()


def load(url: str, data_dir: Path, erased: int, others: int) -> None:
    """COPY the user's conversations (with an archived body each, and audio for some) and everyone else's."""
    events: list[tuple[Any, ...]] = []
    engine = create_engine(url)
    rng = random.Random(17)
    at = datetime(2026, 1, 1, tzinfo=UTC).isoformat()
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("SET statement_timeout = 0")
        columns = ", ".join(CONVERSATION_COLUMNS)
        with cursor.copy(f"COPY conversation ({columns}) FROM STDIN") as copy:
            for n in range(erased + others):
                cid = f"conv_{uuid.UUID(int=rng.getrandbits(128)).hex[:26]}"
                mine = n < erased
                relpath = None
                if mine and rng.random() < AUDIO_SHARE:
                    relpath = audio_relpath(cid)
                    path = data_dir / relpath
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"ID3" + rng.randbytes(AUDIO_BYTES - 3))
                row = (
                    cid,
                    "agent_bench",
                    "done",
                    USER if mine else f"user_{rng.randrange(100_000)}",
                    1_750_000_000 + n,
                    "42",
                    "A benchmark call.",
                    json.dumps(transcript(n)),
                    relpath is not None,
                    relpath,
                    AUDIO_BYTES if relpath else None,
                    "webhook",
                    at,
                    at,
                    True,
                    35,
                    1,
                    at,
                )
                copy.write_row(row)
                if mine:
                    body = transcription_event(cid, USER, n)
                    events.append(
                        (hashlib.sha256(body).hexdigest(), "post_call_transcription", cid, at, len(body), body)
                    )
        with cursor.copy(f"COPY webhook_event ({', '.join(EVENT_COLUMNS)}) FROM STDIN") as copy:
            for event in events:
                copy.write_row(event)
        raw.commit()
        cursor.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
        engine.dispose()


async def stream(base_url: str, rate: float, stop: asyncio.Event, latencies: list[tuple[float, float, int]]) -> None:
    """Post a new signed transcription every 1/rate s until `stop`; record (sent at, seconds, status) of each."""
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:
        tasks: set[asyncio.Task[None]] = set()

        async def send(n: int) -> None:
            body = transcription_event(f"conv_live_{n:08d}", f"user_live_{n % 97}", n)
            headers = {"ElevenLabs-Signature": sign(body, SECRET.encode(), int(time.time()))}
            started = time.perf_counter()
            answer = await client.post("/webhooks/elevenlabs", content=body, headers=headers)
            latencies.append((started, time.perf_counter() - started, answer.status_code))

        start = time.perf_counter()
        n = 0
        while not stop.is_set():
            await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
            task = asyncio.create_task(send(n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        await asyncio.gather(*tasks)


def summary(samples: list[tuple[float, float, int]]) -> str:
    seconds = sorted(s for _, s, _ in samples)
    if not seconds:
        return "no requests"
    p99 = seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))]
    bad = sum(1 for _, _, status in samples if status != 200)
    return (
        f"{len(seconds):5d} webhooks   p50 {statistics.median(seconds) * 1000:6.1f} ms   p99 {p99 * 1000:6.1f} ms   "
        f"max {seconds[-1] * 1000:6.1f} ms   non-200 {bad}"
    )


def erase_command(env: dict[str, str], user_id: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "service", "erase", "--user-id", user_id],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return time.perf_counter() - started, done.stdout.strip()


async def measure(base_url: str, env: dict[str, str], rate: float, baseline: float) -> None:
    latencies: list[tuple[float, float, int]] = []
    stop = asyncio.Event()
    streaming = asyncio.create_task(stream(base_url, rate, stop, latencies))
    await asyncio.sleep(baseline)
    erase_started = time.perf_counter()
    seconds, said = await asyncio.to_thread(erase_command, env, USER)
    erase_ended = time.perf_counter()
    await asyncio.sleep(1)
    stop.set()
    await streaming
    # The first second warms the server (connections, caches) and is left out.
    before = [sample for sample in latencies if latencies[0][0] + 1 <= sample[0] < erase_started]
    during = [sample for sample in latencies if erase_started <= sample[0] < erase_ended]
    empty, _ = await asyncio.to_thread(erase_command, env, "nobody-at-all")
    print(f"postcall erase --user-id: {seconds:.2f} s wall ({said.splitlines()[0]})")
    print(f"  the same command finding nothing: {empty:.2f} s (start-up and migration check)")
    print(f"webhooks at {rate:g}/s before the erase: {summary(before)}")
    print(f"webhooks at {rate:g}/s during the erase: {summary(during)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=10_000, help="of the user to erase")
    parser.add_argument("--others", type=int, default=90_000, help="of other users, around them")
    parser.add_argument("--rate", type=float, default=50.0, help="webhooks per second")
    parser.add_argument("--baseline", type=float, default=5.0, help="seconds of webhooks before the erase")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="postcall-erase-bench-") as tmp, postgres_database() as url:
        data_dir = Path(tmp) / "data"
        started = time.perf_counter()
        load(url, data_dir, args.conversations, args.others)
        print(
            f"loaded {args.conversations:,} conversations of one user (+{args.others:,} others) "
            f"in {time.perf_counter() - started:.1f} s"
        )
        env = {
            "POSTCALL_DATABASE_URL": url,
            "POSTCALL_WEBHOOK_SECRETS": SECRET,
            "POSTCALL_DATA_DIR": str(data_dir),
        }
        with serve_process(env, "--no-migrate") as (base_url, _):
            asyncio.run(measure(base_url, env, args.rate, args.baseline))
        engine = create_engine(url)
        with engine.connect() as conn:
            left = conn.execute(sa.text("SELECT count(*) FROM conversation WHERE user_id = :u"), {"u": USER}).scalar()
        engine.dispose()
        files = sum(1 for _ in (data_dir / "audio").glob("*.mp3"))
        print(f"left afterwards: {left} conversations of the user, {files} audio files")


if __name__ == "__main__":
    main()
