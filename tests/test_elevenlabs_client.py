"""The ElevenLabs client against the fake platform over HTTP: paging, auth, retries, Retry-After, audio."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import stamina
from sqlalchemy.engine import Engine
from starlette.responses import Response

from service.config import Settings
from service.elevenlabs import (
    NO_RETRIES,
    ApiError,
    BadAnswer,
    ElevenLabsClient,
    NotFound,
    RetryPolicy,
    Unreachable,
    looks_like_audio,
    retry_after_seconds,
)
from service.storage.audio import BlobStore
from service.testing import FakeConversation, FakePlatform, seed_conversations
from tests.support.live import free_port
from tests.support.reconcile import checkpoint, reconcile, rows

KEY = "client-key"
NOW = int(time.time())


@pytest.fixture
def platform() -> FakePlatform:
    return FakePlatform(api_key=KEY, conversations=seed_conversations(230, ("agent_a",), now=NOW, seed=3))


@pytest.fixture
def base_url(platform: FakePlatform) -> Iterator[str]:
    with platform.serve() as url:
        yield url


# Every retry happens, a few milliseconds apart: the counts are the policy's, the waits too short to matter.
FAST = RetryPolicy(attempts=4, wait_initial=0.001, wait_max=0.01, wait_jitter=0.001)


def client(base_url: str, key: str = KEY, concurrency: int = 8) -> ElevenLabsClient:
    return ElevenLabsClient.open(base_url, key, retries=FAST, concurrency=concurrency)


def test_pages_follow_the_cursor_100_at_a_time(platform: FakePlatform, base_url: str) -> None:
    async def collect() -> list[str]:
        async with client(base_url) as api:
            return [s["conversation_id"] async for page in api.conversation_pages("agent_a", 0, NOW) for s in page]

    ids = anyio.run(collect)
    assert sorted(ids) == sorted(c.conversation_id for c in platform.all())
    calls = platform.calls_to("list")
    assert len(calls) == 3
    assert {call.query["page_size"] for call in calls} == {"100"}
    assert "cursor" not in calls[0].query and calls[1].query["cursor"]
    assert all(call.request_headers["xi-api-key"] == KEY for call in calls)


def test_pages_of_the_whole_workspace_carry_no_agent_filter_and_ask_for_summaries(
    platform: FakePlatform, base_url: str
) -> None:
    platform.add(FakeConversation("conv_other_agent", "agent_b", NOW - 60))

    async def collect() -> list[dict[str, Any]]:
        async with client(base_url) as api:
            return [s async for page in api.conversation_pages(None, 0, NOW) for s in page]

    summaries = anyio.run(collect)
    assert {s["conversation_id"] for s in summaries} == {c.conversation_id for c in platform.all()}
    assert all(s["transcript_summary"] for s in summaries if s["status"] == "done")
    for call in platform.calls_to("list"):
        assert "agent_id" not in call.query
        assert call.query["summary_mode"] == "include"


def test_the_workspace_webhooks_and_convai_settings_are_read_as_sent(platform: FakePlatform, base_url: str) -> None:
    platform.set_webhook(is_disabled=True)

    async def read() -> tuple[list[Any], dict[str, Any]]:
        async with client(base_url) as api:
            return await api.workspace_webhooks(), await api.convai_settings()

    webhooks, settings = anyio.run(read)
    assert [webhook["is_disabled"] for webhook in webhooks] == [True]
    assert settings["webhooks"]["post_call_webhook_id"] == webhooks[0]["webhook_id"]
    assert [call.kind for call in platform.calls] == ["webhooks", "settings"]


@pytest.mark.parametrize("answer", [{}, {"webhooks": None}, {"webhooks": {"wh_1": {}}}])
def test_a_webhook_list_that_is_not_a_list_is_a_bad_answer(
    platform: FakePlatform, base_url: str, answer: dict[str, Any]
) -> None:
    platform.answer_with(answer, 1, kinds={"webhooks"})

    async def read() -> list[Any]:
        async with client(base_url) as api:
            return await api.workspace_webhooks()

    with pytest.raises(BadAnswer, match="'webhooks' is not a list"):
        anyio.run(read)


def test_a_wrong_key_fails_at_once_without_retries(platform: FakePlatform, base_url: str) -> None:
    async def detail() -> None:
        async with client(base_url, key="wrong") as api:
            await api.conversation(platform.all()[0].conversation_id)

    with pytest.raises(ApiError) as caught:
        anyio.run(detail)
    assert caught.value.status == 401
    assert "Invalid API key" in caught.value.reason
    assert len(platform.calls) == 1


def test_429_is_retried_after_the_retry_after_it_names(platform: FakePlatform, base_url: str) -> None:
    platform.throttle(2, retry_after="1", kinds={"detail"})
    cid = platform.all()[0].conversation_id

    async def detail() -> dict[str, object]:
        async with client(base_url) as api:
            return await api.conversation(cid)

    assert anyio.run(detail)["conversation_id"] == cid
    calls = platform.calls_to("detail")
    assert [call.status for call in calls] == [429, 429, 200]
    for refused, retry in itertools.pairwise(calls):
        assert refused.response_headers["retry-after"] == "1"
        assert retry.at - refused.at >= 1.0  # the fake's own clock: the retry waited as told


def test_a_5xx_is_retried_a_bounded_number_of_times(platform: FakePlatform, base_url: str) -> None:
    cid = platform.all()[0].conversation_id
    platform.failing_ids.add(cid)

    async def detail() -> None:
        async with client(base_url) as api:
            await api.conversation(cid)

    with pytest.raises(ApiError) as caught:
        anyio.run(detail)
    assert caught.value.status == 500
    assert len(platform.calls_to("detail")) == FAST.attempts


def test_a_refused_connection_is_retried_then_reported() -> None:
    async def detail() -> None:
        async with client(f"http://127.0.0.1:{free_port()}") as api:
            await api.conversation("conv_x")

    with pytest.raises(Unreachable, match="ConnectError"):
        anyio.run(detail)


def test_concurrency_is_bounded(platform: FakePlatform, base_url: str) -> None:
    platform.latency = 0.05
    ids = [c.conversation_id for c in platform.all()[:12]]

    async def details() -> None:
        async with client(base_url, concurrency=3) as api, anyio.create_task_group() as group:
            for cid in ids:
                group.start_soon(api.conversation, cid)

    anyio.run(details)
    assert len(platform.calls_to("detail")) == 12
    assert platform.peak_in_flight <= 3


def test_audio_streams_into_a_temp_blob(platform: FakePlatform, base_url: str, tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    with_audio = next(c for c in platform.all() if c.status == "done" and c.has_audio)
    without = platform.all()[1]
    platform.set_status(without.conversation_id, "processing")  # no recording yet

    async def download(cid: str) -> bytes:
        async with client(base_url) as api:
            blob = await api.download_audio(cid, blobs)
            data = blob.path.read_bytes()
            blob.discard()
            return data

    assert anyio.run(download, with_audio.conversation_id) == with_audio.audio(platform.audio_bytes)
    with pytest.raises(NotFound):
        anyio.run(download, without.conversation_id)
    assert list(blobs.temp_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (Response(b"<html><body>Sign in</body></html>", media_type="text/html"), "not audio"),
        (Response(b'{"detail": "no"}', media_type="application/json"), "not audio"),
        (Response(b"PK\x03\x04 a zip, not a recording", media_type="audio/mpeg"), "does not start like audio"),
        (Response(b"", media_type="audio/mpeg"), "empty"),
    ],
)
def test_a_200_that_is_not_a_recording_is_a_bad_answer_and_leaves_nothing(
    platform: FakePlatform, base_url: str, tmp_path: Path, answer: Response, why: str
) -> None:
    blobs = BlobStore(tmp_path)
    with_audio = next(c for c in platform.all() if c.status == "done" and c.has_audio)
    platform.answer_with(answer, 1, kinds={"audio"})

    async def download() -> None:
        async with client(base_url) as api:
            await api.download_audio(with_audio.conversation_id, blobs)

    with pytest.raises(BadAnswer, match=why):
        anyio.run(download)
    assert not blobs.temp_dir.exists() or list(blobs.temp_dir.iterdir()) == []


def test_a_recording_over_the_size_cap_is_a_bad_answer_and_leaves_nothing(
    platform: FakePlatform, base_url: str, tmp_path: Path
) -> None:
    blobs = BlobStore(tmp_path)
    with_audio = next(c for c in platform.all() if c.status == "done" and c.has_audio)

    async def download() -> None:
        api = ElevenLabsClient.open(base_url, KEY, retries=FAST, max_audio_bytes=platform.audio_bytes - 1)
        async with api:
            await api.download_audio(with_audio.conversation_id, blobs)

    with pytest.raises(BadAnswer, match="over"):
        anyio.run(download)
    assert list(blobs.temp_dir.iterdir()) == []


@pytest.mark.parametrize(
    "head",
    [
        b"\xff\xfb\x90\x64",
        b"\xff\xf3\x00\x00",
        b"ID3\x04\x00",
        b"RIFF\x00\x00\x00\x00WAVE",
        b"OggS\x00",
        b"\x00\x00\x00\x20ftypM4A ",
    ],
)
def test_recordings_of_each_format_look_like_audio(head: bytes) -> None:
    assert looks_like_audio(head + bytes(16))


@pytest.mark.parametrize("head", [b"<!DOCTYPE html>", b'{"detail"', b"PK\x03\x04", b"\xff", b""])
def test_other_bytes_do_not_look_like_audio(head: bytes) -> None:
    assert not looks_like_audio(head)


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = 1_780_000_000.0
    assert retry_after_seconds("7", now) == 7
    assert retry_after_seconds(" 7 ", now) == 7
    # RFC 9110's delta-seconds are digits: a fraction, a sign, an exponent or 5,000 digits is not a Retry-After.
    for not_seconds in ("0.5", "-5", "1e3", "inf", "9" * 5000, "\u0663"):
        assert retry_after_seconds(not_seconds, now) is None, not_seconds
    date = format_datetime(datetime.fromtimestamp(now + 30, UTC), usegmt=True)
    assert retry_after_seconds(date, now) == pytest.approx(30)
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds(None, now) is None


def test_a_cursor_handed_out_twice_stops_the_paging_with_an_error() -> None:
    """An API that keeps answering has_more with a cursor it gave before would otherwise page forever."""
    cursors = itertools.cycle(["c1", "c2"])
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json={"conversations": [], "has_more": True, "next_cursor": next(cursors)})

    async def collect() -> int:
        http = httpx.AsyncClient(base_url="http://api.test", transport=httpx.MockTransport(answer))
        async with ElevenLabsClient(http, KEY, retries=FAST) as api:
            return len([page async for page in api.conversation_pages("agent_a", 0, NOW)])

    with pytest.raises(BadAnswer, match="repeated cursor 'c1'"):
        anyio.run(collect)
    assert [r.url.params.get("cursor") for r in requests] == [None, "c1", "c2"]


# --- stamina drives the retries -------------------------------------------------------------------------------


def test_the_retries_are_stamina_s_its_testing_mode_sets_the_attempts(platform: FakePlatform, base_url: str) -> None:
    cid = platform.all()[0].conversation_id
    platform.failing_ids.add(cid)

    async def detail() -> None:
        async with ElevenLabsClient.open(base_url, KEY) as api:  # the production policy: 6 attempts, real waits
            await api.conversation(cid)

    with stamina.set_testing(True, attempts=2), pytest.raises(ApiError):
        anyio.run(detail)
    assert len(platform.calls_to("detail")) == 2


@pytest.mark.usefixtures("tiny_retry_waits")
def test_stamina_s_testing_mode_still_waits_out_a_retry_after(platform: FakePlatform, base_url: str) -> None:
    """Testing mode drops stamina's waits; the server's instruction is the client's gate, and holds."""
    platform.throttle(1, retry_after="1", kinds={"detail"})
    cid = platform.all()[0].conversation_id

    async def detail() -> dict[str, object]:
        async with ElevenLabsClient.open(base_url, KEY) as api:
            return await api.conversation(cid)

    assert anyio.run(detail)["conversation_id"] == cid
    refused, retry = platform.calls_to("detail")
    assert (refused.status, retry.status) == (429, 200)
    assert retry.at - refused.at >= 1.0


def test_a_client_without_retries_asks_once(platform: FakePlatform, base_url: str) -> None:
    platform.fail(None, 503, kinds={"token"})

    async def token() -> None:
        async with ElevenLabsClient.open(base_url, KEY, retries=NO_RETRIES) as api:
            await api.conversation_token("agent_a")

    with pytest.raises(ApiError) as caught:
        anyio.run(token)
    assert caught.value.status == 503 and caught.value.retryable
    assert len(platform.calls_to("token")) == 1


# --- answers that are not what the API documents ----------------------------------------------------------------


NOT_PAGES = [
    pytest.param({}, "'conversations' is not a list", id="empty-object"),
    pytest.param({"detail": "Not authenticated"}, "'conversations' is not a list", id="detail"),
    pytest.param({"conversations": None, "has_more": False}, "'conversations' is not a list", id="null-list"),
    pytest.param({"conversations": {"a": 1}, "has_more": False}, "'conversations' is not a list", id="object-list"),
    pytest.param({"conversations": [], "has_more": "false"}, "'has_more' is not true or false", id="string-has-more"),
    pytest.param({"conversations": []}, "'has_more' is not true or false", id="no-has-more"),
    pytest.param({"conversations": [], "has_more": True, "next_cursor": 7}, "'next_cursor' is not a string", id="int"),
    pytest.param({"conversations": [], "has_more": True, "next_cursor": None}, "without a 'next_cursor'", id="none"),
]


@pytest.mark.parametrize(("answer", "reason"), NOT_PAGES)
def test_a_list_answer_that_is_not_a_page_is_an_error(
    platform: FakePlatform, base_url: str, answer: dict[str, object], reason: str
) -> None:
    """Read as an empty page, such an answer would end the listing early: the window's rest never stored."""
    platform.answer_with(answer, 1, kinds={"list"})

    async def collect() -> int:
        async with client(base_url) as api:
            return len([page async for page in api.conversation_pages("agent_a", 0, NOW)])

    with pytest.raises(BadAnswer, match="not a page") as caught:
        anyio.run(collect)
    assert reason in caught.value.reason
    assert len(platform.calls_to("list")) == 1  # not retried: asking again would get the same


class AsyncChunks(httpx.AsyncByteStream):
    """An answer body that arrives chunk by chunk, with no Content-Length."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk


def nested(depth: int, conversation_id: str = "conv_deep") -> bytes:
    """A done conversation's detail whose metadata is lists in lists `depth` deep (orjson writes at most 254)."""
    head = f'{{"conversation_id": "{conversation_id}", "status": "done", "metadata": {{"x": '.encode()
    return head + b"[" * depth + b"]" * depth + b"}}"


@pytest.mark.parametrize(
    ("depth", "reason"),
    [
        pytest.param(300, "nested deeper than 128 levels", id="deeper-than-postcall-stores"),
        pytest.param(5000, "not JSON: depth limit exceeded", id="deeper-than-the-parser-goes"),
    ],
)
def test_deeply_nested_json_is_a_bad_answer(platform: FakePlatform, base_url: str, depth: int, reason: str) -> None:
    platform.answer_with(nested(depth), 1, kinds={"detail"})

    async def detail() -> None:
        async with client(base_url) as api:
            await api.conversation(platform.all()[0].conversation_id)

    with pytest.raises(BadAnswer) as caught:
        anyio.run(detail)
    assert reason in caught.value.reason


@dataclass
class EndlessAnswer:
    """An answer whose body does not end (1 KiB chunks after `start`, no Content-Length); counts what was pulled."""

    status: int
    start: bytes = b""
    pulled: int = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.start
        while self.pulled < 100_000:
            self.pulled += 1
            yield b"z" * 1024

    def client(self, **options: Any) -> ElevenLabsClient:
        transport = httpx.MockTransport(lambda request: httpx.Response(self.status, stream=AsyncChunks(self.chunks())))
        http = httpx.AsyncClient(base_url="http://api.test", transport=transport)
        return ElevenLabsClient(http, KEY, retries=FAST, **options)


def test_a_json_answer_over_the_size_cap_is_a_bad_answer_and_is_not_read_on() -> None:
    endless = EndlessAnswer(200, b'{"conversation_id": "conv_big", "transcript": "')

    async def detail() -> None:
        async with endless.client(max_json_bytes=10 * 1024) as api:
            await api.conversation("conv_big")

    with pytest.raises(BadAnswer, match="larger than 10240 bytes"):
        anyio.run(detail)
    assert endless.pulled <= 11  # reading stopped at the first chunk past the cap


def test_the_detail_cap_leaves_room_for_whole_transcripts(platform: FakePlatform, base_url: str) -> None:
    cid = platform.all()[0].conversation_id
    detail = {**platform.get(cid).detail(), "transcript": [{"role": "user", "message": "y" * 1000}] * 4000}
    platform.answer_with(detail, 1, kinds={"detail"})  # about 4 MB

    async def fetch() -> dict[str, object]:
        async with client(base_url) as api:
            return await api.conversation(cid)

    assert len(anyio.run(fetch)["transcript"]) == 4000  # type: ignore[arg-type]


def test_an_error_answer_is_read_only_as_far_as_its_reason_needs() -> None:
    endless = EndlessAnswer(400)

    async def detail() -> None:
        async with endless.client() as api:
            await api.conversation("conv_x")

    with pytest.raises(ApiError) as caught:
        anyio.run(detail)
    assert caught.value.reason.startswith("Bad Request: zzz")
    assert endless.pulled <= 64  # 64 KiB, of an answer without end


# --- the reconciler meets them: the run fails, the checkpoint stays ---------------------------------------------

FIRST_UNTIL = NOW - 3600


def reconciled_platform(recent: int = 3) -> FakePlatform:
    """Conversations over two days, `recent` of them after FIRST_UNTIL: a first run up to it leaves them to the next."""
    platform = FakePlatform(api_key=KEY, conversations=seed_conversations(12, ("agent_a",), now=FIRST_UNTIL, seed=5))
    for i in range(recent):
        platform.add(FakeConversation(f"conv_recent_{i}", "agent_a", NOW - 600 - 60 * i))
    return platform


@pytest.mark.usefixtures("tiny_retry_waits")
@pytest.mark.parametrize(
    "answer",
    [{}, {"detail": "Service temporarily degraded"}, {"conversations": None, "has_more": False}],
    ids=["empty-object", "detail", "null-list"],
)
def test_a_run_that_meets_a_list_answer_that_is_not_a_page_fails_and_keeps_the_checkpoint(
    settings: Settings, engine: Engine, answer: dict[str, object]
) -> None:
    platform = reconciled_platform()
    with platform.serve() as url:
        first = reconcile(settings, url, KEY, "--json", "--agent", "agent_a", "--until", str(FIRST_UNTIL))
        assert first.exit_code == 0, first.stderr
        assert checkpoint(engine, "agent_a") == FIRST_UNTIL

        platform.answer_with(answer, None, kinds={"list"})
        failed = reconcile(settings, url, KEY, "--json", "--agent", "agent_a")
        assert failed.exit_code == 1, failed.stdout
        assert any("not a page" in error for error in failed.json["errors"]), failed.json["errors"]
        assert checkpoint(engine, "agent_a") == FIRST_UNTIL
        assert max(rows(engine, "reconcile_run"), key=lambda run: int(run["id"]))["status"] == "failed"

        platform.clear_faults()
        fixed = reconcile(settings, url, KEY, "--json", "--agent", "agent_a")
    assert fixed.exit_code == 0, fixed.stdout
    stored = {row["conversation_id"] for row in rows(engine, "conversation")}
    assert stored == {c.conversation_id for c in platform.all()}


@pytest.mark.usefixtures("tiny_retry_waits")
@pytest.mark.parametrize("depth", [300, 5000], ids=["deeper-than-postcall-stores", "deeper-than-the-parser-goes"])
def test_a_run_that_meets_deeply_nested_json_fails_cleanly_and_keeps_the_checkpoint(
    settings: Settings, engine: Engine, depth: int
) -> None:
    """Such a detail crashed the run with a traceback (a RecursionError parsing it, or the store's serialiser
    refusing it); now it is one failed conversation."""
    platform = reconciled_platform(recent=1)
    with platform.serve() as url:
        first = reconcile(settings, url, KEY, "--json", "--agent", "agent_a", "--until", str(FIRST_UNTIL))
        assert first.exit_code == 0, first.stderr
        platform.answer_with(nested(depth, "conv_recent_0"), None, kinds={"detail"})
        failed = reconcile(settings, url, KEY, "--json", "--agent", "agent_a")
    assert failed.exit_code == 1, failed.stdout
    assert failed.json["failed"] == 1
    [error] = failed.json["errors"]
    assert error.startswith("conv_recent_0: detail: HTTP 200: the answer is ")
    assert "nested deeper than 128 levels" in error or "not JSON: depth limit exceeded" in error
    held = platform.get("conv_recent_0").start_time_unix_secs
    assert checkpoint(engine, "agent_a") == held  # up to the conversation it could not store, not past it
