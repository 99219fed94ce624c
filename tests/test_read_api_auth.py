"""Bearer tokens: the read API needs one; the webhook, health, metrics and OpenAPI endpoints never do."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from service.api.auth import ApiDisabled, Unauthorized, check_bearer
from service.config import Settings
from service.storage.db import create_engine
from service.storage.migrations import upgrade
from service.web.app import create_app

READ_URLS = ["/v1/conversations", "/v1/conversations/conv_1", "/v1/conversations/conv_1/audio", "/v1/reconcile/runs"]
OPEN_URLS = ["/healthz", "/readyz", "/metrics", "/openapi.json"]


def app_with(tmp_path: Path, tokens: str) -> TestClient:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/auth.db",
        data_dir=tmp_path / "data",
        api_tokens=tokens,
        _env_file=None,  # type: ignore[call-arg]
    )
    engine = create_engine(settings.database_url)
    upgrade(engine)
    engine.dispose()
    return TestClient(create_app(settings))


@pytest.mark.parametrize("url", READ_URLS)
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", "Bearer ", "Basic dGVzdC10b2tlbg==", "test-token", "Bearer test-token2", "Bearer test-toke"],
)
def test_a_missing_or_wrong_token_is_401(tmp_path: Path, url: str, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    with app_with(tmp_path, "test-token,other-token") as client:
        answer = client.get(url, headers=headers)
    assert answer.status_code == 401
    assert answer.json() == {"error": "missing or invalid bearer token"}
    assert answer.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("token", ["test-token", "other-token"])
def test_any_configured_token_is_accepted(tmp_path: Path, token: str) -> None:
    with app_with(tmp_path, "test-token,other-token") as client:
        assert client.get("/v1/conversations", headers={"Authorization": f"bearer {token}"}).status_code == 200


@pytest.mark.parametrize("url", READ_URLS)
def test_without_configured_tokens_the_read_api_is_403_saying_how_to_enable_it(tmp_path: Path, url: str) -> None:
    with app_with(tmp_path, "") as client:
        for headers in ({}, {"Authorization": "Bearer anything"}):
            answer = client.get(url, headers=headers)
            assert answer.status_code == 403
            assert "POSTCALL_API_TOKENS" in answer.json()["error"]


@pytest.mark.parametrize("url", OPEN_URLS)
@pytest.mark.parametrize("tokens", ["", "test-token"])
def test_health_metrics_and_openapi_need_no_token(tmp_path: Path, url: str, tokens: str) -> None:
    with app_with(tmp_path, tokens) as client:
        assert client.get(url).status_code == 200


def test_the_webhook_needs_no_token(tmp_path: Path) -> None:
    with app_with(tmp_path, "test-token") as client:
        # Refused for its signature, not for a missing bearer token.
        answer = client.post("/webhooks/elevenlabs", content=b"{}")
    assert answer.status_code == 401
    assert answer.json() == {"error": "invalid signature"}


def test_check_bearer_pure() -> None:
    check_bearer("Bearer b", [b"a", b"b"])
    with pytest.raises(ApiDisabled):
        check_bearer("Bearer b", [])
    with pytest.raises(Unauthorized):
        check_bearer("Bearer ünïcode", [b"a"])
