"""`postcall send-test-webhook` against a live postcall (uvicorn over a real socket, on SQLite and PostgreSQL)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from typer.testing import CliRunner, Result

from service.cli import app
from service.config import Settings
from service.testing.samples import TEST_AGENT_ID, silent_mp3
from service.web.app import create_app
from tests.support.live import live_server
from tests.support.records import get_record
from tests.support.webhooks import SECRET


@pytest.fixture
def webhook_url(settings: Settings, engine: Engine) -> Iterator[str]:
    with live_server(create_app(settings, engine=engine)) as url:
        yield f"{url}/webhooks/elevenlabs"


def run(*args: str, secrets: str | None = SECRET, cwd: Path) -> Result:
    env = {"POSTCALL_WEBHOOK_SECRETS": secrets or ""}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)  # no stray .env from the work tree
        return CliRunner().invoke(app, ["send-test-webhook", *args], env=env)


def sent_conversation_id(result: Result) -> str:
    match = re.search(r'"conversation_id":"(conv_test[0-9a-z]+)"', result.stdout)
    assert match, result.stdout
    return match.group(1)


def stored(engine: Engine, conversation_id: str) -> dict[str, object]:
    with engine.connect() as conn:
        record = get_record(conn, conversation_id)
    assert record is not None, f"{conversation_id} was not stored"
    return record


def test_transcription_sample_is_accepted_and_stored(webhook_url: str, engine: Engine, tmp_path: Path) -> None:
    result = run(webhook_url, "--type", "transcription", cwd=tmp_path)

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith('200 {"status":"accepted"')
    record = stored(engine, sent_conversation_id(result))
    assert record["status"] == "done"
    assert record["agent_id"] == TEST_AGENT_ID
    assert record["first_seen_via"] == "webhook"
    assert record["complete"] is True
    assert record["transcript"] and len(record["transcript"]) == 6  # type: ignore[arg-type]


def test_audio_sample_stores_the_mp3_in_the_data_dir(
    webhook_url: str, engine: Engine, settings: Settings, tmp_path: Path
) -> None:
    result = run(webhook_url, "--type", "audio", cwd=tmp_path)

    assert result.exit_code == 0, result.output
    record = stored(engine, sent_conversation_id(result))
    assert record["audio_stored"] is True
    audio = (settings.data_dir / str(record["audio_path"])).read_bytes()
    assert audio == silent_mp3()
    assert audio.startswith(b"ID3")
    assert audio[10:12] == b"\xff\xfb"  # the first MPEG-1 Layer III frame sync follows the empty tag


def test_failure_sample_is_stored_as_a_failed_call(webhook_url: str, engine: Engine, tmp_path: Path) -> None:
    result = run(webhook_url, "--type", "failure", cwd=tmp_path)

    assert result.exit_code == 0, result.output
    record = stored(engine, sent_conversation_id(result))
    assert record["status"] == "failed"
    assert record["failure_reason"] == "busy"


def test_each_run_sends_a_new_conversation_so_a_recheck_is_never_a_duplicate(webhook_url: str, tmp_path: Path) -> None:
    first, second = (run(webhook_url, cwd=tmp_path) for _ in range(2))

    assert first.exit_code == second.exit_code == 0
    assert sent_conversation_id(first) != sent_conversation_id(second)
    assert '"status":"accepted"' in second.stdout


def test_a_secret_the_server_does_not_know_exits_non_zero_and_stores_nothing(
    webhook_url: str, engine: Engine, tmp_path: Path
) -> None:
    result = run(webhook_url, secrets="wsec_not_the_servers", cwd=tmp_path)

    assert result.exit_code == 1
    assert result.stdout.startswith("401 ")
    assert "answered 401, not 200" in result.stderr
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM conversation").scalar_one() == 0


def test_only_the_first_of_several_secrets_signs(webhook_url: str, tmp_path: Path) -> None:
    # The server knows SECRET; listing it second means the sample is signed with the other one.
    result = run(webhook_url, secrets=f"wsec_new_not_yet_on_server,{SECRET}", cwd=tmp_path)

    assert result.exit_code == 1
    assert result.stdout.startswith("401 ")


def test_no_secret_configured_is_a_usage_error(tmp_path: Path) -> None:
    result = run("http://127.0.0.1:9/webhooks/elevenlabs", secrets=None, cwd=tmp_path)

    assert result.exit_code == 2
    assert "POSTCALL_WEBHOOK_SECRETS is required by send-test-webhook" in result.stderr


def test_an_unknown_type_is_a_usage_error(tmp_path: Path) -> None:
    result = run("--type", "transcript", cwd=tmp_path)

    assert result.exit_code == 2
    assert "--type must be one of transcription, audio, failure" in result.stderr


def test_an_unreachable_server_exits_non_zero(tmp_path: Path) -> None:
    from tests.support.live import free_port

    result = run(f"http://127.0.0.1:{free_port()}/webhooks/elevenlabs", cwd=tmp_path)

    assert result.exit_code == 1
    assert "could not post to" in result.stderr
