"""The database goes away under a running `postcall serve` and comes back: webhooks meanwhile get 503 at once (never
a hang, never a 500), /readyz says 503, the process stays up; afterwards webhooks succeed again and one reconcile
run stores what was refused, so no conversation is lost end to end (SQLite and PostgreSQL)."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from service.storage.db import is_sqlite
from service.testing import FakeConversation, FakePlatform, seed_conversations
from tests.reliability.support import (
    Server,
    audio_mismatches,
    records,
    server_env,
    serving,
    settings_with_api_key,
    signed,
)
from tests.support.reconcile import reconcile
from tests.support.tcp_proxy import TcpProxy

KEY = "outage-key"
NOW = int(time.time())
CONVERSATIONS_PER_PHASE = 8
ANSWER_BOUND_SECONDS = 5.0  # "at once": far below ElevenLabs' own timeout, with room for a busy machine


@dataclass
class Outage:
    database_url: str  # what the server is pointed at
    cut: Callable[[], None]
    restore: Callable[[], None]


def chattr(flag: str, paths: list[Path]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True)


@contextmanager
def sqlite_outage(url: str) -> Iterator[Outage]:
    """The database and its WAL become immutable (chattr +i): the kernel then refuses every write to them with
    EPERM, to root too and through descriptors opened before, as a disk remounted read-only after an error would.

    Simpler means do not work here: root ignores file permissions, and a database file (or directory) moved away
    is no outage for the server's pooled connections, which keep reading and writing the moved file through their
    open descriptors (tried). The -shm file is left alone: it is memory-mapped, and a write to an immutable
    mapping kills the process with SIGBUS.
    """
    database = Path(sa.make_url(url).database or "")
    files = [database, database.with_name(database.name + "-wal")]
    if chattr("-i", [database]).returncode != 0:
        pytest.skip(f"the file system under {database} has no immutable flag (chattr)")

    def cut() -> None:
        assert files[1].exists(), "the server holds the database open, so its WAL exists"
        assert chattr("+i", files).returncode == 0

    try:
        yield Outage(url, cut, lambda: chattr("-i", files).check_returncode())
    finally:
        chattr("-i", [path for path in files if path.exists()])  # or pytest could not remove tmp_path


@contextmanager
def postgres_outage(url: str) -> Iterator[Outage]:
    """The server reaches PostgreSQL through a proxy that the test cuts (every connection reset, new ones too):
    the shared cluster, which other tests use, keeps running."""
    parsed = sa.make_url(url)
    with TcpProxy((parsed.host or "127.0.0.1", parsed.port or 5432)) as proxy:
        yield Outage(parsed.set(port=proxy.port).render_as_string(hide_password=False), proxy.cut, proxy.restore)


@pytest.fixture
def outage(database_url: str) -> Iterator[Outage]:
    with (sqlite_outage if is_sqlite(database_url) else postgres_outage)(database_url) as made:
        yield made


pytestmark = pytest.mark.usefixtures("tiny_retry_waits")


@pytest.fixture
def platform() -> FakePlatform:
    conversations = seed_conversations(3 * CONVERSATIONS_PER_PHASE, ("agent_outage",), now=NOW, audio_share=0.5)
    return FakePlatform(api_key=KEY, conversations=conversations)


@pytest.fixture
def fake_url(platform: FakePlatform) -> Iterator[str]:
    with platform.serve() as url:
        yield url


def webhooks_of(platform: FakePlatform, conversations: list[FakeConversation]) -> list[dict[str, Any]]:
    events = []
    for conversation in conversations:
        events.append(platform.transcription_event(conversation.conversation_id))
        if conversation.has_audio:
            events.append(platform.audio_event(conversation.conversation_id))
    return events


def deliver(server: Server, events: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """Each event's answer status and how long it took."""
    answers = []
    with httpx.Client(timeout=30) as client:
        for event in events:
            body = httpx.Request("POST", "/", json=event).content
            started = time.monotonic()
            answer = client.post(server.webhook_url, content=body, headers=signed(body))
            answers.append((answer.status_code, time.monotonic() - started))
    return answers


def probe(server: Server, path: str) -> tuple[int, float]:
    started = time.monotonic()
    answer = httpx.get(f"{server.url}{path}", timeout=30)
    return answer.status_code, time.monotonic() - started


def test_a_database_outage_is_answered_503_at_once_and_reconcile_fills_the_gap(
    database_url: str, outage: Outage, platform: FakePlatform, fake_url: str, engine: Engine, tmp_path: Path
) -> None:
    conversations = list(reversed(platform.all()))  # oldest call first, as the webhooks come
    before, during, after = (
        conversations[i : i + CONVERSATIONS_PER_PHASE] for i in range(0, len(conversations), CONVERSATIONS_PER_PHASE)
    )
    data_dir = tmp_path / "data"

    with serving(server_env(outage.database_url, data_dir), tmp_path / "serve.log", "--no-migrate") as server:
        assert {status for status, _ in deliver(server, webhooks_of(platform, before))} == {200}

        outage.cut()
        refused = deliver(server, webhooks_of(platform, during))
        readiness, health = probe(server, "/readyz"), probe(server, "/healthz")
        alive = server.proc.poll() is None
        outage.restore()

        accepted = deliver(server, webhooks_of(platform, after))
        ready_again = probe(server, "/readyz")
        assert server.proc.poll() is None

    seconds = [took for _, took in refused]
    print(
        f"\n{engine.dialect.name}: {len(refused)} webhooks during the outage answered "
        f"{sorted({status for status, _ in refused})} in {min(seconds):.3f}-{max(seconds):.3f} s "
        f"(median {statistics.median(seconds):.3f}); /readyz {readiness[0]} in {readiness[1]:.3f} s; "
        f"after it: {len(accepted)} webhooks answered {sorted({status for status, _ in accepted})}"
    )
    assert [status for status, _ in refused] == [503] * len(refused)
    assert max(seconds) < ANSWER_BOUND_SECONDS
    assert readiness[0] == 503 and readiness[1] < ANSWER_BOUND_SECONDS
    assert health[0] == 200 and alive
    assert [status for status, _ in accepted] == [200] * len(accepted)
    assert ready_again[0] == 200
    missed = {c.conversation_id for c in during}
    assert missed.isdisjoint(records(engine)), "a refused delivery left something behind"

    run = reconcile(settings_with_api_key(database_url, data_dir, KEY), fake_url, KEY, "--audio", "--json")

    assert run.exit_code == 0, run.stderr
    print(f"reconcile after the outage: {run.json}")
    assert run.json["details_fetched"] == len(missed)
    assert_every_conversation_is_stored(platform, records(engine), data_dir)


def assert_every_conversation_is_stored(
    platform: FakePlatform, stored: dict[str, dict[str, Any]], data_dir: Path
) -> None:
    assert set(stored) == {c.conversation_id for c in platform.all()}
    for conversation in platform.all():
        record = stored[conversation.conversation_id]
        assert record["status"] == conversation.status and record["complete"], conversation.conversation_id
        assert record["transcript"] == conversation.transcript(), conversation.conversation_id
        assert record["audio_stored"] == conversation.has_audio, conversation.conversation_id
    assert audio_mismatches(stored, data_dir) == []
