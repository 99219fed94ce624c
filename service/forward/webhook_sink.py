"""The Standard Webhooks sink: each event as a signed POST; a 2xx within the deadline is delivered.

The client is aiohttp rather than httpx (which postcall uses towards ElevenLabs): posting the same signed 3 KB event
to an endpoint on loopback over 16 kept-alive connections, aiohttp made 1,926 to 2,001 requests a second where httpx
made 241 to 246, in the same run (`tests/bench/forward.py`, part `clients`); httpx's cost per request was the
forwarding's ceiling.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiohttp
import anyio
import yarl

from service import logs
from service.forward.signing import Signer
from service.forward.sinks import Outcome, Outgoing, sink_name

DEADLINE_SECONDS = 15.0  # the whole attempt, connect to last byte (PRODUCT: "a 2xx within 15 s")
CONCURRENCY = 16  # per endpoint: requests in flight, and so connections kept alive
ANSWER_EXCERPT = 200  # characters of a refusing answer kept in last_error, for the person looking
USER_AGENT = "postcall-forward/1"
PROBE_SECONDS = 5.0  # `postcall doctor`'s connection attempt


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
        self.deadline = deadline
        self._url = url
        self._signer = signer
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        for secret in _secrets_of(url):
            logs.never_show(secret)

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use: aiohttp binds a session to the running event loop, and sinks are built before one runs
        # (`postcall forward` builds them, then starts its loop).
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.concurrency),
                timeout=aiohttp.ClientTimeout(total=self.deadline),
                headers={"user-agent": USER_AGENT, "content-type": "application/json"},
            )
        return self._session

    async def send(self, event: Outgoing) -> Outcome:
        started = time.perf_counter()
        headers = self._signer.headers(event.event_id, event.body, self._clock())
        try:
            with anyio.fail_after(self.deadline):
                # A 3xx is not a delivery; following it could send the event elsewhere.
                async with self._client().post(
                    self._url, data=event.body.encode(), headers=headers, allow_redirects=False
                ) as answer:
                    status, text = answer.status, await answer.read()
        except TimeoutError:
            return Outcome(False, time.perf_counter() - started, error=f"no answer within {self.deadline:g} s")
        except (aiohttp.ClientError, ValueError) as exc:
            return Outcome(False, time.perf_counter() - started, error=self._describe(exc))
        latency = time.perf_counter() - started
        if 200 <= status < 300:
            return Outcome(True, latency, status)
        excerpt = text.decode("utf-8", "replace")[:ANSWER_EXCERPT].strip()
        error = f"HTTP {status}" + (f": {excerpt}" if excerpt else "")
        return Outcome(False, latency, status, error)

    async def reachable(self) -> str | None:
        """A TCP connection to the endpoint, with the TLS handshake for https: nothing is posted, so the check sends
        the team's system no event it would have to ignore."""
        parts = yarl.URL(self._url)
        tls = parts.scheme == "https"
        if parts.host is None or parts.scheme not in ("http", "https"):
            return "not an http or https URL"
        try:
            with anyio.fail_after(PROBE_SECONDS):
                port = parts.port or (443 if tls else 80)
                if tls:
                    await (await anyio.connect_tcp(parts.host, port, tls=True)).aclose()
                else:
                    await (await anyio.connect_tcp(parts.host, port)).aclose()
        except TimeoutError:
            return f"no connection within {PROBE_SECONDS:g} s"
        except (OSError, anyio.BrokenResourceError) as exc:
            return self._describe(exc)
        return None

    def _describe(self, exc: Exception) -> str:
        # A client error may name the request's URL: the configured one can carry credentials.
        text = f"{type(exc).__name__}: {exc}"
        for spelling in {self._url, str(yarl.URL(self._url))}:
            text = text.replace(spelling, self.name)
        return text if text.strip(": ") else type(exc).__name__

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _secrets_of(url: str) -> list[str]:
    parts = urlsplit(url)
    return [secret for secret in (parts.password, parts.query) if secret]
