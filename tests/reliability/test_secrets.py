"""Secrets stay secret: no webhook secret, bearer token or ElevenLabs API key in the logs, the error bodies, the read
API or /metrics, even when ElevenLabs refuses a request and echoes the key back; credentials are compared in
constant time; and every route but the open ones asks for a bearer token.
"""

from __future__ import annotations

import hmac
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from service.config import Settings
from service.web.app import create_app
from service.webhook.signature import sign
from tests.support import webhooks as wh
from tests.support.databases import migrated_sqlite
from tests.support.live import live_server
from tests.support.process import serve_process
from tests.support.reconcile import Run, reconcile

# Distinctive random values: any 12 characters of one of them found anywhere is a leak, not a coincidence.
WEBHOOK_SECRETS = (f"wsec_{secrets.token_hex(16)}", f"wsec_{secrets.token_hex(16)}")
API_TOKENS = (f"tok_{secrets.token_hex(16)}", f"tok_{secrets.token_hex(16)}")
API_KEY = f"sk_{secrets.token_hex(20)}"
WRONG_TOKEN = f"tok_{secrets.token_hex(16)}"  # a presented credential is a credential too, right or wrong
LEAK_WINDOW = 12

OPEN_ROUTES = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/webhooks/elevenlabs"})


def leaks(text: str) -> list[str]:
    """The secrets of which some LEAK_WINDOW consecutive characters appear in `text`."""
    found = []
    for secret in (*WEBHOOK_SECRETS, *API_TOKENS, API_KEY, WRONG_TOKEN):
        windows = (secret[i : i + LEAK_WINDOW] for i in range(len(secret) - LEAK_WINDOW + 1))
        if any(window in text for window in windows):
            found.append(secret)
    return found


# --- an ElevenLabs that refuses and echoes -------------------------------------------------------------------------


@dataclass
class EchoingElevenLabs:
    """Answers every request with `status`, repeating the `xi-api-key` it was sent in its error message (as JSON
    ElevenLabs-style, or as plain text): the worst case for a service that passes upstream reasons on."""

    status: int = 401
    as_json: bool = True
    retry_after: str = "0"
    seen_keys: list[str] = field(default_factory=list)

    async def answer(self, request: Request) -> Response:
        key = request.headers.get("xi-api-key", "")
        self.seen_keys.append(key)
        echoed = f"Invalid API key {key} (sent to {request.url.path}); headers {dict(request.headers)}"
        headers = {"retry-after": self.retry_after}
        if self.as_json:
            body = {"detail": {"status": "invalid_api_key", "message": echoed}}
            return JSONResponse(body, status_code=self.status, headers=headers)
        return PlainTextResponse(echoed, status_code=self.status, headers=headers)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.answer)])


@contextmanager
def status_line_echo() -> Iterator[str]:
    """An ElevenLabs that puts the `xi-api-key` it was sent in its status line: `HTTP/1.1 401 Invalid API key <key>`.
    Raw sockets, because Python's HTTP servers write the standard reason phrase whatever the app wants."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)  # so that the accept loop sees `done`
    done = threading.Event()

    def answer(conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            lines = head.split(b"\r\n")
            key = next(
                (line.split(b":", 1)[1].strip() for line in lines if line.lower().startswith(b"xi-api-key:")), b""
            )
            body = b"refused"
            conn.sendall(
                b"HTTP/1.1 401 Invalid API key " + key + b"\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(10)
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        done.set()
        thread.join(timeout=5)
        listener.close()


# --- `postcall serve` with its logs kept ---------------------------------------------------------------------------


@dataclass
class Served:
    base_url: str
    log_path: Path
    answers: list[httpx.Response] = field(default_factory=list)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        answer = httpx.request(method, f"{self.base_url}{path}", timeout=30, **kwargs)
        self.answers.append(answer)
        return answer


@contextmanager
def serve_with_logs(tmp_path: Path, env: dict[str, str]) -> Iterator[Served]:
    """`python -m service serve` as a child process whose standard error (its JSON logs) goes to a file."""
    log_path = tmp_path / "serve.log"
    # cwd is the test's own directory, so that no `.env` of the checkout is read.
    with serve_process(env, log=log_path, cwd=tmp_path) as (url, _):
        yield Served(url, log_path)


def settings_for(tmp_path: Path, upstream_url: str) -> Settings:
    return Settings(
        database_url=migrated_sqlite(str(tmp_path / "postcall.db")),
        data_dir=tmp_path / "data",
        webhook_secrets=",".join(WEBHOOK_SECRETS),
        api_tokens=",".join(API_TOKENS),
        elevenlabs_api_key=API_KEY,
        elevenlabs_base_url=upstream_url,
        _env_file=None,  # type: ignore[call-arg]
    )


def env_of(settings: Settings) -> dict[str, str]:
    return {
        "POSTCALL_DATABASE_URL": settings.database_url,
        "POSTCALL_DATA_DIR": str(settings.data_dir),
        "POSTCALL_WEBHOOK_SECRETS": ",".join(WEBHOOK_SECRETS),
        "POSTCALL_API_TOKENS": ",".join(API_TOKENS),
        "POSTCALL_ELEVENLABS_API_KEY": API_KEY,
        "POSTCALL_ELEVENLABS_BASE_URL": settings.elevenlabs_base_url,
    }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refused_webhooks(served: Served) -> None:
    body = wh.encode(wh.transcription("conv_secret_1"))
    now = int(time.time())
    forged = sign(body, b"not-the-secret", now)
    for signature in (forged, WEBHOOK_SECRETS[0], f"t={now},v0={WEBHOOK_SECRETS[0]}", "", f"t={now - 86400}"):
        answer = served.request(
            "POST", "/webhooks/elevenlabs", content=body, headers={"ElevenLabs-Signature": signature}
        )
        assert answer.status_code == 401
    # Signed with the second (rotated-in) secret: accepted. Then correctly signed garbage: 400.
    accepted = served.request(
        "POST", "/webhooks/elevenlabs", content=body, headers=wh.signed_headers(body, WEBHOOK_SECRETS[1])
    )
    assert accepted.json()["status"] == "accepted"
    garbage = b"{not json"
    answer = served.request(
        "POST", "/webhooks/elevenlabs", content=garbage, headers=wh.signed_headers(garbage, WEBHOOK_SECRETS[0])
    )
    assert answer.status_code == 400


def refused_tokens(served: Served) -> None:
    for headers in (
        bearer(WRONG_TOKEN),
        bearer(API_TOKENS[0] + "x"),
        {"Authorization": API_TOKENS[0]},  # no scheme
        {"Authorization": f"Basic {API_TOKENS[0]}"},
        {"Authorization": f"Bearer {WEBHOOK_SECRETS[0]}"},
    ):
        assert served.request("GET", "/v1/conversations", headers=headers).status_code == 401
    assert served.request("GET", "/v1/conversations/conv_secret_1", headers=bearer(API_TOKENS[1])).status_code == 200


def refused_sessions(served: Served, upstream: EchoingElevenLabs) -> None:
    """The session broker meets an ElevenLabs that refuses (401, 404, 429, 500) and echoes the key back."""
    expected = {401: 502, 403: 502, 404: 404, 429: 503, 500: 503}
    for status, answer_status in expected.items():
        for as_json in (True, False):
            upstream.status, upstream.as_json = status, as_json
            for transport in ("webrtc", "websocket"):
                body = {"agent_id": "agent_secret", "transport": transport}
                answer = served.request("POST", "/v1/sessions", json=body, headers=bearer(API_TOKENS[0]))
                assert answer.status_code == answer_status, answer.text


def failed_reconciles(settings: Settings, upstream: EchoingElevenLabs) -> list[Run]:
    """`postcall reconcile` meets the same ElevenLabs: a 401 with the key in JSON, a 500 with it in plain text."""
    runs = []
    for status, as_json in ((401, True), (500, False)):
        upstream.status, upstream.as_json = status, as_json
        for args in ((), ("--agent", "agent_secret")):  # the agents listing, then an agent's conversations
            run = reconcile(settings, settings.elevenlabs_base_url, API_KEY, "--json", *args)
            assert run.exit_code == 1, run.stderr
            runs.append(run)
    return runs


@pytest.mark.usefixtures("tiny_retry_waits")  # reconcile retries the 500s without waiting
def test_no_secret_reaches_the_logs_error_bodies_read_api_or_metrics_when_everything_fails(tmp_path: Path) -> None:
    upstream = EchoingElevenLabs()
    with live_server(upstream.app()) as upstream_url:
        settings = settings_for(tmp_path, upstream_url)
        with serve_with_logs(tmp_path, env_of(settings)) as served:
            refused_webhooks(served)
            refused_tokens(served)
            refused_sessions(served, upstream)
            runs = failed_reconciles(settings, upstream)
            recorded = served.request("GET", "/v1/reconcile/runs", headers=bearer(API_TOKENS[0]))
            scraped = served.request("GET", "/metrics")
    assert upstream.seen_keys and set(upstream.seen_keys) == {API_KEY}  # the key did go out, and only there
    assert len(recorded.json()["runs"]) == len(runs)
    assert all(run["status"] == "failed" and run["error"] for run in recorded.json()["runs"])
    assert "postcall_webhooks_total" in scraped.text

    log_lines = served.log_path.read_text().splitlines()
    assert len(log_lines) > 50  # every request above was logged
    assert all(isinstance(json.loads(line), dict) for line in log_lines)  # JSON lines, nothing else
    assert leaks("\n".join(log_lines)) == [], "in the serve logs"
    for answer in served.answers:
        assert leaks(answer.text) == [], f"in the answer to {answer.request.method} {answer.request.url.path}"
        assert leaks(str(dict(answer.headers))) == [], f"in the headers of {answer.request.url.path}"
    for run in runs:
        assert leaks(run.stdout) == [], "in reconcile's summary"
        assert leaks(run.stderr) == [], "in reconcile's logs"


@pytest.mark.usefixtures("tiny_retry_waits")
def test_an_api_key_echoed_in_the_upstream_status_line_reaches_no_log_line_nor_answer(tmp_path: Path) -> None:
    """httpx logs each request's status line (`HTTP Request: GET … "HTTP/1.1 401 <reason>"`) on its own logger."""
    with status_line_echo() as upstream_url:
        settings = settings_for(tmp_path, upstream_url)
        with serve_with_logs(tmp_path, env_of(settings)) as served:
            for transport in ("webrtc", "websocket"):
                body = {"agent_id": "agent_secret", "transport": transport}
                answer = served.request("POST", "/v1/sessions", json=body, headers=bearer(API_TOKENS[0]))
                assert answer.status_code == 502, answer.text
                assert "Invalid API key" in answer.json()["upstream_reason"]
        run = reconcile(settings, upstream_url, API_KEY, "--json", "--agent", "agent_secret")

    log_text = served.log_path.read_text()
    assert "HTTP Request: GET" in log_text and "401 Invalid API key" in log_text  # the line was written, masked
    assert leaks(log_text) == [], "in the serve logs"
    for answer in served.answers:
        assert leaks(answer.text) == [] and leaks(str(dict(answer.headers))) == []
    assert run.exit_code == 1
    assert leaks(run.stdout) == [] and leaks(run.stderr) == []


@pytest.mark.parametrize(
    ("sent", "passed_on"),
    [
        ("7", "7"),
        ("3600", "3600"),
        ("3601", None),  # longer than an hour: no wait anyone should be told to sit out
        ("9" * 5000, None),
        ("1.5", None),
        ("-3", None),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", "0"),  # a date passed already: try again now
    ],
    ids=["seconds", "an-hour", "over-an-hour", "5000-digits", "fraction", "negative", "words", "past-date"],
)
def test_the_upstream_retry_after_is_passed_on_only_as_sane_whole_seconds(
    tmp_path: Path, sent: str, passed_on: str | None
) -> None:
    upstream = EchoingElevenLabs(status=429, retry_after=sent)
    with live_server(upstream.app()) as upstream_url, TestClient(create_app(settings_for(tmp_path, upstream_url))) as c:
        answer = c.post("/v1/sessions", json={"agent_id": "a", "transport": "webrtc"}, headers=bearer(API_TOKENS[0]))
    assert answer.status_code == 503
    assert answer.headers.get("retry-after") == passed_on


def test_a_retry_after_date_is_passed_on_as_the_seconds_until_it(tmp_path: Path) -> None:
    upstream = EchoingElevenLabs(status=503, retry_after=format_datetime(datetime.now(UTC) + timedelta(seconds=30)))
    with live_server(upstream.app()) as upstream_url, TestClient(create_app(settings_for(tmp_path, upstream_url))) as c:
        answer = c.post("/v1/sessions", json={"agent_id": "a", "transport": "webrtc"}, headers=bearer(API_TOKENS[0]))
    assert answer.status_code == 503
    assert answer.headers["retry-after"] in {"29", "30"}  # whole seconds, however long the request took


# --- constant-time comparisons -------------------------------------------------------------------------------------


@dataclass
class CompareSpy:
    """Stands in for `hmac.compare_digest`, recording each comparison and answering as the real one does."""

    real: Callable[[Any, Any], bool] = hmac.compare_digest
    calls: list[tuple[bytes, bytes]] = field(default_factory=list)

    def __call__(self, a: Any, b: Any) -> bool:
        self.calls.append((bytes(a), bytes(b)))
        return self.real(a, b)


@pytest.fixture
def compare_spy(monkeypatch: pytest.MonkeyPatch) -> CompareSpy:
    spy = CompareSpy()
    monkeypatch.setattr(hmac, "compare_digest", spy)
    return spy


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = settings_for(tmp_path, "http://127.0.0.1:9")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def two_digests(body: bytes, timestamp: int) -> str:
    """A header with a wrong `v0` first and the right one second: a comparison that stops early would show."""
    right = sign(body, WEBHOOK_SECRETS[0].encode(), timestamp).split("v0=")[1]
    return f"t={timestamp},v0={'0' * 64},v0={right}"


def test_webhook_signatures_are_compared_with_compare_digest_against_every_secret_and_digest(
    client: TestClient, compare_spy: CompareSpy
) -> None:
    body = wh.encode(wh.transcription("conv_constant"))
    now = int(time.time())
    expected_macs = {
        hmac.new(secret.encode(), f"{now}.".encode() + body, "sha256").digest() for secret in WEBHOOK_SECRETS
    }

    answer = client.post("/webhooks/elevenlabs", content=body, headers={"ElevenLabs-Signature": two_digests(body, now)})

    assert answer.status_code == 200
    # 2 secrets x 2 digests, all compared though the very first secret matched the second digest.
    assert len(compare_spy.calls) == 4
    assert {computed for computed, _ in compare_spy.calls} == expected_macs
    assert {given for _, given in compare_spy.calls} == {bytes(32), bytes.fromhex(two_digests(body, now)[-64:])}

    compare_spy.calls.clear()
    forged = sign(body, b"not-the-secret", now)
    assert (
        client.post("/webhooks/elevenlabs", content=body, headers={"ElevenLabs-Signature": forged}).status_code == 401
    )
    assert len(compare_spy.calls) == 2  # a refusal compares against every secret too


@pytest.mark.parametrize("presented", [API_TOKENS[0], API_TOKENS[1], WRONG_TOKEN, "short"])
def test_bearer_tokens_are_compared_with_compare_digest_against_every_token(
    client: TestClient, compare_spy: CompareSpy, presented: str
) -> None:
    answer = client.get("/v1/conversations", headers=bearer(presented))

    assert answer.status_code == (200 if presented in API_TOKENS else 401)
    # Every configured token, in order, whichever matched (and whatever the length of the one presented).
    assert compare_spy.calls == [(presented.encode(), token.encode()) for token in API_TOKENS]


# --- every route but the open ones needs a token -------------------------------------------------------------------


def concrete_path(route: Route) -> str:
    """The route's path with each `{param}` filled in with a plausible id."""
    path = route.path
    for name in route.param_convertors:
        path = path.replace(f"{{{name}}}", "conv_route_probe")
    return path


# The web console authenticates with its session cookie, not a bearer token: tests/test_console.py checks that every
# one of its routes but sign-in and the static files redirects a request without a session.
CONSOLE = "/console"


def app_routes(client: TestClient) -> list[Route]:
    routes = [route for route in client.app.routes if getattr(route, "path", None) != CONSOLE]  # type: ignore[attr-defined]
    unknown = [route for route in routes if not isinstance(route, Route)]
    assert unknown == [], "a new kind of route (mount, websocket…): decide how it is authenticated, then test it here"
    return list(routes)


def is_bearer_refusal(answer: httpx.Response) -> bool:
    return answer.status_code in (401, 403) and "bearer" in answer.headers.get("www-authenticate", "").lower()


def test_every_route_except_the_open_ones_refuses_a_request_without_a_valid_token(client: TestClient) -> None:
    routes = app_routes(client)
    assert {route.path for route in routes} >= OPEN_ROUTES  # the open list names real routes
    probed = 0
    for route in routes:
        for method in sorted(route.methods or ()):
            path = concrete_path(route)
            for headers in ({}, bearer(WRONG_TOKEN), {"Authorization": "Basic dXNlcjpwYXNz"}):
                answer = client.request(method, path, headers=headers)
                probed += 1
                if route.path in OPEN_ROUTES:
                    assert not is_bearer_refusal(answer), f"{method} {route.path} is open but asked for a token"
                else:
                    assert answer.status_code == 401, (
                        f"{method} {route.path} answered {answer.status_code} unauthenticated"
                    )
                    assert is_bearer_refusal(answer)
            if route.path not in OPEN_ROUTES:
                assert client.request(method, path, headers=bearer(API_TOKENS[0])).status_code != 401
    assert probed >= 3 * 10


def test_with_no_token_configured_every_protected_route_is_off(tmp_path: Path) -> None:
    settings = Settings(
        database_url=migrated_sqlite(str(tmp_path / "off.db")),
        data_dir=tmp_path / "data",
        _env_file=None,  # type: ignore[call-arg]
    )
    with TestClient(create_app(settings)) as client:
        for route in app_routes(client):
            if route.path in OPEN_ROUTES:
                continue
            for method in sorted(route.methods or ()):
                for headers in ({}, bearer(API_TOKENS[0]), bearer("")):
                    answer = client.request(method, concrete_path(route), headers=headers)
                    assert answer.status_code == 403, f"{method} {route.path} answered {answer.status_code}"
