"""The httpx client for the ElevenLabs conversations API: agents, conversation pages, details and audio.

- Every request carries `xi-api-key`, has timeouts, and holds one of `concurrency` slots while it is on the wire.
- 429, 5xx and transport errors (httpx.TransportError: connect/read/write/pool timeouts, connection resets,
  protocol errors) are retried a bounded number of times with jittered exponential backoff. A `Retry-After`
  (seconds or an HTTP date) is honoured, and for everyone: after a 429 no request starts before it has passed.
- Pages are async iterators that follow `next_cursor` while `has_more`, one page in memory at a time.
- Answers are plain dicts: unknown fields are kept, never rejected (record/payloads.py reads what it knows).

Errors: ApiError(status, reason) for an answer that is not retried or still failing after the retries
(NotFound for 404), Unreachable for transport errors after the retries. Both are ElevenLabsError.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import anyio
import anyio.to_thread
import httpx

from service.record.payloads import may_hold_nul, without_nul
from service.storage.audio import BlobStore, TempBlob

log = logging.getLogger("postcall.elevenlabs")
T = TypeVar("T")

PAGE_SIZE = 100  # the API's maximum
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
MAX_REASON_CHARS = 300


class ElevenLabsError(Exception):
    """A request that failed for good (after retries, where retrying made sense)."""


class ApiError(ElevenLabsError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


class NotFound(ApiError):
    pass


class Unreachable(ElevenLabsError):
    pass


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: `attempts` in all; backoff `wait_initial * 2**n` capped at `wait_max`, plus up to
    `wait_jitter` of random jitter; a Retry-After is honoured up to `retry_after_max`."""

    attempts: int = 6
    wait_initial: float = 0.5
    wait_max: float = 30.0
    wait_jitter: float = 1.0
    retry_after_max: float = 120.0

    @classmethod
    def testing(cls) -> RetryPolicy:
        """Tiny waits, for tests: the retries still happen, and Retry-After is still honoured."""
        return cls(attempts=4, wait_initial=0.001, wait_max=0.01, wait_jitter=0.001)

    def backoff(self, retry: int, rng: random.Random) -> float:
        return float(min(self.wait_initial * 2**retry, self.wait_max) + rng.uniform(0, self.wait_jitter))


_testing = False


def set_testing(on: bool) -> None:
    """Make `default_policy()` the testing policy (what stamina.set_testing does for stamina's retries)."""
    global _testing
    _testing = on


def default_policy() -> RetryPolicy:
    return RetryPolicy.testing() if _testing else RetryPolicy()


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A Retry-After header as seconds from `now`: delta-seconds or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


def _reason(response: httpx.Response, api_key: str) -> str:
    """The API's own words for an error, shortened, with the API key scrubbed from them: an error message may
    echo the request's headers, and the reason travels on to the run record, the summary and the logs."""
    try:
        body: Any = response.json()
    except ValueError:
        return scrub_key(response.text or response.reason_phrase, api_key)[:MAX_REASON_CHARS]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, dict):
        detail = detail.get("message") or detail.get("status") or detail
    # Scrub, then shorten: shortening first could cut an echoed key in two, and a half key escapes the scrub.
    return scrub_key(str(detail), api_key)[:MAX_REASON_CHARS]


def scrub_key(text: str, api_key: str) -> str:
    """`text` with the API key replaced: for anything an upstream answer or error carries on to logs or answers."""
    return text.replace(api_key, "[api key]") if api_key else text


class ElevenLabsClient:
    """One client per run. `open()` builds it with its own httpx client; tests may pass any AsyncClient."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        api_key: str,
        *,
        policy: RetryPolicy | None = None,
        concurrency: int = 8,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._http = http
        self._api_key = api_key
        self._headers = {"xi-api-key": api_key}
        self._policy = policy or default_policy()
        self._slots = anyio.Semaphore(concurrency)
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._not_before = 0.0  # clock time before which no request starts (a 429's Retry-After)
        self.calls: Counter[str] = Counter()  # requests sent, by kind (list, detail, audio, agents), retries included

    @classmethod
    def open(cls, base_url: str, api_key: str, **kwargs: Any) -> ElevenLabsClient:
        """A client with its own connection pool; close it with `aclose()` (or `async with`)."""
        concurrency = kwargs.get("concurrency", 8)
        limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
        http = httpx.AsyncClient(
            base_url=base_url, timeout=TIMEOUT, limits=limits, headers={"user-agent": "postcall-reconcile"}
        )
        return cls(http, api_key, **kwargs)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> ElevenLabsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- endpoints -------------------------------------------------------------------------------------------

    async def agents(self) -> AsyncIterator[dict[str, Any]]:
        """Every agent the key can list (`GET /v1/convai/agents`)."""
        async for page in self._pages("/v1/convai/agents", {"page_size": PAGE_SIZE}, "agents"):
            for agent in page.get("agents") or []:
                yield agent

    async def conversation_pages(
        self, agent_id: str, after_unix: int, before_unix: int
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Pages of conversation summaries of one agent with `after < start time < before` (as the API filters)."""
        params = {
            "agent_id": agent_id,
            "call_start_after_unix": after_unix,
            "call_start_before_unix": before_unix,
            "page_size": PAGE_SIZE,
        }
        async for page in self._pages("/v1/convai/conversations", params, "list"):
            yield [item for item in page.get("conversations") or [] if isinstance(item, dict)]

    async def conversation(self, conversation_id: str) -> dict[str, Any]:
        """The full detail (`GET /v1/convai/conversations/{id}`)."""
        response = await self._request(f"/v1/convai/conversations/{_segment(conversation_id)}", {}, "detail")
        return _json_object(response)

    async def download_audio(self, conversation_id: str, blobs: BlobStore) -> TempBlob:
        """Stream the recording (`GET …/{id}/audio`) into a temp blob, synced; NotFound when there is none.

        Each attempt writes a fresh temp file, so a half-written one never survives a retry.
        """
        path = f"/v1/convai/conversations/{_segment(conversation_id)}/audio"

        async def write(response: httpx.Response) -> TempBlob:
            blob = await anyio.to_thread.run_sync(blobs.open_temp)
            try:
                async for chunk in response.aiter_bytes(1 << 16):
                    await anyio.to_thread.run_sync(blob.write, chunk)
                await anyio.to_thread.run_sync(blob.sync)
            except BaseException:
                blob.discard()
                raise
            return blob

        return await self._send(path, {}, "audio", write)

    # --- plumbing --------------------------------------------------------------------------------------------

    async def _pages(self, path: str, params: Mapping[str, Any], kind: str) -> AsyncIterator[dict[str, Any]]:
        cursor: str | None = None
        seen: set[str] = set()  # a cursor handed out twice would page forever
        while True:
            query = {**params, **({"cursor": cursor} if cursor else {})}
            response = await self._request(path, query, kind)
            page = _json_object(response)
            yield page
            cursor = page.get("next_cursor")
            if not page.get("has_more") or not isinstance(cursor, str) or not cursor:
                return
            if cursor in seen:
                raise ApiError(response.status_code, f"the API repeated cursor {cursor[:40]!r}; stopped paging")
            seen.add(cursor)

    async def _request(self, path: str, params: Mapping[str, Any], kind: str) -> httpx.Response:
        async def keep(response: httpx.Response) -> httpx.Response:
            await response.aread()
            return response

        return await self._send(path, params, kind, keep)

    async def _send(
        self, path: str, params: Mapping[str, Any], kind: str, consume: Callable[[httpx.Response], Awaitable[T]]
    ) -> T:
        policy = self._policy
        for attempt in range(policy.attempts):
            await self._wait_turn()
            last = attempt == policy.attempts - 1
            try:
                async with self._slots:
                    self.calls[kind] += 1
                    request = self._http.build_request("GET", path, params=params, headers=self._headers)
                    response = await self._http.send(request, stream=True)
                    try:
                        if response.status_code < 400:
                            return await consume(response)
                        await response.aread()
                    finally:
                        await response.aclose()
            except httpx.TransportError as exc:
                if last:
                    raise Unreachable(scrub_key(f"{type(exc).__name__} on GET {path}: {exc}", self._api_key)) from exc
                await self._back_off(attempt, None, f"{type(exc).__name__} on GET {path}")
                continue
            status = response.status_code
            if not _retryable(status) or last:
                error = NotFound if status == 404 else ApiError
                raise error(status, _reason(response, self._api_key))
            await self._back_off(attempt, response, f"HTTP {status} on GET {path}")
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _wait_turn(self) -> None:
        delay = self._not_before - self._clock()
        if delay > 0:
            await self._sleep(delay)

    async def _back_off(self, attempt: int, response: httpx.Response | None, what: str) -> None:
        wait = self._policy.backoff(attempt, self._rng)
        if response is not None:
            hinted = retry_after_seconds(response.headers.get("retry-after"), time.time())
            if hinted is not None:
                wait = max(wait, min(hinted, self._policy.retry_after_max))
                if response.status_code == 429:
                    self._not_before = max(self._not_before, self._clock() + wait)
        log.warning("%s; retrying in %.2fs (attempt %d of %d)", what, wait, attempt + 2, self._policy.attempts)
        await self._sleep(wait)


def _segment(conversation_id: str) -> str:
    return quote(conversation_id, safe="")


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise ApiError(response.status_code, "answer is not JSON") from exc
    if not isinstance(body, dict):
        raise ApiError(response.status_code, "answer is not a JSON object")
    return without_nul(body) if may_hold_nul(response.content) else body  # see events.without_nul
