"""Retention (`postcall purge`) on a seeded database, on SQLite and PostgreSQL, with real audio files on disk."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Connection, Engine
from typer.testing import CliRunner, Result

from service.cli import app
from service.config import Settings
from service.record import payloads, store
from service.record.merge import Audio, Observation, Source
from service.record.purge import Cutoff, PurgeReport, count, purge
from service.storage.audio import BlobStore
from service.storage.db import transaction
from service.web.app import create_app
from tests.support import records
from tests.support import webhooks as wh
from tests.support.live import live_server

DAY = 86400
NOW = int(time.time())
CUTOFF = Cutoff(NOW - 90 * DAY)

OLD = {"conv_old_a": 100, "conv_old_b": 95, "conv_old_c": 91}  # conversation -> days since its call started
NEW = {"conv_new_a": 89, "conv_new_b": 10, "conv_new_c": 0}
OLD_WITH_AUDIO = ("conv_old_a", "conv_old_c")
NEW_WITH_AUDIO = ("conv_new_a", "conv_new_b")
# No start time (a broker session whose call never reported back): aged by when postcall first saw it.
UNSTARTED_OLD, UNSTARTED_NEW = "conv_session_old", "conv_session_new"
AT = datetime.fromtimestamp(NOW, UTC)
AUDIO = Source.AUDIO_WEBHOOK


def at_days_ago(days: int) -> datetime:
    return datetime.fromtimestamp(NOW - days * DAY, UTC)


def unstarted(conversation_id: str, days_ago: int) -> Observation:
    return Observation(conversation_id, Source.SESSION, at_days_ago(days_ago), "initiated", {"agent_id": "agent_1"})


def archive_delivery(conn: Connection, conversation_id: str | None, body: bytes) -> None:
    delivery = store.Delivery(
        body_sha256=hashlib.sha256(body).hexdigest(),
        event_type="post_call_transcription" if conversation_id else "some_future_event",
        conversation_id=conversation_id,
        received_at=at_days_ago(1),
        body_bytes=len(body),
        body=body,
    )
    store.archive(conn, delivery)


def seed(engine: Engine, data_dir: Path) -> None:
    observations = [
        records.detail(cid, start=NOW - days * DAY, at=at_days_ago(days)) for cid, days in {**OLD, **NEW}.items()
    ]
    observations += [records.audio(cid, data_dir, f"mp3 of {cid}".encode()) for cid in OLD_WITH_AUDIO + NEW_WITH_AUDIO]
    observations += [unstarted(UNSTARTED_OLD, 120), unstarted(UNSTARTED_NEW, 1)]
    records.store(engine, observations)

    def archive_all(conn: Connection) -> None:
        for cid in [*OLD, *NEW]:
            archive_delivery(conn, cid, f'{{"conversation_id": "{cid}"}}'.encode())
        archive_delivery(conn, None, b'{"type": "some_future_event"}')

    transaction(engine, archive_all)
    # A file no record points at (another tool's, or left by a crash) is not purge's business.
    (data_dir / "audio" / "unrelated.mp3").write_bytes(b"keep me")


def conversation_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return {row[0] for row in conn.exec_driver_sql("SELECT conversation_id FROM conversation")}


def archived_for(engine: Engine) -> list[str | None]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT conversation_id FROM webhook_event").all()
    return sorted((row[0] for row in rows), key=str)


def audio_files(data_dir: Path) -> set[str]:
    return {path.name for path in (data_dir / "audio").rglob("*") if path.is_file()}


def record(engine: Engine, conversation_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        found = records.get_record(conn, conversation_id)
    assert found is not None
    return found


@pytest.fixture
def data_dir(engine: Engine, tmp_path: Path) -> Path:
    path = tmp_path / "data"
    seed(engine, path)
    return path


def test_purge_removes_exactly_the_old_records_their_audio_and_their_archived_events(
    engine: Engine, data_dir: Path
) -> None:
    report = purge(engine, BlobStore(data_dir), CUTOFF, batch_size=2)  # several batches

    assert conversation_ids(engine) == {*NEW, UNSTARTED_NEW}
    assert audio_files(data_dir) == {f"{cid}.mp3" for cid in NEW_WITH_AUDIO} | {"unrelated.mp3"}
    assert archived_for(engine) == sorted([*NEW, None], key=str)
    assert report == PurgeReport(
        conversations=len(OLD) + 1,
        audio_files=2,
        audio_bytes=sum(len(f"mp3 of {cid}") for cid in OLD_WITH_AUDIO),
        webhook_events=len(OLD),
    )


def test_a_second_purge_finds_nothing_more(engine: Engine, data_dir: Path) -> None:
    purge(engine, BlobStore(data_dir), CUTOFF)

    assert purge(engine, BlobStore(data_dir), CUTOFF) == PurgeReport()


def test_audio_only_removes_old_audio_and_keeps_every_record(engine: Engine, data_dir: Path) -> None:
    before = archived_for(engine)

    report = purge(engine, BlobStore(data_dir), CUTOFF, audio_only=True)

    assert conversation_ids(engine) == {*OLD, *NEW, UNSTARTED_OLD, UNSTARTED_NEW}
    assert audio_files(data_dir) == {f"{cid}.mp3" for cid in NEW_WITH_AUDIO} | {"unrelated.mp3"}
    for cid in OLD_WITH_AUDIO:
        old = record(engine, cid)
        assert (old["audio_stored"], old["audio_path"], old["audio_bytes"]) == (False, None, None)
        assert old["transcript"] and old["audio_received_at"] is not None  # the rest of the record stays
    for cid in NEW_WITH_AUDIO:
        assert record(engine, cid)["audio_stored"] is True
    assert archived_for(engine) == before
    assert (report.conversations, report.audio_files, report.webhook_events) == (2, 2, 0)


def test_dry_run_counts_what_purge_then_removes_and_changes_nothing(engine: Engine, data_dir: Path) -> None:
    ids, files, archived = conversation_ids(engine), audio_files(data_dir), archived_for(engine)

    counted = count(engine, CUTOFF)
    counted_audio = count(engine, CUTOFF, audio_only=True)

    assert (conversation_ids(engine), audio_files(data_dir), archived_for(engine)) == (ids, files, archived)
    assert asdict(counted_audio) == {**asdict(counted), "conversations": 2, "webhook_events": 0}
    assert counted == purge(engine, BlobStore(data_dir), CUTOFF)


def test_an_audio_file_already_gone_does_not_stop_the_purge(engine: Engine, data_dir: Path) -> None:
    (data_dir / "audio" / "conv_old_a.mp3").unlink()

    report = purge(engine, BlobStore(data_dir), CUTOFF)

    assert conversation_ids(engine) == {*NEW, UNSTARTED_NEW}
    assert (report.audio_files, report.missing_files) == (2, 1)


def cli(settings: Settings, *args: str) -> Result:
    env = {"POSTCALL_DATABASE_URL": settings.database_url, "POSTCALL_DATA_DIR": str(settings.data_dir)}
    return CliRunner().invoke(app, ["purge", *args], env=env)


def test_the_command_purges_and_says_what_it_removed(engine: Engine, settings: Settings) -> None:
    seed(engine, settings.data_dir)

    dry = cli(settings, "--older-than", "90d", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.startswith("would purge 4 conversations that started before ")
    assert conversation_ids(engine) >= set(OLD)

    done = cli(settings, "--older-than", "90d")
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith("purged 4 conversations that started before ")
    assert "(older than 90d), with 2 audio files" in done.stdout
    assert "and 3 archived webhook events" in done.stdout
    assert conversation_ids(engine) == {*NEW, UNSTARTED_NEW}


@pytest.mark.parametrize("value", ["90", "90 days", "ninety", "-5d", "0d", "999999d"])
def test_a_malformed_or_empty_age_is_a_usage_error(value: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["purge", "--older-than", value], env={"POSTCALL_DATABASE_URL": f"sqlite:///{tmp_path}/never.db"}
    )

    assert result.exit_code == 2
    assert "--older-than" in result.stderr
    assert not (tmp_path / "never.db").exists()


def test_an_age_reaching_back_past_the_year_1_is_a_usage_error_that_changes_nothing(
    engine: Engine, settings: Settings
) -> None:
    seed(engine, settings.data_dir)
    before = conversation_ids(engine), audio_files(settings.data_dir)

    for args in (["--older-than", "999999d"], ["--older-than", "999999d", "--dry-run"]):
        result = cli(settings, *args)
        assert result.exit_code == 2, result.output
        assert result.stderr == "postcall: --older-than 999999d: reaches back past the year 1; give a shorter age\n"
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert (conversation_ids(engine), audio_files(settings.data_dir)) == before


# --- audio stored again while the purge runs (issue 18, item 2) ---------------------------------------------------

AUTH = {"Authorization": "Bearer test-token"}
NEW_MP3 = b"ID3 audio stored after the purge committed"


def test_audio_stored_between_the_purges_commit_and_its_unlink_is_kept(engine: Engine, settings: Settings) -> None:
    seed(engine, settings.data_dir)
    raced: list[str] = []

    with live_server(create_app(settings, engine=engine)) as base_url, httpx.Client(base_url=base_url) as client:

        def audio_webhook_meanwhile(ids: Sequence[str]) -> None:
            if "conv_old_a" in ids:  # its record is committed away; its file is still there
                body = wh.encode(wh.audio("conv_old_a", NEW_MP3))
                answer = client.post("/webhooks/elevenlabs", content=body, headers=wh.signed_headers(body))
                assert answer.json() == {"status": "accepted", "conversation_id": "conv_old_a"}
                raced.append("conv_old_a")

        report = purge(engine, BlobStore(settings.data_dir), CUTOFF, batch_size=2, on_committed=audio_webhook_meanwhile)
        audio = client.get("/v1/conversations/conv_old_a/audio", headers=AUTH)

    assert raced == ["conv_old_a"]
    assert audio.status_code == 200, audio.text
    assert audio.content == NEW_MP3
    assert record(engine, "conv_old_a")["audio_stored"] is True
    assert audio_files(settings.data_dir) == {
        "conv_old_a.mp3",
        *(f"{cid}.mp3" for cid in NEW_WITH_AUDIO),
        "unrelated.mp3",
    }
    assert (report.audio_files, report.kept_files, report.missing_files) == (2, 1, 0)


def _wait_for_a_flock_waiter(lock_file: Path) -> None:
    """Until some process waits for the flock of `lock_file` (Linux lists waiters in /proc/locks with `->`)."""
    inode = f":{lock_file.stat().st_ino} "
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any("->" in line and inode in line for line in Path("/proc/locks").read_text().splitlines()):
            return
        time.sleep(0.01)


def test_audio_whose_transaction_is_in_flight_while_the_purge_unlinks_is_kept(
    engine: Engine, settings: Settings
) -> None:
    # The writer has renamed its file into place and recorded it, but not committed, when the purge comes to
    # remove that path: the purge must wait for the writer's outcome, then keep what the writer's record claims.
    seed(engine, settings.data_dir)
    blobs = BlobStore(settings.data_dir)
    renamed, release = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def write_audio() -> None:
        blob = blobs.open_temp()

        def work(conn: Connection) -> None:
            blob.write(NEW_MP3)
            relpath = blob.commit("conv_old_a")
            observation = payloads.audio_observation("conv_old_a", None, Audio(relpath, len(NEW_MP3)), AUDIO, AT)
            store.apply(conn, observation, AT)
            renamed.set()
            release.wait()

        try:
            transaction(engine, work)
        except BaseException as exc:
            failures.append(exc)
            renamed.set()
        finally:
            blob.discard()

    threads: list[threading.Thread] = []

    def writer_in_flight(ids: Sequence[str]) -> None:
        if "conv_old_a" not in ids:
            return
        threads.append(threading.Thread(target=write_audio))
        threads[-1].start()
        renamed.wait()
        lock_file = blobs.path_lock_file("audio/conv_old_a.mp3")
        # PostgreSQL: let the writer commit once the purge waits for the path's lock (or, were nothing guarding
        # it, after a while). SQLite: at once; the purge's unlink waits for the writer's database write lock.
        postgres = engine.dialect.name == "postgresql"
        wait = (lambda: _wait_for_a_flock_waiter(lock_file)) if postgres else (lambda: None)
        threads.append(threading.Thread(target=lambda: (wait(), release.set())))
        threads[-1].start()

    report = purge(engine, blobs, CUTOFF, batch_size=2, on_committed=writer_in_flight)
    for thread in threads:
        thread.join()

    assert failures == []
    assert record(engine, "conv_old_a")["audio_stored"] is True
    assert (settings.data_dir / "audio" / "conv_old_a.mp3").read_bytes() == NEW_MP3
    assert report.kept_files == 1
