"""THE client of the ElevenLabs API: everything postcall asks ElevenLabs goes through `ElevenLabsClient`.

Endpoints: conversation pages, details and audio, the workspace's webhooks and ConvAI settings (the reconciler);
agents (`postcall doctor`); conversation tokens and signed URLs (the session broker). The `xi-api-key` header is
built here and nowhere else.

- Every request has timeouts and holds one of `concurrency` slots while it is on the wire; a client built with a
  `deadline` ends each call within it, retries included, whatever the upstream does (a dripping answer included:
  each byte inside the read timeout keeps httpx waiting).
- Answers are streamed and read only so far: a JSON answer up to `max_json_bytes` (past it: BadAnswer), an error
  answer up to MAX_ERROR_BYTES (enough for its reason). JSON is parsed with orjson, which refuses nesting past 1024
  levels (where the standard library raises RecursionError); past MAX_JSON_DEPTH it is a BadAnswer too, because
  the store serialises with orjson, which refuses values deeper than 254, and nothing ElevenLabs sends comes close.
- Retries are stamina's, with the client's `RetryPolicy`: an ApiError for 429 or 5xx and Unreachable (transport
  errors: connect/read/write/pool timeouts, connection resets, protocol errors) are retried, nothing else. A
  `Retry-After` (seconds or an HTTP date, at most `retry_after_max`) replaces the exponential backoff, and after a
  429 no request of this client starts before it has passed (the gate, which stamina's testing mode leaves on:
  a server's instruction is honoured in tests too). `NO_RETRIES` is one attempt.
- Pages are async iterators that follow `next_cursor` while `has_more`, one page in memory at a time. An answer that
  is not a page (the list is missing or not a list, `has_more` not a bool, a cursor that is not a string, or
  `has_more` without one) is a BadAnswer: read as an empty page it would end the listing early and skip a window.
- Answers are plain dicts: unknown fields are kept, never rejected (record/payloads.py reads what it knows).

Errors, one tree; each carries `reason` (ElevenLabs' own words, or ours) and the answer's `status` when there was one:

    ElevenLabsError
    ├── ApiError          an error status, after the retries where it was retried (`retryable`, `retry_after`)
    │   └── NotFound      404
    ├── Unreachable       no whole answer: connection failures, resets, protocol errors (after the retries)
    │   └── TimedOut      a timeout, or the client's deadline passed
    └── BadAnswer         a 2xx postcall cannot read: not a JSON object, too large, too deep, not a page, a cursor
                          repeated, no token

Every reason has the API key scrubbed from it, then is shortened to MAX_REASON_CHARS: an error message may echo the
request's headers, and reasons travel on to answers, run records and logs.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import anyio
import anyio.to_thread
import httpx
import orjson
import stamina

from service import logs
from service.record.payloads import may_hold_nul, without_nul
from service.storage.audio import BlobStore, TempBlob

log = logging.getLogger("postcall.elevenlabs")
T = TypeVar("T")

PAGE_SIZE = 100  # the API's maximum
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
TOKEN_PATH = "/v1/convai/conversation/token"  # noqa: S105 (a path, not a secret)
SIGNED_URL_PATH = "/v1/convai/conversation/get-signed-url"
MAX_REASON_CHARS = 300
# Details hold whole transcripts (the largest seen are a few MB): far above that, far below what hurts a process.
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024
MAX_JSON_DEPTH = 128
# A recording is an MP3 of the call: 256 MiB is ~4.6 hours at 128 kbit/s, past any call ElevenLabs allows.
MAX_AUDIO_BYTES = 256 * 1024 * 1024
MAX_RETRY_AFTER_DIGITS = 9  # 31 years: longer is no wait anyone means


# --- errors ------------------------------------------------------------------------------------------------------


class ElevenLabsError(Exception):
    """A request that failed for good (after retries, where retrying made sense)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(f"HTTP {status}: {reason}" if status is not None else reason)
        self.reason = reason
        self.status = status


class ApiError(ElevenLabsError):
    """ElevenLabs answered with an error status; `retry_after` is its Retry-After in seconds (as sent: whoever
    uses it bounds it), if it sent a readable one."""

    def __init__(self, status: int, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason, status)
        self.status: int = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status == 429 or self.status >= 500


class NotFound(ApiError):
    pass


class Unreachable(ElevenLabsError):
    pass


class TimedOut(Unreachable):
    pass


class BadAnswer(ElevenLabsError):
    pass


# --- the retry policy --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """stamina's parameters: `attempts` in all, backoff `wait_initial * 2**n` capped at `wait_max` plus up to
    `wait_jitter`; a Retry-After replaces the backoff, up to `retry_after_max`."""

    attempts: int = 6
    wait_initial: float = 0.5
    wait_max: float = 30.0
    wait_jitter: float = 1.0
    retry_after_max: float = 120.0


NO_RETRIES = RetryPolicy(attempts=1)


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A Retry-After header as seconds from `now`: delta-seconds (digits only, as RFC 9110 has them) or an HTTP
    date; None when absent or anything else (a fraction, a sign, 5,000 digits)."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text) if len(text) <= MAX_RETRY_AFTER_DIGITS else None
    try:
        seconds = email.utils.parsedate_to_datetime(text).timestamp() - now
    except (TypeError, ValueError, OverflowError):
        return None
    return max(0.0, seconds)


def _retried(exc: BaseException) -> bool:
    return isinstance(exc, Unreachable) or (isinstance(exc, ApiError) and exc.retryable)


# --- reasons -------------------------------------------------------------------------------------------------------


def scrub_key(text: str, api_key: str) -> str:
    """`text` with the API key replaced: for anything an upstream answer or error carries on to logs or answers."""
    return text.replace(api_key, "[api key]") if api_key else text


def upstream_reason(body: bytes, reason_phrase: str, api_key: str) -> str:
    """ElevenLabs' own words for an error: `detail.message`, a `detail` string, the first validation message; else
    the status line's reason phrase with the body's text; the API key scrubbed, then shortened."""
    detail = _detail(body)
    if detail is None:
        text = body.decode("utf-8", "replace").strip()
        phrase = reason_phrase or "no reason given"
        detail = f"{phrase}: {text}" if text else phrase
    # Scrub, then shorten: shortening first could cut an echoed key in two, and a half key escapes the scrub.
    return scrub_key(detail, api_key)[:MAX_REASON_CHARS]


def _detail(body: bytes) -> str | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    detail = parsed.get("detail") if isinstance(parsed, dict) else None
    if isinstance(detail, dict):
        detail = detail.get("message") or detail.get("status")
    elif isinstance(detail, list) and detail and isinstance(detail[0], dict):
        detail = detail[0].get("msg")
    return detail if isinstance(detail, str) and detail.strip() else None


# --- reading answers (pure) ----------------------------------------------------------------------------------------


def json_object(raw: bytes | bytearray, status: int) -> dict[str, Any]:
    """A JSON answer as a dict (NUL characters replaced, see payloads.without_nul); BadAnswer if it is none."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:  # orjson refuses nesting past 1024 levels here, no RecursionError
        raise BadAnswer(f"the answer is not a JSON object (not JSON: {exc})", status) from None
    if not isinstance(body, dict):
        raise BadAnswer(f"the answer is not a JSON object (a {type(body).__name__})", status)
    if nested_deeper_than(body, MAX_JSON_DEPTH):
        raise BadAnswer(f"the answer is nested deeper than {MAX_JSON_DEPTH} levels", status)
    return without_nul(body) if may_hold_nul(bytes(raw)) else body


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` holds lists or objects more than `limit` levels deep. Level by level, not recursion: the value
    may be as deep as the parser allows. Only containers are kept: a 7 MB transcript takes about 90 ms, 40% of
    what orjson takes to parse it."""
    level: list[Any] = [value]
    for _ in range(limit):
        deeper: list[Any] = []
        for item in level:
            for child in item.values() if isinstance(item, dict) else item:
                if isinstance(child, dict | list):
                    deeper.append(child)
        if not deeper:
            return False
        level = deeper
    return True


def page_items(page: Mapping[str, Any], key: str, status: int) -> tuple[list[Any], str | None]:
    """A list answer's items under `key` and the cursor of the next page (None on the last); BadAnswer if the answer
    is not a page (ElevenLabs' page models: a list, `has_more` a bool, `next_cursor` a string or null)."""
    items, has_more, cursor = page.get(key), page.get("has_more"), page.get("next_cursor")
    if not isinstance(items, list):
        raise BadAnswer(f"the answer is not a page: {key!r} is not a list", status)
    if not isinstance(has_more, bool):
        raise BadAnswer("the answer is not a page: 'has_more' is not true or false", status)
    if cursor is not None and not isinstance(cursor, str):
        raise BadAnswer("the answer is not a page: 'next_cursor' is not a string", status)
    if has_more and not cursor:
        raise BadAnswer("the answer is not a page: 'has_more' without a 'next_cursor'", status)
    return items, cursor if has_more else None


async def read_at_most(response: httpx.Response, limit: int) -> bytearray | None:
    """The body, or None once it passes `limit` bytes (decoded bytes: a compressed bomb counts at its real size);
    reading stops there."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            return None
    return body


async def error_body(response: httpx.Response) -> bytes:
    """The start of an error answer, for its reason: never more than MAX_ERROR_BYTES, however long it is."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk[: MAX_ERROR_BYTES - len(body)]
        if len(body) >= MAX_ERROR_BYTES:
            break
    return bytes(body)


# --- the client ----------------------------------------------------------------------------------------------------


class ElevenLabsClient:
    """One client per run (the reconciler) or per app (the broker). `open()` builds it with its own httpx client;
    tests may pass any AsyncClient."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        api_key: str,
        *,
        retries: RetryPolicy | None = None,
        concurrency: int = 8,
        deadline: float | None = None,
        max_json_bytes: int = MAX_JSON_BYTES,
        max_audio_bytes: int = MAX_AUDIO_BYTES,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._api_key = api_key
        self._headers = {"xi-api-key": api_key}
        # An upstream that echoes the key in its status line would put it in httpx's own log line: no log shows it.
        logs.never_show(api_key)
        self._retries = retries or RetryPolicy()
        self._slots = anyio.Semaphore(concurrency)
        self._deadline = deadline
        self._max_json_bytes = max_json_bytes
        self._max_audio_bytes = max_audio_bytes
        self._sleep = sleep
        self._clock = clock
        self._not_before = 0.0  # clock time before which no request starts (a 429's Retry-After)
        self.calls: Counter[str] = Counter()  # requests sent, by kind (list, detail, audio, …), retries included

    @classmethod
    def open(
        cls, base_url: str, api_key: str, *, timeout: httpx.Timeout | None = None, concurrency: int = 8, **kwargs: Any
    ) -> ElevenLabsClient:
        """A client with its own connection pool; close it with `aclose()` (or `async with`)."""
        limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
        http = httpx.AsyncClient(
            base_url=base_url, timeout=timeout or TIMEOUT, limits=limits, headers={"user-agent": "postcall"}
        )
        return cls(http, api_key, concurrency=concurrency, **kwargs)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> ElevenLabsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- endpoints -------------------------------------------------------------------------------------------

    async def agents(self) -> AsyncIterator[dict[str, Any]]:
        """Every agent the key can list (`GET /v1/convai/agents`)."""
        async for page in self._pages("/v1/convai/agents", {"page_size": PAGE_SIZE}, "agents", "agents"):
            for agent in page:
                yield agent

    async def conversation_pages(
        self, agent_id: str | None, after_unix: int, before_unix: int
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Pages of conversation summaries with `after < start time < before` (as the API filters), of one agent or,
        with `agent_id` None, of the whole workspace (archived and deleted agents' included). Each summary carries
        its `transcript_summary`: the API leaves it out unless `summary_mode=include`."""
        params: dict[str, Any] = {
            "call_start_after_unix": after_unix,
            "call_start_before_unix": before_unix,
            "page_size": PAGE_SIZE,
            "summary_mode": "include",
        }
        if agent_id is not None:
            params["agent_id"] = agent_id
        async for page in self._pages("/v1/convai/conversations", params, "list", "conversations"):
            yield [item for item in page if isinstance(item, dict)]

    async def workspace_webhooks(self) -> list[Any]:
        """The workspace's webhooks (`GET /v1/workspace/webhooks`, WorkspaceWebhookListResponseModel): their URL,
        auth type, whether disabled or auto-disabled, their most recent failure. BadAnswer if `webhooks` is not a
        list."""
        answer = await self._get_json("/v1/workspace/webhooks", {}, "webhooks")
        webhooks = answer.get("webhooks")
        if not isinstance(webhooks, list):
            raise BadAnswer("the answer is not a webhook list: 'webhooks' is not a list", 200)
        return webhooks

    async def convai_settings(self) -> dict[str, Any]:
        """The workspace's ConvAI settings (`GET /v1/convai/settings`, GetConvAiSettingsResponseModel), whose
        `webhooks` names the post-call webhook (`post_call_webhook_id`) and what it is sent (`events`)."""
        return await self._get_json("/v1/convai/settings", {}, "settings")

    async def conversation(self, conversation_id: str) -> dict[str, Any]:
        """The full detail (`GET /v1/convai/conversations/{id}`)."""
        return await self._get_json(f"/v1/convai/conversations/{_segment(conversation_id)}", {}, "detail")

    async def download_audio(self, conversation_id: str, blobs: BlobStore) -> TempBlob:
        """Stream the recording (`GET …/{id}/audio`) into a temp blob, synced; NotFound when there is none.

        Each attempt writes a fresh temp file, so a half-written one never survives a retry. A 200 that is not a
        recording — another content type (a login page, a JSON error), bytes that do not start like audio, or more
        than `max_audio_bytes` — is a BadAnswer, and nothing of it is kept.
        """
        path = f"/v1/convai/conversations/{_segment(conversation_id)}/audio"

        async def write(response: httpx.Response) -> TempBlob:
            content_type = response.headers.get("content-type", "")
            if not is_audio_type(content_type):
                raise BadAnswer(f"the audio answer is {content_type[:80] or 'untyped'}, not audio (GET {path})")
            blob = await anyio.to_thread.run_sync(blobs.open_temp)
            try:
                async for chunk in response.aiter_bytes(1 << 16):
                    if blob.size == 0 and not looks_like_audio(chunk):
                        raise BadAnswer(f"the audio answer does not start like audio (GET {path})")
                    if blob.size + len(chunk) > self._max_audio_bytes:
                        raise BadAnswer(f"the audio answer is over {self._max_audio_bytes} bytes (GET {path})")
                    await anyio.to_thread.run_sync(blob.write, chunk)
                if blob.size == 0:
                    raise BadAnswer(f"the audio answer is empty (GET {path})")
                await anyio.to_thread.run_sync(blob.sync)
            except BaseException:
                blob.discard()
                raise
            return blob

        return await self._send(path, {}, "audio", write)

    async def conversation_token(self, agent_id: str, **params: str | None) -> dict[str, Any]:
        """`GET /v1/convai/conversation/token` (params: participant_name, branch_id, environment; None left out):
        the answer, whose `token` is a non-empty string."""
        answer = await self._get_json(TOKEN_PATH, _present(agent_id=agent_id, **params), "token")
        return _with_credential(answer, "token")

    async def signed_url(self, agent_id: str, **params: str | None) -> dict[str, Any]:
        """`GET /v1/convai/conversation/get-signed-url?include_conversation_id=true` (params: branch_id,
        environment): the answer, whose `signed_url` is a non-empty string."""
        query = _present(agent_id=agent_id, include_conversation_id="true", **params)
        return _with_credential(await self._get_json(SIGNED_URL_PATH, query, "signed_url"), "signed_url")

    async def delete_conversation(self, conversation_id: str) -> None:
        """Delete it at ElevenLabs (`DELETE /v1/convai/conversations/{id}`, retried like any call: deleting twice is
        harmless). NotFound when ElevenLabs holds no such conversation — for an erasure, as good as deleted."""

        async def done(response: httpx.Response) -> None:
            await read_at_most(response, MAX_ERROR_BYTES)  # a small acknowledgement; nothing in it is needed

        await self._send(f"/v1/convai/conversations/{_segment(conversation_id)}", {}, "delete", done)

    # --- plumbing --------------------------------------------------------------------------------------------

    async def _pages(self, path: str, params: Mapping[str, Any], kind: str, key: str) -> AsyncIterator[list[Any]]:
        cursor: str | None = None
        seen: set[str] = set()  # a cursor handed out twice would page forever
        while True:
            query = {**params, **({"cursor": cursor} if cursor else {})}
            items, cursor = page_items(await self._get_json(path, query, kind), key, 200)
            yield items
            if cursor is None:
                return
            if cursor in seen:
                raise BadAnswer(f"the API repeated cursor {cursor[:40]!r}; stopped paging", 200)
            seen.add(cursor)

    async def _get_json(self, path: str, params: Mapping[str, Any], kind: str) -> dict[str, Any]:
        async def parse(response: httpx.Response) -> dict[str, Any]:
            raw = await read_at_most(response, self._max_json_bytes)
            if raw is None:
                raise BadAnswer(f"the answer is larger than {self._max_json_bytes} bytes", response.status_code)
            return json_object(raw, response.status_code)

        return await self._send(path, params, kind, parse)

    async def _send(
        self, path: str, params: Mapping[str, Any], kind: str, consume: Callable[[httpx.Response], Awaitable[T]]
    ) -> T:
        """One call: its attempts, all of them within the client's deadline if it has one."""
        if self._deadline is None:
            return await self._attempts(path, params, kind, consume)
        try:
            with anyio.fail_after(self._deadline):
                return await self._attempts(path, params, kind, consume)
        except TimeoutError:
            raise TimedOut(f"ElevenLabs did not answer within {self._deadline:g} s ({_method(kind)} {path})") from None

    async def _attempts(
        self, path: str, params: Mapping[str, Any], kind: str, consume: Callable[[httpx.Response], Awaitable[T]]
    ) -> T:
        policy = self._retries

        def backoff(exc: Exception) -> bool | float:
            """stamina's backoff hook: whether to retry, and a Retry-After (bounded) as the wait when there is one."""
            if isinstance(exc, ApiError) and exc.retryable and exc.retry_after is not None:
                return min(exc.retry_after, policy.retry_after_max)
            return _retried(exc)

        retrying = stamina.retry_context(
            on=backoff,
            attempts=policy.attempts,
            timeout=None,  # bounded by the attempts (and the deadline, for a client that has one)
            wait_initial=policy.wait_initial,
            wait_max=policy.wait_max,
            wait_jitter=policy.wait_jitter,
        )
        async for attempt in retrying:
            with attempt:
                try:
                    return await self._attempt(path, params, kind, consume)
                except ElevenLabsError as exc:
                    if _retried(exc):
                        log.warning("%s (attempt %d of %d)", exc, attempt.num, policy.attempts)
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _attempt(
        self, path: str, params: Mapping[str, Any], kind: str, consume: Callable[[httpx.Response], Awaitable[T]]
    ) -> T:
        await self._wait_turn()
        async with self._slots:
            self.calls[kind] += 1
            request = self._http.build_request(_method(kind), path, params=params, headers=self._headers)
            try:
                response = await self._http.send(request, stream=True)
                try:
                    if response.is_success:
                        return await consume(response)
                    body = await error_body(response)
                finally:
                    await response.aclose()
            except httpx.TimeoutException as exc:
                raise TimedOut(
                    self._scrub(f"ElevenLabs did not answer in time: {_described(exc, kind, path)}")
                ) from None
            except httpx.TransportError as exc:
                raise Unreachable(self._scrub(f"cannot reach ElevenLabs: {_described(exc, kind, path)}")) from None
            except httpx.HTTPError as exc:  # a body that cannot be decoded (bad gzip…): an answer we cannot use
                raise BadAnswer(self._scrub(_described(exc, kind, path))) from None
        raise self._api_error(response, body)

    def _api_error(self, response: httpx.Response, body: bytes) -> ApiError:
        status = response.status_code
        retry_after = retry_after_seconds(response.headers.get("retry-after"), time.time())
        if status == 429 and retry_after is not None and self._retries.attempts > 1:
            # A rate limit is the account's, not one request's; a client that does not retry passes the wait on.
            wait = min(retry_after, self._retries.retry_after_max)
            self._not_before = max(self._not_before, self._clock() + wait)
        error = NotFound if status == 404 else ApiError
        return error(status, upstream_reason(body, response.reason_phrase, self._api_key), retry_after)

    async def _wait_turn(self) -> None:
        delay = self._not_before - self._clock()
        if delay > 0:
            await self._sleep(delay)

    def _scrub(self, text: str) -> str:
        return scrub_key(text, self._api_key)[:MAX_REASON_CHARS]


def _method(kind: str) -> str:
    """The HTTP method of a kind of call: every kind but `delete` only reads."""
    return "DELETE" if kind == "delete" else "GET"


def _described(exc: httpx.HTTPError, kind: str, path: str) -> str:
    return f"{type(exc).__name__} on {_method(kind)} {path}: {exc}"


def _segment(conversation_id: str) -> str:
    return quote(conversation_id, safe="")


def _present(**params: str | None) -> dict[str, str]:
    return {name: value for name, value in params.items() if value is not None}


def _with_credential(answer: dict[str, Any], name: str) -> dict[str, Any]:
    value = answer.get(name)
    if not isinstance(value, str) or not value:
        raise BadAnswer(f"the answer has no {name!r}", 200)
    return answer


# Content types a recording may come with: ElevenLabs sends audio/mpeg; a generic binary type is not refused.
_AUDIO_TYPES = ("audio/", "application/octet-stream")
# How the formats a recording can be in begin: an MP3 frame sync (11 set bits), an ID3 tag, WAV, Ogg, FLAC; an
# MP4/M4A box names its type at offset 4.
_AUDIO_MAGIC = (b"ID3", b"RIFF", b"OggS", b"fLaC")


def is_audio_type(content_type: str) -> bool:
    return content_type.strip().lower().startswith(_AUDIO_TYPES)


def looks_like_audio(head: bytes) -> bool:
    """Whether the first bytes of an answer start like a recording (a first chunk is never shorter than 8 bytes
    unless the whole answer is)."""
    if head.startswith(_AUDIO_MAGIC) or head[4:8] == b"ftyp":
        return True
    return len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0
