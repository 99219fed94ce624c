"""Erasure that sticks: `DELETE /v1/conversations/{id}` and `postcall erase`, on SQLite and PostgreSQL.

Conversations are stored through the real app over HTTP (signed webhooks, so their bodies are archived and their
audio written as in production); the CLI runs in-process; the reconciler and `--upstream` talk to the fake
platform served over real HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.engine import Connection, Engine
from typer.testing import CliRunner

from service.cli import app as cli_app
from service.config import Settings
from service.erase import erasure
from service.record import store
from service.record.merge import Source
from service.storage.audio import BlobStore, audio_relpath
from service.storage.db import transaction
from service.testing import FakePlatform, livekit_token, seed_conversations
from service.web.app import create_app
from tests.support import records
from tests.support import webhooks as wh
from tests.support.live import live_server
from tests.support.reconcile import Run, cli_env, reconcile, rows

ADMIN = "admin-token-0123"
READ_AUTH = {"Authorization": "Bearer test-token"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
KEY = "erase-api-key"
NOW = int(time.time())
AT = datetime.fromtimestamp(NOW, UTC)
NOWHERE = "http://127.0.0.1:9"  # an ElevenLabs nobody should call


def mp3(conversation_id: str) -> bytes:
    return b"ID3" + f" the voice of {conversation_id}".encode() * 20


@pytest.fixture
def admin_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"admin_tokens": (SecretStr(ADMIN),)})


@contextmanager
def live(settings: Settings, engine: Engine) -> Iterator[httpx.Client]:
    with live_server(create_app(settings, engine=engine)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def post(client: httpx.Client, event: dict[str, Any]) -> dict[str, Any]:
    body = wh.encode(event)
    answer = client.post("/webhooks/elevenlabs", content=body, headers=wh.signed_headers(body))
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def seed(client: httpx.Client, conversation_id: str, user_id: str) -> None:
    """A conversation as ElevenLabs delivers it: its transcription (archived) and its audio (a file)."""
    assert post(client, wh.transcription(conversation_id, user_id=user_id))["status"] == "accepted"
    assert post(client, wh.audio(conversation_id, mp3(conversation_id)))["status"] == "accepted"


def traces(engine: Engine, data_dir: Path, conversation_id: str) -> dict[str, Any]:
    """Everything postcall holds of a conversation: its record, archived bodies (by id, or mentioning it), audio."""
    archived = rows(engine, "webhook_event")
    return {
        "record": [row for row in rows(engine, "conversation") if row["conversation_id"] == conversation_id],
        "archived": [
            row["id"]
            for row in archived
            if row["conversation_id"] == conversation_id or conversation_id.encode() in (row["body"] or b"")
        ],
        "audio": (data_dir / audio_relpath(conversation_id)).exists(),
    }


def gone(engine: Engine, data_dir: Path, conversation_id: str) -> bool:
    return traces(engine, data_dir, conversation_id) == {"record": [], "archived": [], "audio": False}


def whole(engine: Engine, data_dir: Path, conversation_id: str) -> bool:
    found = traces(engine, data_dir, conversation_id)
    return len(found["record"]) == 1 and len(found["archived"]) == 2 and found["audio"]


def erase_cli(settings: Settings, *args: str, base_url: str = NOWHERE) -> Run:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        result = CliRunner().invoke(cli_app, ["erase", *args], env=cli_env(settings, base_url, KEY))
    finally:
        root.handlers[:] = handlers  # the command logs to the runner's stderr, closed afterwards
        root.setLevel(level)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Run(result.exit_code, result.stdout, result.stderr)


def snapshot(engine: Engine, data_dir: Path) -> tuple[Any, ...]:
    tables = ("conversation", "webhook_event", "conversation_tombstone", "erase_log")
    files = sorted(str(path.relative_to(data_dir)) for path in data_dir.rglob("*.mp3"))
    return (*(rows(engine, table) for table in tables), files)


# --- DELETE /v1/conversations/{id} -----------------------------------------------------------------------------


def test_delete_needs_an_admin_token_then_nothing_of_the_conversation_remains(
    admin_settings: Settings, engine: Engine
) -> None:
    data_dir = admin_settings.data_dir
    with live(admin_settings, engine) as client:
        seed(client, "conv_gone", "user-1")
        seed(client, "conv_kept", "user-2")

        refused = client.delete("/v1/conversations/conv_gone", headers=READ_AUTH)
        assert refused.status_code == 403
        assert "admin token" in refused.json()["error"]
        assert client.delete("/v1/conversations/conv_gone", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert whole(engine, data_dir, "conv_gone")

        erased = client.delete("/v1/conversations/conv_gone", headers=ADMIN_AUTH)
        assert (erased.status_code, erased.content) == (204, b"")

        assert client.get("/v1/conversations/conv_gone", headers=READ_AUTH).status_code == 404
        assert client.get("/v1/conversations/conv_gone/audio", headers=ADMIN_AUTH).status_code == 404
        listed = client.get("/v1/conversations", headers=READ_AUTH).json()["conversations"]
        assert [record["conversation_id"] for record in listed] == ["conv_kept"]
        # Erased before, or never stored: unknown either way, and nothing changes.
        assert client.delete("/v1/conversations/conv_gone", headers=ADMIN_AUTH).status_code == 404
        assert client.delete("/v1/conversations/conv_never", headers=ADMIN_AUTH).status_code == 404

    assert gone(engine, data_dir, "conv_gone")
    assert whole(engine, data_dir, "conv_kept")
    [tombstone] = rows(engine, "conversation_tombstone")
    assert set(tombstone) == {"conversation_id", "erased_at"}
    assert tombstone["conversation_id"] == "conv_gone"
    [entry] = rows(engine, "erase_log")
    assert {key: value for key, value in entry.items() if key not in ("id", "erased_at")} == {
        "actor": "admin token 1",
        "selector": "conversation",
        "conversations": 1,
        "tombstones": 1,
        "audio_files": 1,
        "webhook_events": 2,
    }


def test_a_late_or_retried_webhook_of_an_erased_conversation_is_ignored_and_nothing_of_it_kept(
    admin_settings: Settings, engine: Engine
) -> None:
    data_dir = admin_settings.data_dir
    with live(admin_settings, engine) as client:
        seed(client, "conv_gone", "user-1")
        transcription = wh.transcription("conv_gone", user_id="user-1")
        assert client.delete("/v1/conversations/conv_gone", headers=ADMIN_AUTH).status_code == 204
        # Named to the CLI before ElevenLabs ever delivered it: tombstoned all the same.
        assert erase_cli(admin_settings, "--conversation", "conv_early").exit_code == 0

        for conversation_id in ("conv_gone", "conv_early"):
            late = [
                wh.transcription(conversation_id, user_id="user-1"),
                wh.audio(conversation_id, mp3(conversation_id)),
                wh.failure(conversation_id),
                {"type": "some_future_event", "data": {"conversation_id": conversation_id}},
            ]
            for event in [*late, *late]:  # each one retried: still ignored, never a duplicate of anything
                assert post(client, event) == {"status": "ignored", "conversation_id": conversation_id}
        assert post(client, transcription)["status"] == "ignored"  # the very body that was erased

    for conversation_id in ("conv_gone", "conv_early"):
        assert gone(engine, data_dir, conversation_id)
    assert rows(engine, "conversation") == rows(engine, "webhook_event") == []
    assert list((data_dir / "tmp").glob("*.part")) == []  # the refused audio was not left in temp either


# --- postcall erase ---------------------------------------------------------------------------------------------


def seed_users(settings: Settings, engine: Engine) -> None:
    with live(settings, engine) as client:
        for conversation_id, user_id in [("conv_a1", "alice"), ("conv_a2", "alice"), ("conv_b1", "bob")]:
            seed(client, conversation_id, user_id)


def test_erase_by_user_id_erases_every_conversation_of_that_user_and_no_other(
    admin_settings: Settings, engine: Engine
) -> None:
    seed_users(admin_settings, engine)

    run = erase_cli(admin_settings, "--user-id", "alice")

    assert run.exit_code == 0, run.stderr
    assert run.stdout.startswith("erased 2 conversations of the user, with 2 audio files (")
    assert "4 archived webhook bodies; 2 new tombstones" in run.stdout
    assert gone(engine, admin_settings.data_dir, "conv_a1") and gone(engine, admin_settings.data_dir, "conv_a2")
    assert whole(engine, admin_settings.data_dir, "conv_b1")
    assert {row["conversation_id"] for row in rows(engine, "conversation_tombstone")} == {"conv_a1", "conv_a2"}
    # Nothing left to erase: the same command again changes nothing but the log.
    again = erase_cli(admin_settings, "--user-id", "alice")
    assert again.exit_code == 0 and again.stdout.startswith("erased 0 conversations")


def test_the_erase_log_and_the_tombstones_hold_nothing_personal(admin_settings: Settings, engine: Engine) -> None:
    seed_users(admin_settings, engine)
    assert erase_cli(admin_settings, "--user-id", "alice").exit_code == 0
    with live(admin_settings, engine) as client:
        assert client.delete("/v1/conversations/conv_b1", headers=ADMIN_AUTH).status_code == 204

    log_rows = rows(engine, "erase_log")
    assert [(row["actor"], row["selector"], row["conversations"]) for row in log_rows] == [
        ("cli", "user_id", 2),
        ("admin token 1", "conversation", 1),
    ]
    logged = repr(log_rows)
    for personal in ("alice", "bob", "conv_a1", "conv_a2", "conv_b1", ADMIN, "test-token"):
        assert personal not in logged
    assert all(set(row) == {"conversation_id", "erased_at"} for row in rows(engine, "conversation_tombstone"))


def test_dry_run_counts_what_would_go_and_changes_nothing(admin_settings: Settings, engine: Engine) -> None:
    seed_users(admin_settings, engine)
    before = snapshot(engine, admin_settings.data_dir)

    dry = erase_cli(admin_settings, "--user-id", "alice", "--dry-run", "--upstream")
    named = erase_cli(admin_settings, "--conversation", "conv_b1", "--conversation", "conv_never", "--dry-run")

    assert dry.exit_code == named.exit_code == 0
    assert snapshot(engine, admin_settings.data_dir) == before
    assert "dry run: nothing was changed" in dry.stdout
    assert "--upstream would ask ElevenLabs to delete 2 conversations" in dry.stdout  # and asked nothing
    assert named.stdout.startswith("would erase 1 conversations of 2 named, with 1 audio files (")
    assert "2 archived webhook bodies; 2 new tombstones" in named.stdout
    real = erase_cli(admin_settings, "--user-id", "alice")
    assert real.stdout.splitlines()[0] == dry.stdout.splitlines()[0].replace("would erase", "erased")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--conversation", "conv_a1", "--user-id", "alice"],
        ["--conversation", "conv/a1"],
        ["--conversation", ""],
        ["--user-id", ""],
        ["--user-id", "ali\x00ce"],
    ],
)
def test_bad_arguments_exit_2_and_change_nothing(admin_settings: Settings, engine: Engine, args: list[str]) -> None:
    seed_users(admin_settings, engine)
    before = snapshot(engine, admin_settings.data_dir)
    run = erase_cli(admin_settings, *args)
    assert run.exit_code == 2
    assert run.stderr.startswith("postcall: ")
    assert snapshot(engine, admin_settings.data_dir) == before


def test_upstream_needs_the_api_key(admin_settings: Settings, engine: Engine) -> None:
    env = {**cli_env(admin_settings, NOWHERE, KEY), "POSTCALL_ELEVENLABS_API_KEY": ""}
    result = CliRunner().invoke(cli_app, ["erase", "--conversation", "conv_a1", "--upstream"], env=env)
    assert result.exit_code == 2
    assert "POSTCALL_ELEVENLABS_API_KEY" in result.stderr


# --- tombstones against the other ways in ----------------------------------------------------------------------


@pytest.fixture
def platform() -> FakePlatform:
    return FakePlatform(api_key=KEY, conversations=seed_conversations(4, ("agent_a",), now=NOW, seed=3))


@pytest.fixture
def fake_url(platform: FakePlatform) -> Iterator[str]:
    with platform.serve() as url:
        yield url


def test_the_reconciler_does_not_store_an_erased_conversation_again_while_elevenlabs_lists_it(
    admin_settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    ids = [conversation.conversation_id for conversation in platform.all()]
    first = reconcile(admin_settings, fake_url, KEY, "--since", "7d", "--audio", "--json")
    assert (first.exit_code, first.json["new"]) == (0, 4)
    erased = ids[0]
    assert (admin_settings.data_dir / audio_relpath(erased)).exists()
    assert erase_cli(admin_settings, "--conversation", erased).exit_code == 0
    platform.reset_calls()

    again = reconcile(admin_settings, fake_url, KEY, "--since", "7d", "--audio", "--json")

    assert again.exit_code == 0, again.stdout
    assert (again.json["new"], again.json["updated"], again.json["failed"]) == (0, 0, 0)
    assert erased in {conversation.conversation_id for conversation in platform.all()}  # still listed upstream
    assert gone(engine, admin_settings.data_dir, erased)
    assert {row["conversation_id"] for row in rows(engine, "conversation")} == set(ids[1:])
    assert list((admin_settings.data_dir / "tmp").glob("*.part")) == []
    asked = [call.path for call in platform.calls_to("detail") + platform.calls_to("audio")]
    assert not any(erased in path for path in asked), asked  # nothing of it is fetched again


def test_a_session_for_an_erased_conversation_returns_its_token_and_records_nothing(
    admin_settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    erased = "conv_erased0123456789abcdefgh"
    assert erase_cli(admin_settings, "--conversation", erased).exit_code == 0
    token = livekit_token(erased, None)
    platform.answer_with({"token": token}, 1, kinds={"token"})
    broker_settings = admin_settings.model_copy(
        update={"elevenlabs_base_url": fake_url, "elevenlabs_api_key": SecretStr(KEY)}
    )

    with live(broker_settings, engine) as client:
        answer = client.post("/v1/sessions", json={"agent_id": "agent_a", "transport": "webrtc"}, headers=READ_AUTH)
        fetched = client.get(f"/v1/conversations/{erased}", headers=READ_AUTH)

    assert answer.status_code == 200, answer.text
    assert answer.json() == {"conversation_id": erased, "token": token, "agent_id": "agent_a"}
    assert fetched.status_code == 404
    assert rows(engine, "conversation") == []


# --- --upstream --------------------------------------------------------------------------------------------------


def store_platform_conversations(engine: Engine, platform: FakePlatform, user_id: str) -> list[str]:
    ids = [conversation.conversation_id for conversation in platform.all()]
    records.store(engine, [records.detail(cid, user_id=user_id if i < 2 else "someone") for i, cid in enumerate(ids)])
    return ids


def test_upstream_deletes_them_at_elevenlabs_too(
    admin_settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    ids = store_platform_conversations(engine, platform, "alice")

    named = erase_cli(
        admin_settings,
        "--conversation",
        ids[2],
        "--conversation",
        "conv_not_at_elevenlabs",
        "--upstream",
        base_url=fake_url,
    )
    by_user = erase_cli(admin_settings, "--user-id", "alice", "--upstream", base_url=fake_url)

    assert named.exit_code == 0, named.stderr
    assert named.stdout.splitlines()[-1] == "ElevenLabs: 1 deleted, 1 already gone, 0 failed"
    assert by_user.exit_code == 0, by_user.stderr
    assert by_user.stdout.splitlines()[-1] == "ElevenLabs: 2 deleted, 0 already gone, 0 failed"
    assert [conversation.conversation_id for conversation in platform.all()] == [ids[3]]
    deletions = platform.calls_to("delete")
    assert len(deletions) == 4
    assert all(call.request_headers["xi-api-key"] == KEY for call in deletions)
    assert {row["conversation_id"] for row in rows(engine, "conversation")} == {ids[3]}


@pytest.mark.usefixtures("tiny_retry_waits")
@pytest.mark.parametrize("status", [403, 503])
def test_a_refused_upstream_deletion_is_reported_exits_1_and_the_local_erase_is_done(
    admin_settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str, status: int
) -> None:
    ids = store_platform_conversations(engine, platform, "alice")
    platform.fail(None, status=status, kinds={"delete"})

    run = erase_cli(admin_settings, "--user-id", "alice", "--upstream", base_url=fake_url)

    assert run.exit_code == 1
    for conversation_id in ids[:2]:
        assert f"postcall: ElevenLabs did not delete {conversation_id}: HTTP {status}" in run.stderr
        assert gone(engine, admin_settings.data_dir, conversation_id)
    assert run.stdout.splitlines()[-1] == "ElevenLabs: 0 deleted, 0 already gone, 2 failed"
    assert len(platform.all()) == 4  # nothing was deleted there
    assert {row["conversation_id"] for row in rows(engine, "conversation_tombstone")} == set(ids[:2])


# --- batches and the hook for conversation.deleted ----------------------------------------------------------------


def seed_many(engine: Engine, data_dir: Path, count: int) -> list[str]:
    ids = [f"conv_{i}" for i in range(count)]
    records.store(engine, [records.detail(cid, user_id="alice") for cid in ids])
    records.store(engine, [records.audio(cid, data_dir, mp3(cid)) for cid in ids])
    return ids


def erase_now(engine: Engine, data_dir: Path, plan: erasure.Plan, **options: Any) -> erasure.EraseReport:
    run = partial(erasure.erase, engine, BlobStore(data_dir), plan, "cli", **options)
    report: erasure.EraseReport = anyio.run(run)
    return report


def test_each_batch_commits_alone_and_announces_its_ids_inside_its_transaction(
    engine: Engine, settings: Settings
) -> None:
    ids = seed_many(engine, settings.data_dir, 5)
    announced: list[list[str]] = []

    def on_erased(conn: Connection, erased: Sequence[str], at: datetime) -> None:
        remaining = conn.execute(sa.select(sa.func.count()).select_from(store.conversations)).scalar_one()
        announced.append([*erased, f"{remaining} left"])

    plan = erasure.of_user(engine, "alice")
    report = erase_now(engine, settings.data_dir, plan, on_erased=on_erased, batch_size=2)

    assert announced == [[ids[0], ids[1], "3 left"], [ids[2], ids[3], "1 left"], [ids[4], "0 left"]]
    assert (report.conversations, report.tombstones, report.audio_files) == (5, 5, 5)
    assert [row["conversations"] for row in rows(engine, "erase_log")] == [2, 2, 1]
    assert all(gone(engine, settings.data_dir, cid) for cid in ids)


def test_a_batch_whose_announcement_fails_is_rolled_back_whole(engine: Engine, settings: Settings) -> None:
    ids = seed_many(engine, settings.data_dir, 4)

    def on_erased(conn: Connection, erased: Sequence[str], at: datetime) -> None:
        if ids[2] in erased:
            raise RuntimeError("the outbox refused")

    with pytest.raises(RuntimeError):
        erase_now(engine, settings.data_dir, erasure.of_user(engine, "alice"), on_erased=on_erased, batch_size=2)

    assert gone(engine, settings.data_dir, ids[0]) and gone(engine, settings.data_dir, ids[1])
    for cid in ids[2:]:
        assert len(traces(engine, settings.data_dir, cid)["record"]) == 1
        assert (settings.data_dir / audio_relpath(cid)).exists()
    assert {row["conversation_id"] for row in rows(engine, "conversation_tombstone")} == set(ids[:2])
    assert len(rows(engine, "erase_log")) == 1


# --- writes racing an erase (PostgreSQL: SQLite's writers take turns) --------------------------------------------


def wait_until_a_backend_waits_for_a_lock(engine: Engine) -> None:
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.exec_driver_sql(query).scalar_one():
                return
        time.sleep(0.01)
    raise AssertionError("the write never waited for the erase's lock")


def erase_while(engine: Engine, data_dir: Path, conversation_id: str, write: Callable[[], Any]) -> list[Any]:
    """Erase `conversation_id`; inside the erase's transaction, start `write` in a thread and let the erase commit
    only once that write waits for the erase's lock. Returns what the write returned (nothing if it raised)."""
    outcome: list[Any] = []
    writer = threading.Thread(target=lambda: outcome.append(write()))

    def on_erased(conn: Connection, erased: Sequence[str], at: datetime) -> None:
        writer.start()
        wait_until_a_backend_waits_for_a_lock(engine)

    erase_now(engine, data_dir, erasure.named([conversation_id], tombstone_unstored=False), on_erased=on_erased)
    writer.join(timeout=30)
    return outcome


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_webhook_racing_the_erase_waits_for_it_and_is_ignored(admin_settings: Settings, engine: Engine) -> None:
    with live(admin_settings, engine) as client:
        seed(client, "conv_race", "alice")
        late = wh.transcription("conv_race", user_id="alice", call_duration_secs=99)
        answers = erase_while(engine, admin_settings.data_dir, "conv_race", lambda: post(client, late))

    assert answers == [{"status": "ignored", "conversation_id": "conv_race"}]
    assert gone(engine, admin_settings.data_dir, "conv_race")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_audio_racing_the_erase_is_taken_back_out_of_place(settings: Settings, engine: Engine) -> None:
    records.store(engine, [records.detail("conv_race")])
    blobs = BlobStore(settings.data_dir)
    blob = blobs.open_temp()
    blob.write(mp3("conv_race"))
    blob.sync()

    def write_audio() -> store.Change:
        try:
            return transaction(
                engine, lambda conn: store.store_audio(conn, "conv_race", blob, Source.AUDIO_WEBHOOK, AT)
            )
        finally:
            blob.discard()

    changes = erase_while(engine, settings.data_dir, "conv_race", write_audio)

    assert changes == [store.Change.ERASED]
    assert gone(engine, settings.data_dir, "conv_race")
    assert list(blobs.temp_dir.glob("*.part")) == []
