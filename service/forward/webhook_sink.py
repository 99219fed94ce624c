"""The Standard Webhooks sink: each event as a signed POST; a 2xx within the deadline is delivered."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import urlsplit

import anyio
import httpx

from service import logs
from service.forward.signing import Signer
from service.forward.sinks import Outcome, Outgoing, sink_name

DEADLINE_SECONDS = 15.0  # the whole attempt, connect to last byte (PRODUCT: "a 2xx within 15 s")
CONCURRENCY = 16  # per endpoint: requests in flight, and so connections kept alive (httpx's pool slows past ~16)
ANSWER_EXCERPT = 200  # characters of a refusing answer kept in last_error, for the person looking
USER_AGENT = "postcall-forward/1"


class WebhookSink:
    def __init__(
        self,
        url: str,
        signer: Signer,
        *,
        concurrency: int = CONCURRENCY,
        deadline: float = DEADLINE_SECONDS,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.name = sink_name(url)
        self.concurrency = concurrency
        self._url = url
        self._signer = signer
        self.deadline = deadline
        self._clock = clock
        _hide_credentials(url)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(deadline),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            follow_redirects=False,  # a 3xx is not a delivery; following it could send the event elsewhere
            headers={"user-agent": USER_AGENT, "content-type": "application/json"},
        )

    async def send(self, event: Outgoing) -> Outcome:
        started = time.perf_counter()
        headers = self._signer.headers(event.event_id, event.body, self._clock())
        try:
            with anyio.fail_after(self.deadline):
                answer = await self._client.post(self._url, content=event.body.encode(), headers=headers)
        except TimeoutError:
            return Outcome(False, time.perf_counter() - started, error=f"no answer within {self.deadline:g} s")
        except httpx.HTTPError as exc:
            return Outcome(False, time.perf_counter() - started, error=self._describe(exc))
        latency = time.perf_counter() - started
        if answer.is_success:
            return Outcome(True, latency, answer.status_code)
        excerpt = answer.text[:ANSWER_EXCERPT].strip()
        error = f"HTTP {answer.status_code}" + (f": {excerpt}" if excerpt else "")
        return Outcome(False, latency, answer.status_code, error)

    def _describe(self, exc: httpx.HTTPError) -> str:
        # httpx may name the request's URL in its message: the configured one can carry credentials.
        text = f"{type(exc).__name__}: {exc}".replace(self._url, self.name)
        return text if text.strip(": ") else type(exc).__name__

    async def aclose(self) -> None:
        await self._client.aclose()


class _NotOurRequests(logging.Filter):
    """Drops httpx's `HTTP Request:` line for requests to forwarding endpoints: one per event is noise at
    thousands a second, and the URL it names may carry credentials. Other httpx lines (ElevenLabs') stay."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, tuple) and len(args) > 1 and str(args[1]) in self.urls)


_QUIET = _NotOurRequests()


def _hide_credentials(url: str) -> None:
    if _QUIET not in logging.getLogger("httpx").filters:
        logging.getLogger("httpx").addFilter(_QUIET)
    _QUIET.urls.add(str(httpx.URL(url)))
    parts = urlsplit(url)
    for secret in (parts.password, parts.query):
        if secret:
            logs.never_show(secret)
