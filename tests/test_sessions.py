"""POST /v1/sessions through the real app, against an ElevenLabs stand-in served over real HTTP.

The stand-in here is deliberately tiny — it answers the two session endpoints with whatever a test scripts —
so that every upstream failure (401/403/404/429/5xx, garbage, an unreachable host) can be pinned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from service import elevenlabs
from service.broker import sessions
from service.config import Settings
from service.testing import FakePlatform, WebhookSender
from service.web.app import create_app
from tests.support import webhooks as wh
from tests.support.databases import migrated_sqlite
from tests.support.live import free_port, live_server
from tests.support.reconcile import reconcile
from tests.support.records import get_record
from tests.test_session_token import livekit_claims, make_token

API_KEY = "xi-secret-key-0123456789"
DRIP_SECONDS = 30
AUTH = {"Authorization": "Bearer test-token"}


@dataclass
class Upstream:
    """Answers the token and signed-URL endpoints; remembers every request it saw."""

    replies: dict[str, Response] = field(default_factory=dict)
    seen: list[tuple[str, dict[str, str], dict[str, str]]] = field(default_factory=list)

    async def handle(self, request: Request) -> Response:
        self.seen.append((request.url.path, dict(request.query_params), dict(request.headers)))
        reply = self.replies.get(request.url.path)
        if reply is not None:
            return reply
        if request.url.path.endswith("/token"):
            return JSONResponse({"token": make_token(livekit_claims("room_conv_abc123XYZ"))})
        signed = "wss://api.elevenlabs.io/v1/convai/conversation?agent_id=a&conversation_signature=s"
        return JSONResponse({"signed_url": signed, "conversation_id": "conv_ws789"})

    def app(self) -> Starlette:
        paths = (elevenlabs.TOKEN_PATH, elevenlabs.SIGNED_URL_PATH)
        return Starlette(routes=[Route(path, self.handle) for path in paths])


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[tuple[Upstream, str]]:
    upstream = Upstream()
    with live_server(upstream.app()) as url:
        yield upstream, url


@pytest.fixture
def upstream(upstream_server: tuple[Upstream, str]) -> Iterator[Upstream]:
    stand_in, _ = upstream_server
    yield stand_in
    stand_in.replies.clear()
    stand_in.seen.clear()


def sqlite_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """For answers that store nothing (errors, validation): one SQLite database is enough."""
    values: dict[str, Any] = {"api_tokens": "test-token", **overrides}
    return Settings(
        database_url=migrated_sqlite(str(tmp_path / "postcall.db")),
        data_dir=tmp_path / "data",
        _env_file=None,  # type: ignore[call-arg]
        **values,
    )


def broker_settings(settings: Settings, base_url: str, **overrides: Any) -> Settings:
    return settings.model_copy(
        update={"elevenlabs_base_url": base_url, "elevenlabs_api_key": SecretStr(API_KEY), **overrides}
    )


@pytest.fixture
def client(settings: Settings, engine: Engine, upstream_server: tuple[Upstream, str]) -> Iterator[TestClient]:
    """The app on a real database (SQLite and PostgreSQL), talking to the stand-in."""
    with TestClient(create_app(broker_settings(settings, upstream_server[1]), engine=engine)) as client:
        yield client


@pytest.fixture
def light_client(tmp_path: Path, upstream_server: tuple[Upstream, str]) -> Iterator[TestClient]:
    """For answers that store nothing (errors, validation): one SQLite database is enough."""
    settings = sqlite_settings(tmp_path)
    with TestClient(create_app(broker_settings(settings, upstream_server[1]))) as client:
        yield client


def create(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/sessions", json={"agent_id": "agent_1", "transport": "webrtc", **body}, headers=AUTH)


def stored(engine: Engine, conversation_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        return get_record(conn, conversation_id)


# --- happy paths -----------------------------------------------------------------------------------------------


def test_webrtc_session_is_answered_and_recorded_at_once(
    client: TestClient, engine: Engine, upstream: Upstream
) -> None:
    answer = create(
        client,
        participant_name="Ada",
        branch_id="br_1",
        environment="staging",
        user_id="user-7",
        labels={"ticket": "T-1", "team": "support"},
    )
    assert answer.status_code == 200, answer.text
    token = answer.json()["token"]
    assert answer.json() == {"conversation_id": "conv_abc123XYZ", "token": token, "agent_id": "agent_1"}
    assert token == make_token(livekit_claims("room_conv_abc123XYZ"))  # handed on untouched
    path, params, headers = upstream.seen[-1]
    assert path == elevenlabs.TOKEN_PATH
    assert params == {"agent_id": "agent_1", "participant_name": "Ada", "branch_id": "br_1", "environment": "staging"}
    assert headers["xi-api-key"] == API_KEY
    record = stored(engine, "conv_abc123XYZ")
    assert record is not None
    assert record["status"] == "initiated"
    assert record["first_seen_via"] == "session"
    assert (record["agent_id"], record["user_id"], record["branch_id"]) == ("agent_1", "user-7", "br_1")
    assert record["labels"] == {"ticket": "T-1", "team": "support"}
    assert record["complete"] is False


def test_websocket_session_asks_for_the_id_and_reads_it(client: TestClient, engine: Engine, upstream: Upstream) -> None:
    answer = create(client, transport="websocket", participant_name="ignored for websocket")
    assert answer.status_code == 200, answer.text
    assert answer.json()["conversation_id"] == "conv_ws789"
    assert answer.json()["signed_url"].startswith("wss://")
    assert "token" not in answer.json()
    path, params, _ = upstream.seen[-1]
    assert path == elevenlabs.SIGNED_URL_PATH
    assert params == {"agent_id": "agent_1", "include_conversation_id": "true"}
    assert stored(engine, "conv_ws789") is not None


def test_websocket_id_may_come_from_the_signed_url_query(light_client: TestClient, upstream: Upstream) -> None:
    signed = (
        "wss://api.elevenlabs.io/v1/convai/conversation?agent_id=a&conversation_signature=s&conversation_id=conv_q1"
    )
    upstream.replies[elevenlabs.SIGNED_URL_PATH] = JSONResponse({"signed_url": signed})
    assert create(light_client, transport="websocket").json()["conversation_id"] == "conv_q1"


def test_room_without_conv_part_gives_the_whole_room_name(
    client: TestClient, engine: Engine, upstream: Upstream
) -> None:
    upstream.replies[elevenlabs.TOKEN_PATH] = JSONResponse({"token": make_token(livekit_claims("lk-room-5f2a"))})
    answer = create(client)
    assert answer.status_code == 200
    assert answer.json()["conversation_id"] == "lk-room-5f2a"
    assert stored(engine, "lk-room-5f2a") is not None


def test_malformed_token_answers_null_id_and_warns_once(
    client: TestClient,
    engine: Engine,
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sessions, "_unrecognized_warned", False)
    upstream.replies[elevenlabs.TOKEN_PATH] = JSONResponse({"token": "opaque-token-of-a-new-shape"})
    with caplog.at_level(logging.WARNING, logger="postcall.sessions"):
        answers = [create(client), create(client)]
    for answer in answers:
        assert answer.status_code == 200
        assert answer.json() == {"conversation_id": None, "token": "opaque-token-of-a-new-shape", "agent_id": "agent_1"}
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM conversation").scalar_one() == 0


def test_session_then_webhook_is_one_record_with_labels_kept(client: TestClient, engine: Engine) -> None:
    conversation_id = create(client, user_id="user-7", labels={"ticket": "T-1"}).json()["conversation_id"]
    body = wh.encode(wh.transcription(conversation_id, user_id="user-7"))
    assert client.post("/webhooks/elevenlabs", content=body, headers=wh.signed_headers(body)).status_code == 200
    record = stored(engine, conversation_id)
    assert record is not None
    assert record["status"] == "done"
    assert record["labels"] == {"ticket": "T-1"}
    assert record["first_seen_via"] == "session"
    assert record["webhook_received_at"] is not None
    assert record["transcript_summary"] == "A short test call."
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM conversation").scalar_one() == 1


# --- end to end, against the fake ElevenLabs platform --------------------------------------------------------


def test_a_webrtc_session_is_the_conversation_the_platform_lists_and_reports(
    settings: Settings, engine: Engine
) -> None:
    platform = FakePlatform(api_key=API_KEY, agents=("agent_e2e",))
    body = {"agent_id": "agent_e2e", "transport": "webrtc", "user_id": "user-e2e", "labels": {"ticket": "T-9"}}
    with (
        platform.serve() as fake_url,
        live_server(create_app(broker_settings(settings, fake_url))) as postcall,
        httpx.Client(base_url=postcall, headers=AUTH, timeout=30) as http,
    ):
        answer = http.post("/v1/sessions", json=body)
        assert answer.status_code == 200, answer.text
        conversation_id = answer.json()["conversation_id"]
        assert [c.conversation_id for c in platform.all()] == [conversation_id]  # the id the platform minted

        # Queryable the moment the session exists, before the call has even started.
        found = http.get("/v1/conversations", params={"label.ticket": "T-9"}).json()["conversations"]
        assert [(c["conversation_id"], c["status"], c["first_seen_via"]) for c in found] == [
            (conversation_id, "initiated", "session")
        ]

        platform.complete(conversation_id)  # the call happens and ends
        listed = httpx.get(
            f"{fake_url}/v1/convai/conversations", params={"agent_id": "agent_e2e"}, headers={"xi-api-key": API_KEY}
        ).json()["conversations"]
        assert [(c["conversation_id"], c["status"]) for c in listed] == [(conversation_id, "done")]

        sent = WebhookSender(f"{postcall}/webhooks/elevenlabs", wh.SECRET).send(
            platform.transcription_event(conversation_id)
        )
        assert (sent.status, sent.conversation_id) == (200, conversation_id)
        run = reconcile(settings, fake_url, API_KEY, "--agent", "agent_e2e", "--until", str(int(time.time()) + 3600))
        assert run.exit_code == 0, run.stderr

        record = http.get(f"/v1/conversations/{conversation_id}").json()
        by_label = http.get("/v1/conversations", params={"label.ticket": "T-9", "status": "done"}).json()

    assert record["status"] == "done"
    assert record["labels"] == {"ticket": "T-9"}
    assert record["user_id"] == "user-e2e"
    assert record["first_seen_via"] == "session"
    assert record["webhook_received_at"] is not None
    assert record["reconciled_at"] is not None
    assert record["complete"] is True
    assert record["transcript"] == platform.get(conversation_id).transcript()
    assert [c["conversation_id"] for c in by_label["conversations"]] == [conversation_id]
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM conversation").scalar_one() == 1


def test_a_websocket_session_is_the_conversation_the_platform_minted(settings: Settings, engine: Engine) -> None:
    platform = FakePlatform(api_key=API_KEY, agents=("agent_e2e",))
    with platform.serve() as fake_url, TestClient(create_app(broker_settings(settings, fake_url))) as client:
        answer = create(client, agent_id="agent_e2e", transport="websocket")
    assert answer.status_code == 200, answer.text
    assert [c.conversation_id for c in platform.all()] == [answer.json()["conversation_id"]]
    assert platform.calls_to("signed_url")[0].query["include_conversation_id"] == "true"
    assert stored(engine, answer.json()["conversation_id"]) is not None


def test_an_agent_the_platform_does_not_know_is_a_404(tmp_path: Path) -> None:
    platform = FakePlatform(api_key=API_KEY, agents=("agent_e2e",))
    settings = sqlite_settings(tmp_path)
    with platform.serve() as fake_url, TestClient(create_app(broker_settings(settings, fake_url))) as client:
        answer = create(client, agent_id="agent_nobody")
    assert answer.status_code == 404
    assert answer.json()["upstream_reason"] == "Agent agent_nobody not found"


# --- ElevenLabs failures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream_status", "body", "expected", "reason"),
    [
        (401, {"detail": {"status": "invalid_api_key", "message": "Invalid API key"}}, 502, "Invalid API key"),
        (403, {"detail": {"status": "missing_permissions", "message": "missing convai_write"}}, 502, "convai_write"),
        (404, {"detail": {"status": "agent_not_found", "message": "Agent agent_1 not found"}}, 404, "not found"),
        (429, {"detail": {"status": "too_many_concurrent_requests", "message": "Slow down"}}, 503, "Slow down"),
        (500, {"detail": "Internal Server Error"}, 503, "Internal Server Error"),
        (503, None, 503, "Service Unavailable"),
        (422, {"detail": [{"loc": ["query", "agent_id"], "msg": "field required"}]}, 502, "field required"),
    ],
)
def test_upstream_errors_map_to_clear_answers(
    light_client: TestClient,
    upstream: Upstream,
    upstream_status: int,
    body: Any,
    expected: int,
    reason: str,
) -> None:
    reply = JSONResponse(body, upstream_status) if body is not None else Response("down", upstream_status)
    upstream.replies[elevenlabs.TOKEN_PATH] = reply
    answer = create(light_client)
    assert answer.status_code == expected
    assert answer.json()["upstream_status"] == upstream_status
    assert reason in answer.json()["upstream_reason"]
    assert reason in answer.json()["error"]


def test_retry_after_is_passed_on_with_a_429(light_client: TestClient, upstream: Upstream) -> None:
    upstream.replies[elevenlabs.TOKEN_PATH] = JSONResponse({"detail": "busy"}, 429, headers={"Retry-After": "7"})
    answer = create(light_client)
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "7"


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (Response("<html>ok</html>", 200), "not a JSON object"),
        (JSONResponse({"tok": "x"}), "has no 'token'"),
        (JSONResponse({"token": ""}), "has no 'token'"),
    ],
)
def test_unreadable_success_is_a_bad_gateway(
    light_client: TestClient, upstream: Upstream, reply: Response, reason: str
) -> None:
    upstream.replies[elevenlabs.TOKEN_PATH] = reply
    answer = create(light_client)
    assert answer.status_code == 502
    assert reason in answer.json()["error"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"token": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not JSON"),
        (b'{"token": "x", "extra": ' + b"[" * 200 + b"]" * 200 + b"}", "nested deeper than"),
        (b'{"token": "' + b"x" * (2 * 1024 * 1024) + b'"}', "larger than 1048576 bytes"),
    ],
    ids=["deeper-than-the-parser-goes", "deeper-than-postcall-stores", "2-MiB"],
)
def test_an_answer_too_deep_or_too_large_is_a_bad_gateway(
    light_client: TestClient, upstream: Upstream, body: bytes, reason: str
) -> None:
    upstream.replies[elevenlabs.TOKEN_PATH] = Response(body, media_type="application/json")
    answer = create(light_client)
    assert answer.status_code == 502, answer.text
    assert reason in answer.json()["upstream_reason"]


def test_a_failing_elevenlabs_is_asked_once_the_caller_decides_when_to_retry(
    light_client: TestClient, upstream: Upstream
) -> None:
    """A token request mints a conversation: a retry after a lost answer would mint a second one."""
    upstream.replies[elevenlabs.TOKEN_PATH] = JSONResponse({"detail": "overloaded"}, 503, headers={"Retry-After": "2"})
    answer = create(light_client)
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "2"
    assert len(upstream.seen) == 1


def test_a_dripping_elevenlabs_is_cut_off_at_the_deadline(
    tmp_path: Path, upstream: Upstream, upstream_server: tuple[Upstream, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each byte arrives within the read timeout, so only an overall deadline ends the call (here 1 s, not 10)."""

    async def drip() -> AsyncIterator[bytes]:
        yield b'{"token": "'
        for _ in range(DRIP_SECONDS * 5):
            await anyio.sleep(0.2)
            yield b"x"
        yield b'"}'

    upstream.replies[elevenlabs.TOKEN_PATH] = StreamingResponse(drip(), media_type="application/json")
    monkeypatch.setattr(sessions, "DEADLINE_SECONDS", 1.0)
    started = time.monotonic()
    with TestClient(create_app(broker_settings(sqlite_settings(tmp_path), upstream_server[1]))) as client:
        answer = create(client)
    assert answer.status_code == 503, answer.text
    assert "did not answer within 1 s" in answer.json()["error"]
    assert time.monotonic() - started < DRIP_SECONDS  # a bound: without the deadline the drip ends after 30 s


def test_unreachable_elevenlabs_is_unavailable(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path)
    closed_port = f"http://127.0.0.1:{free_port()}"
    with TestClient(create_app(broker_settings(settings, closed_port))) as client:
        answer = create(client)
    assert answer.status_code == 503
    assert "cannot reach ElevenLabs" in answer.json()["error"]


def test_missing_api_key_says_the_broker_is_not_configured(tmp_path: Path, upstream: Upstream) -> None:
    settings = sqlite_settings(tmp_path)
    with TestClient(create_app(settings)) as client:
        answer = create(client)
    assert answer.status_code == 503
    assert "POSTCALL_ELEVENLABS_API_KEY" in answer.json()["error"]
    assert upstream.seen == []


def test_api_key_never_leaves_the_server(
    light_client: TestClient, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    # An upstream that echoes the key back in its error must not make us echo it further.
    upstream.replies[elevenlabs.TOKEN_PATH] = JSONResponse({"detail": f"key {API_KEY} is not valid"}, 401)
    with caplog.at_level(logging.DEBUG):
        answers = [create(light_client), create(light_client, transport="websocket")]
    upstream.replies.clear()
    with caplog.at_level(logging.DEBUG):
        answers.append(create(light_client))
    assert [a.status_code for a in answers] == [502, 200, 200]
    assert "[api key]" in answers[0].json()["error"]
    for answer in answers:
        assert API_KEY not in answer.text
        assert API_KEY not in str(answer.headers)
    assert API_KEY not in caplog.text
    assert all(API_KEY not in str(record.__dict__) for record in caplog.records)


# --- the request body ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"transport": "webrtc"}, "agent_id"),
        ({"agent_id": "", "transport": "webrtc"}, "agent_id"),
        ({"agent_id": 5, "transport": "webrtc"}, "agent_id"),
        ({"agent_id": "a" * 257, "transport": "webrtc"}, "agent_id"),
        ({"agent_id": "agent_1"}, "transport"),
        ({"agent_id": "agent_1", "transport": "sip"}, "transport"),
        ({"agent_id": "agent_1", "transport": ["webrtc"]}, "transport"),
        ({"agent_id": "agent_1", "transport": {"kind": "webrtc"}}, "transport"),
        ({"agent_id": "agent_1", "transport": "webrtc", "user_id": 7}, "user_id"),
        ({"agent_id": "agent_1", "transport": "webrtc", "branch_id": ""}, "branch_id"),
        ({"agent_id": "agent_1", "transport": "webrtc", "labels": ["a"]}, "labels"),
        ({"agent_id": "agent_1", "transport": "webrtc", "labels": {"k": 1}}, "labels.k"),
        ({"agent_id": "agent_1", "transport": "webrtc", "labels": {"": "v"}}, "labels"),
        ({"agent_id": "agent_1", "transport": "webrtc", "userId": "u"}, "userId"),
        (["agent_1"], "body"),
    ],
)
def test_bad_bodies_are_refused_naming_the_field(
    light_client: TestClient, upstream: Upstream, body: Any, field: str
) -> None:
    answer = light_client.post("/v1/sessions", json=body, headers=AUTH)
    assert answer.status_code == 422
    assert answer.json()["field"] == field
    assert answer.json()["error"].startswith(field)
    assert upstream.seen == []


@pytest.mark.parametrize(
    ("labels", "field"),
    [({"ticket": "T-\x001"}, "labels.ticket"), ({"tick\x00et": "T-1"}, "labels")],
    ids=["in-a-value", "in-a-name"],
)
def test_a_label_holding_nul_is_refused_before_elevenlabs_is_asked(
    client: TestClient, engine: Engine, upstream: Upstream, labels: dict[str, str], field: str
) -> None:
    """PostgreSQL cannot store NUL: refused at the door, before ElevenLabs mints a conversation nobody records."""
    answer = create(client, labels=labels)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field
    assert "NUL" in answer.json()["error"]
    assert upstream.seen == []
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM conversation").scalar_one() == 0


def test_a_body_that_is_not_json_is_refused(light_client: TestClient) -> None:
    answer = light_client.post(
        "/v1/sessions", content=b"{agent_id", headers={**AUTH, "content-type": "application/json"}
    )
    assert answer.status_code == 422
    assert answer.json()["field"] == "body"


def test_an_oversized_body_is_refused(light_client: TestClient) -> None:
    answer = light_client.post("/v1/sessions", content=b" " * (300 * 1024), headers=AUTH)
    assert answer.status_code == 413


# --- auth ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdA=="}])
def test_a_missing_or_wrong_bearer_token_is_refused(
    light_client: TestClient, upstream: Upstream, headers: dict[str, str]
) -> None:
    answer = light_client.post("/v1/sessions", json={"agent_id": "agent_1", "transport": "webrtc"}, headers=headers)
    assert answer.status_code == 401
    assert upstream.seen == []


def test_without_api_tokens_the_broker_is_off(tmp_path: Path, upstream_server: tuple[Upstream, str]) -> None:
    upstream, base_url = upstream_server
    settings = sqlite_settings(tmp_path, api_tokens="")
    with TestClient(create_app(broker_settings(settings, base_url))) as client:
        answer = create(client)
    assert answer.status_code == 403
    assert "POSTCALL_API_TOKENS" in answer.json()["error"]
    assert upstream.seen == []
