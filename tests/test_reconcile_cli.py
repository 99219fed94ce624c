"""`postcall reconcile` as a user drives it: exit statuses, `--since` forms, the lease between concurrent runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from service.cli import app
from service.config import Settings
from service.reconcile.ledger import WORKSPACE, acquire_lease
from service.storage.db import create_engine, transaction
from service.storage.migrations import upgrade
from service.testing import FakePlatform, seed_conversations
from tests.support.databases import postgres_database
from tests.support.process import ROOT
from tests.support.reconcile import checkpoint, cli_env, reconcile, rows

KEY = "cli-key"
NOW = int(time.time())


pytestmark = pytest.mark.usefixtures("tiny_retry_waits")


@pytest.fixture
def platform() -> FakePlatform:
    return FakePlatform(api_key=KEY, conversations=seed_conversations(12, ("agent_a",), now=NOW, seed=2))


@pytest.fixture
def fake_url(platform: FakePlatform) -> Iterator[str]:
    with platform.serve() as url:
        yield url


def list_after(platform: FakePlatform) -> int:
    return int(platform.calls_to("list")[-1].query["call_start_after_unix"])


@pytest.mark.parametrize(
    ("since", "expected"),
    [
        ("2026-01-31T12:00:00Z", int(datetime(2026, 1, 31, 12, tzinfo=UTC).timestamp())),
        ("2026-01-31", int(datetime(2026, 1, 31, tzinfo=UTC).timestamp())),
        ("1767225600", 1_767_225_600),
    ],
)
def test_since_takes_iso_8601_and_unix_seconds(
    settings: Settings, platform: FakePlatform, fake_url: str, since: str, expected: int
) -> None:
    assert reconcile(settings, fake_url, KEY, "--since", since).exit_code == 0
    assert list_after(platform) == expected - 1  # the API's bound is exclusive


def test_since_takes_a_duration_back_from_now(settings: Settings, platform: FakePlatform, fake_url: str) -> None:
    before = int(time.time())
    assert reconcile(settings, fake_url, KEY, "--since", "7d").exit_code == 0
    after = int(time.time())
    assert before - 7 * 86400 - 1 <= list_after(platform) <= after - 7 * 86400 - 1


@pytest.mark.parametrize("value", ["yesterday", "7 days", "2026-02-30", "-3"])
def test_a_malformed_since_exits_2_with_a_clear_message(settings: Settings, value: str) -> None:
    run = reconcile(settings, "http://127.0.0.1:9", KEY, "--since", value)
    assert run.exit_code == 2
    assert "--since" in run.stderr
    assert "7d" in run.stderr and "ISO-8601" in run.stderr and "unix seconds" in run.stderr


def test_since_after_until_is_a_usage_error(settings: Settings) -> None:
    run = reconcile(settings, "http://127.0.0.1:9", KEY, "--since", "1d", "--until", "2d")
    assert run.exit_code == 2
    assert "--since must be before --until" in run.stderr


def test_without_an_api_key_reconcile_exits_2_naming_the_variable(settings: Settings) -> None:
    env = {**cli_env(settings, "http://127.0.0.1:9", KEY), "POSTCALL_ELEVENLABS_API_KEY": ""}
    result = CliRunner().invoke(app, ["reconcile"], env=env)
    assert result.exit_code == 2
    assert "POSTCALL_ELEVENLABS_API_KEY" in result.stderr


def test_a_held_lease_exits_3_naming_its_holder(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    transaction(engine, lambda conn: acquire_lease(conn, "cron@host-7 pid 4242", datetime.now(UTC)))

    run = reconcile(settings, fake_url, KEY, "--json")

    assert run.exit_code == 3
    assert "cron@host-7 pid 4242" in run.stderr
    assert platform.calls == []
    assert rows(engine, "conversation") == []


def test_an_expired_lease_is_taken_over(settings: Settings, engine: Engine, fake_url: str) -> None:
    long_ago = datetime.fromtimestamp(NOW - 3600, UTC)
    transaction(engine, lambda conn: acquire_lease(conn, "crashed run", long_ago, ttl=60))
    assert reconcile(settings, fake_url, KEY).exit_code == 0


def test_a_failure_after_retries_exits_1_with_a_human_summary(
    settings: Settings, platform: FakePlatform, fake_url: str
) -> None:
    victim = platform.all()[0].conversation_id
    platform.failing_ids.add(victim)
    run = reconcile(settings, fake_url, KEY)
    assert run.exit_code == 1
    assert "failed 1" in run.stdout
    assert victim in run.stdout


def test_two_concurrent_runs_one_exits_3(settings: Settings, engine: Engine, platform: FakePlatform) -> None:
    platform.pause()  # the first run stays in flight, holding the lease, until the second has finished
    with platform.serve() as fake_url:
        env = {**os.environ, **cli_env(settings, fake_url, KEY)}
        command = [sys.executable, "-m", "service", "reconcile", "--json"]
        first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not (rows(engine, "reconcile_lease") and platform.in_flight):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lease"
            time.sleep(0.02)
        second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=60)
        platform.resume()
        out, err = first.communicate(timeout=60)

    assert first.returncode == 0, err.decode()
    assert second.returncode == 3
    assert f"pid {first.pid}" in second.stderr.decode()
    assert second.stdout == b""
    assert json.loads(out)["listed"] == 12


@pytest.mark.parametrize("since", ["2099-01-01", "1h"])
def test_a_window_that_starts_in_the_future_is_a_usage_error_and_records_no_run(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str, since: str
) -> None:
    if since == "1h":  # an --until before now, with --since after it, is the other way to start after the end
        run = reconcile(settings, fake_url, KEY, "--since", since, "--until", "2h")
        assert "--since must be before --until" in run.stderr
    else:
        run = reconcile(settings, fake_url, KEY, "--since", since)
        assert "--since 2099-01-01T00:00:00Z is in the future" in run.stderr
    assert run.exit_code == 2
    assert platform.calls == []
    assert rows(engine, "reconcile_run") == []


def test_until_in_the_future_lists_up_to_it_but_never_puts_the_checkpoint_there(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    run = reconcile(settings, fake_url, KEY, "--until", "2099-01-01", "--json")
    after = int(time.time())

    assert run.exit_code == 0, run.stderr
    assert int(platform.calls_to("list")[-1].query["call_start_before_unix"]) == 4_070_908_800
    held = checkpoint(engine, WORKSPACE)
    assert held is not None and held <= after  # a checkpoint in 2099 would skip every conversation until then
    assert run.json["listed"] == 12


@pytest.fixture
def unmigrated_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A database of the same kind that `postcall migrate` never touched."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'never-migrated.db'}"
        return
    with postgres_database(migrated=False) as url:
        yield url


@pytest.mark.parametrize(("at", "says"), [(None, "no migration has run"), ("0003", "it is at migration 0003")])
def test_a_database_not_migrated_is_a_usage_error_that_says_to_migrate(
    settings: Settings, unmigrated_url: str, platform: FakePlatform, fake_url: str, at: str | None, says: str
) -> None:
    if at is not None:  # migrated by an older postcall
        engine = create_engine(unmigrated_url)
        upgrade(engine, at)
        engine.dispose()
    unmigrated = settings.model_copy(update={"database_url": unmigrated_url})

    run = reconcile(unmigrated, fake_url, KEY)

    assert run.exit_code == 2
    assert f"the database is not migrated ({says}" in run.stderr
    assert "postcall migrate" in run.stderr
    assert "unavailable" not in run.stderr
    assert platform.calls == []
