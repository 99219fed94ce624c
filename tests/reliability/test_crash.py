"""`kill -9` of a real `postcall serve` under a load of signed webhooks: what was answered 200 survives the crash,
and nothing half-written is visible once it has restarted (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import Engine

from service.storage.audio import BlobStore
from tests.reliability.support import (
    Server,
    audio_mismatches,
    conversations_without_archived_event,
    records,
    server_env,
    serving,
    signed,
    temp_files,
    wait_for,
)
from tests.support import webhooks as wh
from tests.support.databases import migrated_sqlite
from tests.support.process import disk_bytes

CONVERSATIONS = 400
AUDIO_EVERY = 4  # every 4th conversation also gets its audio webhook
AUDIO_BYTES = 48 * 1024
CONCURRENCY = 16
KILL_AFTER = 150  # deliveries answered 200 before the kill
HELD_AUDIO_BYTES = 2 * 1024 * 1024
HELD_AFTER = 3 * 1024 * 1024 // 2  # bytes of base64 sent before it stops: past the 1 MiB kept in memory,
# so it waits for its signature check in an unnamed temp file in tmp/


@dataclass(frozen=True)
class Delivery:
    conversation_id: str
    kind: str  # "transcription" | "audio"
    body: bytes


@dataclass
class Tally:
    sent: list[Delivery] = field(default_factory=list)
    acknowledged: list[Delivery] = field(default_factory=list)
    unanswered: list[Delivery] = field(default_factory=list)
    other: list[tuple[Delivery, int]] = field(default_factory=list)


def mp3_bytes(conversation_id: str, size: int) -> bytes:
    seed = conversation_id.encode()
    return (b"\xff\xfb\x90\x64" + seed) * (size // (4 + len(seed))) + b"\x00" * (size % (4 + len(seed)))


def plan(run: str) -> list[Delivery]:
    deliveries = []
    for i in range(CONVERSATIONS):
        cid = f"conv_crash_{run}_{i:04d}"
        deliveries.append(Delivery(cid, "transcription", wh.encode(wh.transcription(cid))))
        if i % AUDIO_EVERY == 0:
            deliveries.append(Delivery(cid, "audio", wh.encode(wh.audio(cid, mp3_bytes(cid, AUDIO_BYTES)))))
    return deliveries


async def deliver_until_killed(server: Server, deliveries: list[Delivery]) -> Tally:
    """CONCURRENCY senders share the plan; once KILL_AFTER deliveries are acknowledged the server gets SIGKILL."""
    tally = Tally()
    pending = iter(deliveries)
    killed = asyncio.Event()

    async def sender(client: httpx.AsyncClient) -> None:
        for delivery in pending:
            if killed.is_set():
                return
            tally.sent.append(delivery)
            try:
                answer = await client.post(server.webhook_url, content=delivery.body, headers=signed(delivery.body))
            except httpx.TransportError:
                tally.unanswered.append(delivery)
                continue
            if answer.status_code != 200:
                tally.other.append((delivery, answer.status_code))
                continue
            tally.acknowledged.append(delivery)
            if len(tally.acknowledged) >= KILL_AFTER and not killed.is_set():
                os.kill(server.proc.pid, signal.SIGKILL)
                killed.set()

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(sender(client) for _ in range(CONCURRENCY)))
    return tally


def held_audio_pieces(conversation_id: str) -> list[bytes]:
    """A large audio body, in 64 KiB pieces."""
    encoded = base64.b64encode(mp3_bytes(conversation_id, HELD_AUDIO_BYTES))
    head = json.dumps({"type": "post_call_audio", "data": {"agent_id": "agent_1", "conversation_id": conversation_id}})
    pieces = [head[:-2].encode() + b', "full_audio": "']
    pieces += [encoded[start : start + 64 * 1024] for start in range(0, len(encoded), 64 * 1024)]
    return [*pieces, b'"}}']


async def held(pieces: list[bytes], release: asyncio.Event) -> AsyncIterator[bytes]:
    """The pieces, stopping once HELD_AFTER bytes are out until `release`: the temp file is mid-write meanwhile."""
    sent = 0
    for piece in pieces:
        yield piece
        sent += len(piece)
        if sent >= HELD_AFTER:
            await release.wait()


async def held_upload(server: Server, conversation_id: str, release: asyncio.Event) -> httpx.Response | None:
    """Post a held audio body; None when the server went away before answering."""
    pieces = held_audio_pieces(conversation_id)
    headers = signed(b"".join(pieces))
    async with httpx.AsyncClient(timeout=30) as client:
        try:
            return await client.post(server.webhook_url, content=held(pieces, release), headers=headers)
        except httpx.TransportError:
            return None


def holds_in_tmp(server: Server, data_dir: Path) -> bool:
    """Whether the server has something in tmp/, named or not (a body waiting for its check has no name)."""
    return disk_bytes(data_dir / "tmp", server.proc.pid) > 0


async def crash_under_load(server: Server, deliveries: list[Delivery], data_dir: Path, run: str) -> Tally:
    release = asyncio.Event()
    upload = asyncio.create_task(held_upload(server, f"conv_crash_{run}_held", release))
    await asyncio.to_thread(wait_for, lambda: holds_in_tmp(server, data_dir), "the held upload to reach tmp/")
    tally = await deliver_until_killed(server, deliveries)
    release.set()
    assert await upload is None
    return tally


def test_kill_9_under_load_loses_no_acknowledged_webhook_and_leaves_nothing_half_written(
    database_url: str, engine: Engine, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    data_dir, log = tmp_path / "data", tmp_path / "serve.log"
    env = server_env(database_url, data_dir)
    deliveries = plan(run)

    with serving(env, log, "--no-migrate") as server:
        tally = asyncio.run(crash_under_load(server, deliveries, data_dir, run))
        server.proc.wait(timeout=10)
    assert server.proc.returncode == -signal.SIGKILL
    assert tally.other == [], f"answers other than 200 before the kill: {tally.other[:5]}"
    assert tally.unanswered, "the kill came after the last answer: nothing was in flight"
    left_by_crash = temp_files(data_dir)
    # The held upload had no name to leave behind; what may remain are the temp files of audio being stored.
    assert [name for name in left_by_crash if (data_dir / "tmp" / name).stat().st_size >= HELD_AFTER] == []

    with serving(env, log, "--no-migrate") as restarted:
        stored = records(engine)
        report(engine.dialect.name, tally, stored, left_by_crash)
        assert_acknowledged_are_stored(tally.acknowledged, stored, data_dir)
        assert conversations_without_archived_event(engine) == []
        assert audio_mismatches(stored, data_dir) == []
        assert temp_files(data_dir) == []
        assert_unanswered_can_be_delivered_again(restarted, tally.unanswered)

    assert {d.conversation_id for d in tally.sent} <= set(records(engine))


def report(dialect: str, tally: Tally, stored: dict[str, dict[str, Any]], left_by_crash: list[str]) -> None:
    acknowledged = {d.conversation_id for d in tally.acknowledged}
    unanswered = {d.conversation_id for d in tally.unanswered} - acknowledged
    print(
        f"\n{dialect}: sent {len(tally.sent)} deliveries (+1 held audio), answered 200 {len(tally.acknowledged)} "
        f"({len(acknowledged)} conversations), unanswered {len(tally.unanswered)}; after restart "
        f"{len(acknowledged & set(stored))}/{len(acknowledged)} acknowledged conversations stored, and "
        f"{len(unanswered & set(stored))}/{len(unanswered)} of the unanswered ones; left in tmp/ by the kill: "
        f"{', '.join(sorted(Path(name).suffix for name in left_by_crash))}"
    )


def assert_acknowledged_are_stored(
    acknowledged: list[Delivery], stored: dict[str, dict[str, Any]], data_dir: Path
) -> None:
    missing = [d for d in acknowledged if d.conversation_id not in stored]
    assert missing == [], f"{len(missing)} acknowledged conversations lost, e.g. {missing[0].conversation_id}"
    for delivery in acknowledged:
        record = stored[delivery.conversation_id]
        if delivery.kind == "audio":
            assert record["audio_stored"], delivery.conversation_id
            audio = (data_dir / record["audio_path"]).read_bytes()
            assert audio == mp3_bytes(delivery.conversation_id, AUDIO_BYTES), delivery.conversation_id
        else:
            sent = json.loads(delivery.body)["data"]
            assert (record["status"], record["transcript"]) == ("done", sent["transcript"]), delivery.conversation_id


def assert_unanswered_can_be_delivered_again(server: Server, unanswered: list[Delivery]) -> None:
    """What ElevenLabs (or the reconciler) would do for a delivery that got no answer: it is taken now, as new or,
    when its commit had happened just before the kill, as a duplicate."""
    with httpx.Client(timeout=30) as client:
        for delivery in unanswered:
            answer = client.post(server.webhook_url, content=delivery.body, headers=signed(delivery.body))
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] in ("accepted", "duplicate")


def test_a_starting_replica_leaves_the_upload_another_one_is_writing_alone(tmp_path: Path) -> None:
    """Start-up removes every temp file no live process holds, whatever its age: one that a replica sharing the
    data dir is writing right now stays, and its delivery completes."""
    env = server_env(migrated_sqlite(str(tmp_path / "postcall.db")), tmp_path / "data")
    log = tmp_path / "serve.log"

    async def upload_across_a_start(writer: Server) -> httpx.Response | None:
        release = asyncio.Event()
        upload = asyncio.create_task(held_upload(writer, "conv_shared_dir", release))
        await asyncio.to_thread(wait_for, lambda: holds_in_tmp(writer, writer_dir), "the upload to reach tmp/")
        # Audio that a process sharing the data dir is writing (locked), and a file a crashed one left (unlocked).
        being_written = BlobStore(writer_dir).open_temp()
        (writer_dir / "tmp" / "left-by-a-crash.part").write_bytes(b"half an mp3")
        await asyncio.to_thread(start_and_stop_another_replica)
        assert temp_files(writer_dir) == [being_written.path.name]
        being_written.discard()
        release.set()
        return await upload

    def start_and_stop_another_replica() -> None:
        with serving(env, log, "--no-migrate"):
            pass  # its lifespan has run, clean-up included, once it answers /healthz

    writer_dir = tmp_path / "data"
    with serving(env, log, "--no-migrate") as writer:
        answer = asyncio.run(upload_across_a_start(writer))

    assert answer is not None and answer.status_code == 200, answer
    assert answer.json()["status"] == "accepted"
    assert (writer_dir / "audio" / "conv_shared_dir.mp3").stat().st_size == HELD_AUDIO_BYTES
    assert temp_files(writer_dir) == []
