"""`postcall doctor` against the fake platform over HTTP: passing, and failing for each cause it checks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.config import Settings
from service.doctor.checks import same_url
from service.testing import FakePlatform, seed_conversations
from tests.support.live import free_port

KEY = "doctor-key"
PUBLIC_URL = "https://postcall.example.com"  # the fake's post-call webhook posts to its /webhooks/elevenlabs
NOW = int(time.time())


@dataclass
class Doctor:
    exit_code: int
    lines: list[str]
    stderr: str

    def line(self, check: str) -> str:
        [found] = [line for line in self.lines if line[2:].startswith(f"{check}:")]
        return found


@pytest.fixture
def platform() -> FakePlatform:
    return FakePlatform(api_key=KEY, conversations=seed_conversations(3, ("agent_a",), now=NOW))


@pytest.fixture
def fake_url(platform: FakePlatform) -> Iterator[str]:
    with platform.serve() as url:
        yield url


def doctor(settings: Settings, base_url: str, **overrides: str) -> Doctor:
    env = {
        "POSTCALL_DATABASE_URL": settings.database_url,
        "POSTCALL_DATA_DIR": str(settings.data_dir),
        "POSTCALL_ELEVENLABS_BASE_URL": base_url,
        "POSTCALL_ELEVENLABS_API_KEY": KEY,
        "POSTCALL_PUBLIC_URL": PUBLIC_URL,
        **overrides,
    }
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        result = CliRunner().invoke(app, ["doctor"], env=env)
    finally:
        root.handlers[:] = handlers  # the command logs to the runner's stderr, closed afterwards
        root.setLevel(level)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Doctor(result.exit_code, result.stdout.splitlines(), result.stderr)


def test_a_sound_deployment_passes_every_check(settings: Settings, platform: FakePlatform, fake_url: str) -> None:
    run = doctor(settings, fake_url)

    assert run.exit_code == 0, run.lines
    assert [line[:2] for line in run.lines] == ["✓ "] * 4
    assert run.line("database").endswith("at the newest migration")
    assert run.line("data dir") == f"✓ data dir: {settings.data_dir} (a probe file written, read back and deleted)"
    assert run.line("API key") == f"✓ API key: ElevenLabs at {fake_url} accepts it"
    assert run.line("post-call webhook") == f"✓ post-call webhook: {PUBLIC_URL}/webhooks/elevenlabs (HMAC, enabled)"
    assert list(settings.data_dir.iterdir()) == []  # the probe is gone
    assert [call.kind for call in platform.calls] == ["agents", "settings", "webhooks"]
    assert KEY not in "\n".join(run.lines) + run.stderr


def test_an_http_public_url_is_checked_as_well(settings: Settings, platform: FakePlatform, fake_url: str) -> None:
    platform.set_webhook(webhook_url="http://10.0.0.5:8000/webhooks/elevenlabs")

    assert doctor(settings, fake_url, POSTCALL_PUBLIC_URL="http://10.0.0.5:8000/").exit_code == 0
    failed = doctor(settings, fake_url, POSTCALL_PUBLIC_URL="https://10.0.0.5:8000")
    assert failed.exit_code == 1
    assert "it posts to http://10.0.0.5:8000/webhooks/elevenlabs, not to https://" in failed.line("post-call webhook")


@dataclass(frozen=True)
class Cause:
    name: str
    check: str
    says: str
    platform: Callable[[FakePlatform], None] = lambda platform: None
    env: Callable[[Path, str], dict[str, str]] = lambda tmp, url: {}


def _no_post_call_webhook(platform: FakePlatform) -> None:
    platform.post_call_webhook_id = None


CAUSES = [
    Cause(
        "data-dir-not-writable",
        "data dir",
        "cannot write to",
        env=lambda tmp, url: {"POSTCALL_DATA_DIR": str(_a_file(tmp) / "data")},
    ),
    Cause("no-api-key", "API key", "POSTCALL_ELEVENLABS_API_KEY is not set", env=lambda tmp, url: _no_key()),
    Cause(
        "wrong-api-key",
        "API key",
        "ElevenLabs refused it (HTTP 401: Invalid API key): check POSTCALL_ELEVENLABS_API_KEY",
        env=lambda tmp, url: {"POSTCALL_ELEVENLABS_API_KEY": "not-the-key"},
    ),
    Cause(
        "elevenlabs-unreachable",
        "API key",
        "cannot reach ElevenLabs at http://127.0.0.1:",
        env=lambda tmp, url: {"POSTCALL_ELEVENLABS_BASE_URL": f"http://127.0.0.1:{free_port()}"},
    ),
    Cause(
        "webhooks-unreadable",
        "post-call webhook",
        "cannot read the workspace's webhooks (HTTP 403: Injected HTTP 403): the key needs access",
        platform=lambda platform: platform.fail(None, 403, kinds={"webhooks"}),
    ),
    Cause(
        "no-post-call-webhook",
        "post-call webhook",
        "the workspace has no post-call webhook",
        platform=_no_post_call_webhook,
    ),
    Cause(
        "posts-elsewhere",
        "post-call webhook",
        "it posts to https://old-host.example.com/hooks, not to https://postcall.example.com/webhooks/elevenlabs",
        platform=lambda platform: platform.set_webhook(webhook_url="https://old-host.example.com/hooks"),
    ),
    Cause(
        "not-hmac",
        "post-call webhook",
        "it authenticates with oauth2, not HMAC",
        platform=lambda platform: platform.set_webhook(auth_type="oauth2"),
    ),
    Cause(
        "disabled",
        "post-call webhook",
        "is disabled: ElevenLabs sends it nothing",
        platform=lambda platform: platform.set_webhook(is_disabled=True),
    ),
    Cause(
        "auto-disabled",
        "post-call webhook",
        "was auto-disabled by ElevenLabs after repeated failures (last failure: HTTP 502 at",
        platform=lambda platform: platform.set_webhook(
            is_auto_disabled=True, most_recent_failure_error_code=502, most_recent_failure_timestamp=NOW - 9 * 86400
        ),
    ),
]


def _a_file(tmp: Path) -> Path:
    blocker = tmp / "a-file"
    blocker.write_text("a data dir cannot be made under a file")
    return blocker


def _no_key() -> dict[str, str]:
    return {"POSTCALL_ELEVENLABS_API_KEY": ""}


@pytest.mark.parametrize("cause", CAUSES, ids=lambda cause: cause.name)
def test_each_cause_is_a_failed_check_that_says_what_to_do_and_exits_1(
    settings: Settings, platform: FakePlatform, fake_url: str, tmp_path: Path, cause: Cause
) -> None:
    cause.platform(platform)

    run = doctor(settings, fake_url, **cause.env(tmp_path, fake_url))

    assert run.exit_code == 1, run.lines
    failed = run.line(cause.check)
    assert failed.startswith(f"✗ {cause.check}: ")
    assert cause.says in failed
    assert run.line("database").startswith("✓ ")  # the other checks still ran
    assert len(run.lines) == 4
    assert "not-the-key" not in "\n".join(run.lines)


@pytest.mark.parametrize(
    ("state", "says"),
    [
        ({"retry_enabled": False}, "retries are off: ElevenLabs sends each transcript once; enable retries"),
        (
            {"most_recent_failure_error_code": 500, "most_recent_failure_timestamp": NOW - 120},
            "failed recently (last failure: HTTP 500 at",
        ),
    ],
    ids=["retries-off", "failed-recently"],
)
def test_advice_is_a_warning_line_and_the_checks_still_pass(
    settings: Settings, platform: FakePlatform, fake_url: str, state: dict[str, object], says: str
) -> None:
    platform.set_webhook(**state)

    run = doctor(settings, fake_url)

    assert run.exit_code == 0, run.lines
    assert run.lines[3].startswith("✓ post-call webhook: ")
    [advice] = run.lines[4:]
    assert advice.startswith("⚠ post-call webhook: ") and says in advice


def test_no_transcripts_sent_and_no_public_url_are_warnings(
    settings: Settings, platform: FakePlatform, fake_url: str
) -> None:
    platform.webhook_events = ["audio", "call_initiation_failure"]

    run = doctor(settings, fake_url, POSTCALL_PUBLIC_URL="")

    assert run.exit_code == 0, run.lines
    assert run.lines[4:] == [
        f"⚠ post-call webhook: set POSTCALL_PUBLIC_URL to check that it posts here (it posts to {PUBLIC_URL}"
        "/webhooks/elevenlabs)",
        "⚠ post-call webhook: ElevenLabs sends it no transcripts (events: audio, call_initiation_failure): add the "
        "transcript event in the Agents Platform settings, or only the reconciler will store conversations",
    ]


def test_a_database_not_migrated_fails_and_says_to_migrate(settings: Settings, fake_url: str, tmp_path: Path) -> None:
    run = doctor(settings, fake_url, POSTCALL_DATABASE_URL=f"sqlite:///{tmp_path / 'never-migrated.db'}")

    assert run.exit_code == 1
    assert run.line("database").startswith("✗ database: sqlite:///")
    assert "is not migrated (no migration has run): run `postcall migrate`" in run.line("database")


def test_a_database_it_cannot_reach_fails_without_showing_its_password(settings: Settings, fake_url: str) -> None:
    url = f"postgresql+psycopg://postcall:s3cret-pw@127.0.0.1:{free_port()}/postcall?connect_timeout=2"

    run = doctor(settings, fake_url, POSTCALL_DATABASE_URL=url)

    assert run.exit_code == 1
    assert run.line("database").startswith("✗ database: cannot reach postgresql+psycopg://postcall:***@127.0.0.1:")
    assert "check POSTCALL_DATABASE_URL" in run.line("database")
    assert "s3cret-pw" not in "\n".join(run.lines) + run.stderr


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("https://Calls.Example.com/webhooks/elevenlabs", "https://calls.example.com:443/webhooks/elevenlabs/", True),
        ("http://10.0.0.5/webhooks/elevenlabs", "http://10.0.0.5:80/webhooks/elevenlabs", True),
        ("https://calls.example.com/webhooks/elevenlabs", "http://calls.example.com/webhooks/elevenlabs", False),
        ("https://calls.example.com/webhooks/elevenlabs", "https://calls.example.com:8443/webhooks/elevenlabs", False),
        ("https://calls.example.com/a/webhooks/elevenlabs", "https://calls.example.com/webhooks/elevenlabs", False),
        ("https://calls.example.com:x/webhooks/elevenlabs", "https://calls.example.com/webhooks/elevenlabs", False),
    ],
)
def test_urls_are_compared_as_places(a: str, b: str, same: bool) -> None:
    assert same_url(a, b) is same
