"""Admin tokens (`POSTCALL_ADMIN_TOKENS`): they can do all a read token can, and only they reach admin routes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from service.api.auth import ADMIN_HINT, ApiDisabled, Caller, Unauthorized, identify
from service.config import Settings
from service.storage.db import create_engine
from service.storage.migrations import upgrade
from service.web.app import create_app
from service.web.state import AppState
from tests.support import records
from tests.support.reconcile import rows

READ = "read-token"
ADMIN, ADMIN_2 = "admin-token", "second-admin-token"
MakeClient = Callable[[str, str], TestClient]  # (POSTCALL_API_TOKENS, POSTCALL_ADMIN_TOKENS) → a running app
READ_URLS = ["/v1/conversations", "/v1/conversations/conv_1", "/v1/conversations/conv_1/audio", "/v1/reconcile/runs"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[MakeClient]:
    clients: list[TestClient] = []

    def make(api_tokens: str, admin_tokens: str) -> TestClient:
        settings = Settings(
            database_url=f"sqlite:///{tmp_path}/admin-{len(clients)}.db",
            data_dir=tmp_path / "data",
            api_tokens=api_tokens,
            admin_tokens=admin_tokens,
            _env_file=None,
        )
        engine = create_engine(settings.database_url)
        upgrade(engine)
        records.store(engine, [records.detail("conv_1"), records.audio("conv_1", settings.data_dir, b"ID3 mp3")])
        engine.dispose()
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.mark.parametrize("url", READ_URLS)
def test_an_admin_token_can_do_all_a_read_token_can(make_client: MakeClient, url: str) -> None:
    client = make_client(READ, f"{ADMIN},{ADMIN_2}")
    as_reader = client.get(url, headers=bearer(READ))
    assert as_reader.status_code == 200
    for token in (ADMIN, ADMIN_2):
        as_admin = client.get(url, headers=bearer(token))
        assert (as_admin.status_code, as_admin.content) == (200, as_reader.content)


def test_the_broker_takes_an_admin_token_too(make_client: MakeClient) -> None:
    client = make_client(READ, ADMIN)
    answer = client.post("/v1/sessions", json={"agent_id": "a", "transport": "webrtc"}, headers=bearer(ADMIN))
    # Past the token check: the broker itself is not configured here (no ElevenLabs key).
    assert answer.status_code == 503
    assert "POSTCALL_ELEVENLABS_API_KEY" in answer.json()["error"]


@pytest.mark.parametrize("url", READ_URLS)
def test_with_only_admin_tokens_configured_the_read_api_is_on_for_them(make_client: MakeClient, url: str) -> None:
    client = make_client("", ADMIN)
    assert client.get(url, headers=bearer(ADMIN)).status_code == 200
    refused = client.get(url, headers=bearer(READ))
    assert refused.status_code == 401  # a token is configured, this is not one of them
    assert client.get(url).status_code == 401


@pytest.mark.parametrize("url", READ_URLS)
def test_with_no_token_of_either_kind_the_api_is_403_naming_both_settings(make_client: MakeClient, url: str) -> None:
    client = make_client("", "")
    answer = client.get(url, headers=bearer(ADMIN))
    assert answer.status_code == 403
    assert "POSTCALL_API_TOKENS" in answer.json()["error"]
    assert "POSTCALL_ADMIN_TOKENS" in answer.json()["error"]


def test_a_read_token_on_an_admin_route_is_403_and_changes_nothing(make_client: MakeClient) -> None:
    client = make_client(READ, ADMIN)
    answer = client.delete("/v1/conversations/conv_1", headers=bearer(READ))
    assert (answer.status_code, answer.json()) == (403, {"error": ADMIN_HINT})
    assert client.get("/v1/conversations/conv_1", headers=bearer(READ)).status_code == 200
    assert client.delete("/v1/conversations/conv_1", headers=bearer("wrong")).status_code == 401
    assert client.delete("/v1/conversations/conv_1").status_code == 401
    assert client.get("/v1/conversations/conv_1/audio", headers=bearer(READ)).status_code == 200


def test_without_admin_tokens_an_admin_route_says_how_to_enable_them(make_client: MakeClient) -> None:
    client = make_client(READ, "")
    answer = client.delete("/v1/conversations/conv_1", headers=bearer(READ))
    assert answer.status_code == 403
    assert "POSTCALL_ADMIN_TOKENS" in answer.json()["error"]
    assert client.get("/v1/conversations/conv_1", headers=bearer(READ)).status_code == 200


def test_the_erase_log_names_the_admin_token_by_position_and_no_log_shows_a_token(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(READ, f"{ADMIN},{ADMIN_2}")
    with caplog.at_level(logging.DEBUG):
        assert client.delete("/v1/conversations/conv_1", headers=bearer(READ)).status_code == 403
        assert client.delete("/v1/conversations/conv_1", headers=bearer(ADMIN_2)).status_code == 204
    state: AppState = client.app.state.postcall  # type: ignore[attr-defined]
    [entry] = rows(state.engine, "erase_log")
    assert entry["actor"] == "admin token 2"
    assert "admin token 2" in caplog.text
    for token in (READ, ADMIN, ADMIN_2):
        assert token not in caplog.text
        assert token not in repr(entry)


def test_identify_names_a_caller_by_kind_and_position_never_by_the_token() -> None:
    read, admin = [b"r1", b"r2"], [b"a1", b"a2"]
    assert identify("Bearer a2", read, admin) == Caller(admin=True, name="admin token 2")
    assert identify("Bearer r1", read, admin) == Caller(admin=False, name="read token 1")
    assert identify("bearer r2", read, []) == Caller(admin=False, name="read token 2")
    assert identify("Bearer a1", [], admin) == Caller(admin=True, name="admin token 1")
    # A token configured as both kinds is an admin token.
    assert identify("Bearer both", [b"both"], [b"both"]) == Caller(admin=True, name="admin token 1")
    with pytest.raises(Unauthorized):
        identify("Bearer a3", read, admin)
    with pytest.raises(Unauthorized):
        identify(None, read, admin)
    with pytest.raises(ApiDisabled):
        identify("Bearer a1", [], [])
