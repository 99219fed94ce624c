"""An audio webhook when the data dir cannot take the file: 503 (the reconciler fills the gap), no partial file, no
record that claims audio it does not have; once there is room again the same delivery is stored.

The data dir is a small tmpfs mounted for the test (we run as root, in CI too), so the failures are the kernel's
own: ENOSPC when it is full (before the audio, or right after it, when the claim kept while it is renamed into place
finds no room), EROFS when it is remounted read-only. Where mounting is not allowed the test is skipped, saying so.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from service.config import Settings
from service.web.app import create_app
from tests.reliability.support import audio_files, records, signed, temp_files
from tests.support import webhooks as wh
from tests.support.live import live_server

TMPFS_SIZE = "4m"
ANSWER_BOUND_SECONDS = 5.0
# Three ways an audio body reaches the disk: held in the file's write buffer until the fsync, decoded from a small
# body in one write, and decoded piece by piece while a large (chunked) body streams in.
AUDIO_SIZES = {"buffered": 2 * 1024, "inline": 256 * 1024, "streamed": 1536 * 1024}


def mount_tmpfs(path: Path, *options: str) -> None:
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")


@pytest.fixture
def small_data_dir(settings: Settings) -> Iterator[Path]:
    """The app's data dir, on a tmpfs of TMPFS_SIZE that the test can fill or make read-only."""
    path = settings.data_dir
    path.mkdir(parents=True)
    mount_tmpfs(path, f"size={TMPFS_SIZE}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path: Path, leave: int = 0) -> Callable[[], None]:
    """Write a ballast file until only `leave` bytes are free; returns how to make room again."""
    stat = os.statvfs(path)
    room = stat.f_bavail * stat.f_frsize - leave
    ballast = path / "ballast"
    with ballast.open("wb") as file:
        try:
            while room > 0:
                room -= file.write(b"\0" * min(room, 65536))
                file.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC and leave == 0
    return ballast.unlink


def make_read_only(path: Path) -> Callable[[], None]:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    return lambda: subprocess.run(["mount", "-o", "remount,rw", str(path)], check=True)


# Each makes the data dir unable to take an audio file of the given size; each returns how to undo it.
FAULTS: dict[str, Callable[[Path, int], Callable[[], None]]] = {
    "full": lambda path, size: fill(path),
    # The audio itself fits; what must be written next to it (the claim kept while it is put in place) does not.
    "room-for-the-audio-only": lambda path, size: fill(path, leave=size),
    "read-only": lambda path, size: make_read_only(path),
}


def mp3(size: int) -> bytes:
    return bytes(range(256)) * (size // 256)


def post(url: str, body: bytes) -> tuple[httpx.Response, float]:
    """Post in 64 KiB pieces (chunked, as ElevenLabs sends audio); the answer and how long it took."""
    pieces = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    started = time.monotonic()
    answer = httpx.post(url, content=iter(pieces), headers=signed(body), timeout=30)
    return answer, time.monotonic() - started


def archived_audio_events(engine: Engine) -> int:
    with engine.connect() as conn:
        query = sa.text("SELECT count(*) FROM webhook_event WHERE event_type = 'post_call_audio'")
        return int(conn.execute(query).scalar_one())


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("audio", AUDIO_SIZES)
def test_audio_the_data_dir_cannot_take_is_refused_with_503_and_stored_once_it_can(
    settings: Settings, engine: Engine, small_data_dir: Path, fault: str, audio: str
) -> None:
    cid = f"conv_disk_{audio}_{fault}"
    body = wh.encode(wh.audio(cid, mp3(AUDIO_SIZES[audio])))
    with live_server(create_app(settings, engine=engine)) as base_url:
        url = f"{base_url}/webhooks/elevenlabs"
        transcription = wh.encode(wh.transcription(cid))
        assert httpx.post(url, content=transcription, headers=signed(transcription)).status_code == 200

        restore = FAULTS[fault](small_data_dir, AUDIO_SIZES[audio])
        refused, took = post(url, body)
        print(f"\n{engine.dialect.name} {audio} audio, data dir {fault}: {refused.status_code} in {took:.3f} s")
        assert refused.status_code == 503, refused.text
        assert took < ANSWER_BOUND_SECONDS
        assert_nothing_of_the_audio_is_stored(engine, small_data_dir, cid)

        restore()
        stored, _ = post(url, body)
        assert stored.status_code == 200, stored.text
        assert stored.json()["status"] == "accepted"

    record = records(engine)[cid]
    assert record["audio_stored"] and record["audio_bytes"] == AUDIO_SIZES[audio]
    assert (small_data_dir / record["audio_path"]).read_bytes() == mp3(AUDIO_SIZES[audio])
    assert temp_files(small_data_dir) == []


def assert_nothing_of_the_audio_is_stored(engine: Engine, data_dir: Path, conversation_id: str) -> None:
    record = records(engine)[conversation_id]
    assert (record["audio_stored"], record["audio_path"], record["audio_received_at"]) == (False, None, None)
    assert archived_audio_events(engine) == 0  # so the same delivery again is new, not a duplicate
    assert audio_files(data_dir) == {}
    assert temp_files(data_dir) == []
