"""What the reliability tests share: a `postcall serve` child that can be killed, signed deliveries, and checks
that read the stored state straight from the database and the data dir."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from service.config import Settings
from service.record.store import conversations
from service.webhook.signature import sign
from tests.support.process import serve_process
from tests.support.webhooks import SECRET


@dataclass
class Server:
    """A running `python -m service serve`; `proc.pid` is the server itself (no wrapper process)."""

    url: str
    proc: subprocess.Popen[bytes]

    @property
    def webhook_url(self) -> str:
        return f"{self.url}/webhooks/elevenlabs"


def settings_with_api_key(database_url: str, data_dir: Path, api_key: str) -> Settings:
    """Settings for running `postcall reconcile` (and the app) against the fake platform."""
    return Settings(
        database_url=database_url,
        webhook_secrets=SECRET,
        data_dir=data_dir,
        elevenlabs_api_key=api_key,
        _env_file=None,  # type: ignore[call-arg]
    )


def server_env(database_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "POSTCALL_DATABASE_URL": database_url,
        "POSTCALL_WEBHOOK_SECRETS": SECRET,
        "POSTCALL_DATA_DIR": str(data_dir),
        **extra,
    }


def wait_until_ready(server: Server, timeout: float = 30) -> None:
    """Until /healthz answers: the lifespan (and its start-up clean-up) has run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError("server did not become healthy")


@contextmanager
def serving(env: Mapping[str, str], log: Path, *args: str) -> Iterator[Server]:
    """`python -m service serve` on a free port, its logs appended to `log`, once healthy; stopped (or reaped) after."""
    with serve_process(env, *args, log=log) as (url, proc):
        server = Server(url, proc)
        wait_until_ready(server)
        yield server


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds (a bound, not a measurement)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def signed(body: bytes) -> dict[str, str]:
    """Headers for `body`, signed now (a retry of the same body is signed anew, as ElevenLabs would)."""
    return {"ElevenLabs-Signature": sign(body, SECRET.encode(), int(time.time())), "Content-Type": "application/json"}


def records(engine: Engine) -> dict[str, dict[str, Any]]:
    """Every stored conversation, as its columns (JSON decoded), by id."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(conversations)).mappings()
        return {row["conversation_id"]: dict(row) for row in rows}


def conversations_without_archived_event(engine: Engine) -> list[str]:
    query = sa.text(
        "SELECT c.conversation_id FROM conversation c WHERE NOT EXISTS "
        "(SELECT 1 FROM webhook_event e WHERE e.conversation_id = c.conversation_id)"
    )
    with engine.connect() as conn:
        return [row[0] for row in conn.execute(query)]


def audio_files(data_dir: Path) -> dict[str, int]:
    """Every stored audio file, by its path relative to the data dir, with its size."""
    audio = data_dir / "audio"
    if not audio.is_dir():
        return {}
    return {path.relative_to(data_dir).as_posix(): path.stat().st_size for path in audio.rglob("*") if path.is_file()}


def temp_files(data_dir: Path) -> list[str]:
    temp = data_dir / "tmp"
    return sorted(path.name for path in temp.iterdir()) if temp.is_dir() else []


def audio_mismatches(stored: Mapping[str, Mapping[str, Any]], data_dir: Path) -> list[str]:
    """Audio files that no record claims, and records that claim audio that is not on disk (at its size)."""
    files = audio_files(data_dir)
    claimed = {r["audio_path"]: r for r in stored.values() if r["audio_stored"]}
    problems = [f"{path}: no record claims it" for path in files if path not in claimed]
    for path, record in claimed.items():
        if files.get(path) != record["audio_bytes"]:
            cid, size = record["conversation_id"], record["audio_bytes"]
            problems.append(f"{cid} claims {path} ({size} bytes), on disk: {files.get(path)}")
    return problems
