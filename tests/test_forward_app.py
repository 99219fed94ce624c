"""Forwarding inside `serve` (the app's lifespan) and around it: webhooks in, signed events out, backfills too;
GET /v1/forward, POST /v1/forward/replay, metrics; settings; the secret never shows."""

from __future__ import annotations

import base64
import functools
import logging
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from service.cli import app as cli
from service.config import ConfigError, Settings, load_settings
from service.doctor import probes
from service.doctor.checks import State
from service.doctor.checks import exit_status as probes_exit
from service.testing import FakePlatform, seed_conversations
from service.web import app as app_module
from service.web.app import create_app
from tests.support import webhooks
from tests.support.forwarding import (
    FORWARD_SECRET,
    Receiver,
    by_revision,
    quick_timing,
    receiving,
    wait_until,
)
from tests.support.live import free_port, live_server
from tests.support.reconcile import reconcile

READ, ADMIN = "read-token", "admin-token"
NATS_URL = "nats://127.0.0.1:4222"  # the NATS server with JetStream the test machines run
KEY = "forward-key"


def forwarding_settings(database_url: str, tmp_path: Path, url: str, **extra: Any) -> Settings:
    return Settings(
        database_url=database_url,
        webhook_secrets=webhooks.SECRET,
        data_dir=tmp_path / "data",
        api_tokens=READ,
        admin_tokens=ADMIN,
        forward_urls=url,
        forward_secret=FORWARD_SECRET,
        _env_file=None,  # type: ignore[call-arg]
        **extra,
    )


def post(base: str, event: dict[str, Any]) -> httpx.Response:
    body = webhooks.encode(event)
    return httpx.post(f"{base}/webhooks/elevenlabs", content=body, headers=webhooks.signed_headers(body))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_serve_forwards_webhooks_and_backfills_once_each(
    engine: Engine, database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, tiny_retry_waits: None
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver = Receiver()
    # Credentials in the URL reach the endpoint but never a label, an answer or a metric.
    with receiving(receiver) as hook:
        url = hook.replace("http://", "http://user:hunter2@") + "?token=sekrit"
        settings = forwarding_settings(database_url, tmp_path, url, elevenlabs_api_key=KEY)
        platform = FakePlatform(api_key=KEY, conversations=seed_conversations(4, ("agent_b",), now=int(time.time())))
        with live_server(create_app(settings)) as base, platform.serve() as fake_url:
            event = webhooks.transcription("conv_hooked")
            assert post(base, event).json()["status"] == "accepted"
            assert post(base, event).json()["status"] == "duplicate"  # the same body again: no new event
            assert post(base, webhooks.failure("conv_failed")).status_code == 200
            assert reconcile(settings, fake_url, KEY, "--since", "7d").exit_code == 0  # backfills 4
            wait_until(lambda: _settled(base), what="every event delivered")
            status = httpx.get(f"{base}/v1/forward", headers=bearer(READ)).json()
            metrics = httpx.get(f"{base}/metrics").text
            answers = [status, metrics]
    order = by_revision(receiver.keys())
    backfilled = {conversation.conversation_id for conversation in platform.all()}
    assert set(order) == {"conv_hooked", "conv_failed", *backfilled}
    assert order["conv_hooked"] == [1]  # the duplicate added nothing
    for revisions in order.values():  # once each, in order, no gap (a backfill stores a summary, then the detail)
        assert revisions == list(range(1, len(revisions) + 1))
    assert receiver.unverified == 0
    (sink,) = status["sinks"]
    assert sink["sink"] == hook  # no userinfo, no query
    assert sink["pending"] == 0 and sink["dead"] == 0 and sink["last_success_at"] and sink["last_error"] is None
    assert f'postcall_forward_backlog{{sink="{hook}"}} 0.0' in metrics
    delivered = len(receiver.keys())
    assert f'postcall_forward_attempts_total{{outcome="delivered",sink="{hook}"}} {delivered}.0' in metrics
    assert "postcall_forward_delivery_seconds_bucket" in metrics
    for text in [*map(str, answers), caplog.text]:
        assert FORWARD_SECRET not in text and FORWARD_SECRET[6:] not in text
        assert "hunter2" not in text and "sekrit" not in text


def test_serve_sends_a_webhook_on_as_soon_as_it_is_committed(
    engine: Engine, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dispatcher that would look for new events only once an hour: what it sends, the receiver's commit woke.
    hourly = functools.partial(app_module.Dispatcher, timing=quick_timing(poll=3600.0))
    monkeypatch.setattr(app_module, "Dispatcher", hourly)
    receiver = Receiver()
    with receiving(receiver) as hook:
        settings = forwarding_settings(database_url, tmp_path, hook)
        with live_server(create_app(settings)) as base:
            time.sleep(0.5)  # the dispatcher's first look, at start, has found nothing
            assert post(base, webhooks.transcription("conv_woken")).json()["status"] == "accepted"
            wait_until(lambda: receiver.keys() == [("conv_woken", 1)], timeout=15, what="the event sent on")


def test_replay_over_http_needs_an_admin_token_and_checks_its_body(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    receiver = Receiver()
    with receiving(receiver) as hook:
        settings = forwarding_settings(database_url, tmp_path, hook)
        with live_server(create_app(settings)) as base:
            assert post(base, webhooks.transcription("conv_again")).status_code == 200
            wait_until(lambda: len(receiver.keys()) == 1, what="the first delivery")
            replay = f"{base}/v1/forward/replay"
            assert httpx.post(replay, json={"since": "1h"}, headers=bearer(READ)).status_code == 403
            assert httpx.post(replay, json={"since": "1h"}).status_code == 401
            for body, field in [
                ({}, "since"),
                ({"since": "yesterday"}, "since"),
                ({"since": "1h", "sink": "http://elsewhere/hook"}, "sink"),
                ({"since": "1h", "extra": 1}, "extra"),
                ([], "body"),
            ]:
                answer = httpx.post(replay, json=body, headers=bearer(ADMIN))
                assert answer.status_code == 422 and answer.json()["field"] == field, body
            assert httpx.post(replay, content=b"{", headers=bearer(ADMIN)).status_code == 422
            wait_until(lambda: _settled(base), what="the delivery recorded")
            answer = httpx.post(replay, json={"since": "1h", "sink": hook}, headers=bearer(ADMIN))
            assert answer.status_code == 200 and answer.json()["replayed"] == 1
            wait_until(lambda: len(receiver.keys()) == 2, what="the replay")
    assert receiver.ids()[0] == receiver.ids()[1]


def _settled(base: str) -> bool:
    status = httpx.get(f"{base}/v1/forward", headers=bearer(READ)).json()
    return bool(status["sinks"][0]["pending"] == 0)


def test_forward_urls_without_a_secret_stop_at_start_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTCALL_FORWARD_URLS", "https://hooks.example.com/postcall")
    monkeypatch.delenv("POSTCALL_FORWARD_SECRET", raising=False)
    with pytest.raises(ConfigError, match=r"^POSTCALL_FORWARD_SECRET: .*required with POSTCALL_FORWARD_URLS"):
        load_settings(_env_file=None)
    result = CliRunner().invoke(cli, ["forward"], env={"POSTCALL_FORWARD_URLS": "https://hooks.example.com/p"})
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "postcall: POSTCALL_FORWARD_SECRET: Value error, is required with POSTCALL_FORWARD_URLS"
    ]


@pytest.mark.parametrize(
    "secret",
    ["not-whsec", "whsec_!!!", "whsec_" + base64.b64encode(b"short").decode()],
)
def test_a_malformed_forward_secret_is_refused_without_being_shown(secret: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(_env_file=None, forward_urls="https://h.example/p", forward_secret=secret)
    assert str(refused.value).startswith("POSTCALL_FORWARD_SECRET")
    assert secret not in str(refused.value)


def test_retention_and_nats_settings() -> None:
    settings = load_settings(_env_file=None, events_retention="12h", forward_nats_url="nats://127.0.0.1:4222")
    assert settings.events_retention == 12 * 3600
    for field, value in [
        ("events_retention", "forever"),
        ("forward_nats_url", "http://x"),
        ("forward_nats_stream", "a.b"),
    ]:
        with pytest.raises(ConfigError, match=f"POSTCALL_{field.upper()}"):
            load_settings(_env_file=None, **{field: value})


def test_an_endpoint_whose_name_cannot_key_a_row_is_refused_at_start() -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    fits = "https://hooks.example.com/" + "p" * 200 + "?token=" + "t" * 400  # the query is not part of the name
    load_settings(_env_file=None, forward_urls=fits, forward_secret=secret)
    with pytest.raises(ConfigError, match=r"^POSTCALL_FORWARD_URLS: .*longer than 256 characters"):
        load_settings(_env_file=None, forward_urls="https://hooks.example.com/" + "p" * 240, forward_secret=secret)


def test_doctor_says_which_forwarding_sink_it_cannot_reach_without_showing_credentials(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    with receiving(Receiver()) as hook:
        up = hook.replace("http://", "http://user:hunter2@") + "?token=sekrit"
        down, nats_down = f"http://127.0.0.1:{closed}/hook", f"nats://127.0.0.1:{free_port()}"
        settings = forwarding_settings("sqlite://", tmp_path, f"{up},{down}", forward_nats_url=nats_down)
        lines = anyio.run(probes.forwarding, settings)
        reachable_nats = anyio.run(
            probes.forwarding, forwarding_settings("sqlite://", tmp_path, hook, forward_nats_url=NATS_URL)
        )
    assert [(line.state, line.check) for line in lines] == [
        (State.OK, f"forwarding to {hook}"),
        (State.FAIL, f"forwarding to {down}"),
        (State.FAIL, f"forwarding to {nats_down}"),
    ]
    assert "cannot reach it" in lines[1].text
    assert [line.state for line in reachable_nats] == [State.OK, State.OK]
    assert probes_exit(lines) == 1 and probes_exit(reachable_nats) == 0
    for line in lines:
        assert "hunter2" not in str(line) and "sekrit" not in str(line)
