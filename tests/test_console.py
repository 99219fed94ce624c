"""The web console over HTTP, through the real app on SQLite and PostgreSQL: sessions and their cookie, CSRF,
redirects, security headers, escaping, and the audio route. (tests/test_console_browser.py drives it in Chromium.)"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from service.config import Settings
from service.console import render
from service.console.session import LIFETIME_SECONDS
from service.web.app import create_app
from tests.support import console, records

TOKEN = "test-token"
PAGES = ("/console/conversations", "/console/conversations/conv_rich", "/console/coverage")
NOW = int(time.time())


class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def stored(engine: Engine, settings: Settings) -> None:
    console.store_rich(engine, settings.data_dir, "conv_rich", NOW - 3600, b"ID3" + bytes(range(256)) * 40)
    records.store(engine, [console.observe(console.hostile_detail("conv_hostile", NOW - 7200))])


def app_client(settings: Settings, engine: Engine, clock: Clock, base_url: str = "http://testserver") -> TestClient:
    return TestClient(create_app(settings, engine=engine, clock=clock), base_url=base_url, follow_redirects=False)


@pytest.fixture
def client(settings: Settings, engine: Engine, clock: Clock, stored: None) -> Iterator[TestClient]:
    with app_client(settings, engine, clock) as client:
        yield client


def sign_in(client: TestClient, token: str = TOKEN) -> httpx.Response:
    form = client.get("/console/sign-in")
    assert form.status_code == 200
    return client.post("/console/sign-in", data={"csrf": console.csrf_of(form.text), "token": token})


def cookie_attributes(header: str) -> dict[str, str]:
    parsed = SimpleCookie()
    parsed.load(header)
    morsel = parsed["postcall_console"]
    return {key: str(value) for key, value in morsel.items() if value} | {"value": morsel.value}


@pytest.mark.parametrize("path", [*PAGES, "/console/conversations/conv_rich/audio", "/console"])
def test_every_page_without_a_session_redirects_to_sign_in(client: TestClient, path: str) -> None:
    answer = client.get(path)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/sign-in"


def test_every_console_route_but_sign_in_and_static_files_needs_a_session(client: TestClient) -> None:
    (mount,) = [route for route in client.app.routes if isinstance(route, Mount)]  # type: ignore[attr-defined]
    probed = 0
    for route in mount.routes:
        if not isinstance(route, Route) or route.path == "/sign-in":
            continue
        path = "/console" + route.path.replace("{conversation_id}", "conv_rich")
        for method in sorted((route.methods or set()) - {"HEAD"}):
            answer = client.request(method, path)
            assert (answer.status_code, answer.headers.get("location")) == (303, "/console/sign-in"), path
            probed += 1
    assert probed >= 6


def test_the_session_cookie_is_httponly_samesite_scoped_to_the_console_and_holds_no_token(client: TestClient) -> None:
    answer = sign_in(client)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/conversations"
    header = next(h for h in answer.headers.get_list("set-cookie") if h.startswith("postcall_console="))
    flags = cookie_attributes(header)
    assert flags["httponly"] == "True"
    assert flags["samesite"].lower() == "lax"
    assert flags["path"] == "/console"
    assert int(flags["max-age"]) == LIFETIME_SECONDS
    assert "secure" not in flags  # plain http: a Secure cookie would never come back
    assert TOKEN not in flags["value"]
    assert client.get("/console/conversations").status_code == 200


def test_the_cookie_is_secure_over_https(settings: Settings, engine: Engine, clock: Clock, stored: None) -> None:
    with app_client(settings, engine, clock, base_url="https://testserver") as client:
        answer = sign_in(client)
    header = next(h for h in answer.headers.get_list("set-cookie") if h.startswith("postcall_console="))
    assert cookie_attributes(header)["secure"] == "True"


def test_a_wrong_token_is_refused_with_a_message_and_no_session(client: TestClient) -> None:
    answer = sign_in(client, "not-the-token")
    assert answer.status_code == 401
    assert "That token is not one of POSTCALL_API_TOKENS" in answer.text
    assert "postcall_console" not in client.cookies
    assert client.get("/console/conversations").status_code == 303


def test_signing_in_without_the_forms_csrf_value_is_refused(client: TestClient) -> None:
    client.get("/console/sign-in")
    answer = client.post("/console/sign-in", data={"token": TOKEN})
    assert answer.status_code == 403
    answer = client.post("/console/sign-in", data={"token": TOKEN, "csrf": "forged"})
    assert answer.status_code == 403
    assert "postcall_console" not in client.cookies


def test_sign_out_is_a_post_that_needs_the_sessions_csrf_token(client: TestClient) -> None:
    sign_in(client)
    page = client.get("/console/conversations")
    token = console.csrf_of(page.text)
    assert client.post("/console/sign-out").status_code == 403
    assert client.post("/console/sign-out", data={"csrf": "x" * len(token)}).status_code == 403
    assert client.get("/console/conversations").status_code == 200  # still signed in
    assert client.get("/console/sign-out").status_code == 405
    answer = client.post("/console/sign-out", data={"csrf": token})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/sign-in"
    assert "postcall_console" not in client.cookies
    assert client.get("/console/conversations").status_code == 303


def test_a_sessions_csrf_token_does_not_work_for_another_session(client: TestClient) -> None:
    sign_in(client)
    first = console.csrf_of(client.get("/console/conversations").text)
    client.cookies.clear()
    sign_in(client)
    assert client.post("/console/sign-out", data={"csrf": first}).status_code == 403


@pytest.mark.parametrize("path", [*PAGES, "/console/sign-in"])
def test_pages_carry_a_strict_content_security_policy_and_security_headers(client: TestClient, path: str) -> None:
    if path != "/console/sign-in":
        sign_in(client)
    answer = client.get(path)
    assert answer.status_code == 200
    policy = answer.headers["content-security-policy"]
    assert "default-src 'self'" in policy
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["referrer-policy"] == "no-referrer"
    assert answer.headers["cache-control"] == "no-store"
    # No inline script, handler or style for the policy to have to allow.
    assert re.findall(r"<script[^>]*>", answer.text) == ['<script src="/console/static/console.js" defer>']
    assert not re.search(r"<[^>]*\s(on[a-z]+|style)=", answer.text)


def test_hostile_text_is_escaped_everywhere(client: TestClient) -> None:
    sign_in(client)
    for path in ("/console/conversations", "/console/conversations/conv_hostile"):
        html = client.get(path).text
        assert console.HOSTILE not in html
        assert "&lt;script&gt;window.__pwned = 1; alert(1)&lt;/script&gt;" in html
        assert "<img src=x" not in html


def test_a_session_survives_a_restart_and_ends_when_its_token_is_revoked(
    settings: Settings, engine: Engine, clock: Clock, stored: None
) -> None:
    with app_client(settings, engine, clock) as first:
        sign_in(first)
        cookie = first.cookies["postcall_console"]
    with app_client(settings, engine, clock) as restarted:  # another process, or another replica
        restarted.cookies.set("postcall_console", cookie, path="/console")
        assert restarted.get("/console/conversations").status_code == 200
    rotated = settings.model_copy(update={"api_tokens": (SecretStr("a-new-token"),)})  # the old token is gone
    with app_client(rotated, engine, clock) as after:
        after.cookies.set("postcall_console", cookie, path="/console")
        assert after.get("/console/conversations").status_code == 303


def test_an_expired_or_tampered_session_is_refused(client: TestClient, clock: Clock) -> None:
    sign_in(client)
    cookie = client.cookies["postcall_console"]
    expires, nonce, mac = cookie.split(".")
    for forged in (f"{int(expires) + 3600}.{nonce}.{mac}", f"{expires}.{nonce}x.{mac}", "1.2", "x" * 4000):
        client.cookies.set("postcall_console", forged, path="/console")
        assert client.get("/console/conversations").status_code == 303
    client.cookies.set("postcall_console", cookie, path="/console")
    assert client.get("/console/conversations").status_code == 200
    clock.now += LIFETIME_SECONDS + 1
    assert client.get("/console/conversations").status_code == 303


def test_the_console_audio_route_streams_ranges_like_the_api(client: TestClient) -> None:
    sign_in(client)
    whole = client.get("/console/conversations/conv_rich/audio")
    assert whole.status_code == 200
    assert whole.headers["content-type"] == "audio/mpeg"
    part = client.get("/console/conversations/conv_rich/audio", headers={"Range": "bytes=3-12"})
    assert part.status_code == 206
    assert part.content == whole.content[3:13]
    assert client.get("/console/conversations/conv_hostile/audio").status_code == 404


def test_bad_filters_and_unknown_conversations_are_a_clear_4xx(client: TestClient) -> None:
    sign_in(client)
    answer = client.get("/console/conversations", params={"started_after": "yesterday-ish"})
    assert answer.status_code == 422
    assert "started_after: must be unix seconds or an ISO-8601 date-time" in answer.text
    assert client.get("/console/conversations/conv_missing").status_code == 404
    assert client.get("/console/conversations/conv%2Fx").status_code == 404
    assert client.get("/console/coverage", params={"days": "0"}).status_code == 422
    assert client.post("/console/sign-in", content=b"token=" + b"x" * 20_000).status_code == 413


def test_with_no_token_configured_the_console_says_how_to_enable_it(
    settings: Settings, engine: Engine, clock: Clock
) -> None:
    disabled = settings.model_copy(update={"api_tokens": (), "admin_tokens": ()})
    with app_client(disabled, engine, clock) as client:
        page = client.get("/console/sign-in")
        assert "The console is disabled: set POSTCALL_API_TOKENS" in page.text
        answer = client.post("/console/sign-in", data={"csrf": console.csrf_of(page.text), "token": ""})
        assert answer.status_code == 403


@pytest.mark.parametrize(
    ("snippet", "html"),
    [
        ("the «parcel» arrived", "the <mark>parcel</mark> arrived"),
        ("«<b>»&«x»", "<mark>&lt;b&gt;</mark>&amp;<mark>x</mark>"),
        ("a « stray <i>", "a « stray &lt;i&gt;"),
        ("«a«b»", "«a<mark>b</mark>"),
        (None, ""),
    ],
)
def test_snippets_are_escaped_before_their_matches_are_marked(snippet: str | None, html: str) -> None:
    assert str(render.highlight(snippet)) == html


def test_the_static_files_are_served_with_the_same_headers(client: TestClient, tmp_path: Path) -> None:
    for name, kind in (("console.js", "javascript"), ("console.css", "text/css")):
        answer = client.get(f"/console/static/{name}")
        assert answer.status_code == 200
        assert kind in answer.headers["content-type"]
        assert "content-security-policy" in answer.headers
