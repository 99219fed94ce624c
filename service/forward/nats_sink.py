"""The NATS JetStream sink: each event published to `postcall.<type>.<agent_id>` with `Nats-Msg-Id` = its id.

Delivered only once the stream acknowledges it (the ack says the stream stored it). JetStream drops a message
whose `Nats-Msg-Id` it has seen within the stream's duplicate window (2 minutes by default), so a retry of an
event the stream already took (an ack lost on the way back) is stored once; redeliveries after that window (a
replay) are stored again, and consumers dedupe by the id as with webhooks.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time

import anyio
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from service.forward.sinks import Outcome, Outgoing, sink_name

log = logging.getLogger("postcall.forward")

SUBJECT_ROOT = "postcall"
CONCURRENCY = 256  # publishes awaiting their ack at once
ACK_SECONDS = 10.0
CONNECT_SECONDS = 2
_NOT_A_TOKEN = re.compile(r"[^A-Za-z0-9_-]")


def subject(event_type: str, agent_id: str | None) -> str:
    """`postcall.conversation.created.<agent>`: the agent id made one subject token (`none` when absent), so a
    consumer can filter on `postcall.*.*.<agent>`; a character a token cannot hold (`.`, `*`, `>`, space…) is
    `_`."""
    agent = _NOT_A_TOKEN.sub("_", agent_id) if agent_id else "none"
    return f"{SUBJECT_ROOT}.{event_type}.{agent}"


class NatsSink:
    def __init__(self, url: str, stream: str, *, concurrency: int = CONCURRENCY) -> None:
        self.name = sink_name(url)
        self.concurrency = concurrency
        self.deadline = 2 * CONNECT_SECONDS + ACK_SECONDS  # a connection, then the ack
        self._url = url
        self._stream = stream
        self._client: Client | None = None
        self._js: JetStreamContext | None = None
        self._connecting = anyio.Lock()

    async def _jetstream(self) -> JetStreamContext:
        async with self._connecting:
            if self._js is not None and self._client is not None and not self._client.is_closed:
                return self._js
            # nats-py keeps trying a first connection as long as it would reconnect one (for ever, below): the
            # attempt is bounded here, and a failed one is a failed attempt, retried on the schedule.
            with anyio.fail_after(2 * CONNECT_SECONDS):
                client = await nats.connect(
                    self._url,
                    connect_timeout=CONNECT_SECONDS,
                    max_reconnect_attempts=-1,  # once connected, ride out restarts of the server
                    error_cb=self._on_error,
                )
            js = client.jetstream()
            try:
                await js.stream_info(self._stream)
            except nats.js.errors.NotFoundError:
                await js.add_stream(name=self._stream, subjects=[f"{SUBJECT_ROOT}.>"])
                log.info("created JetStream stream %s on %s", self._stream, self.name)
            self._client, self._js = client, js
            return js

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS %s: %s", self.name, type(exc).__name__)  # the attempt's outcome says it once

    async def send(self, event: Outgoing) -> Outcome:
        started = time.perf_counter()
        try:
            js = await self._jetstream()
            await js.publish(
                subject(event.type, event.agent_id),
                event.body.encode(),
                timeout=ACK_SECONDS,
                stream=self._stream,
                headers={"Nats-Msg-Id": event.event_id},
            )
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            return Outcome(False, time.perf_counter() - started, error=_describe(exc))
        return Outcome(True, time.perf_counter() - started)

    async def reachable(self) -> str | None:
        """A connection, and the server's JetStream answering for the account (the stream is not created here)."""
        client: Client | None = None
        try:
            with anyio.fail_after(2 * CONNECT_SECONDS):
                client = await nats.connect(
                    self._url, connect_timeout=CONNECT_SECONDS, max_reconnect_attempts=0, error_cb=self._on_error
                )
                await client.jetstream().account_info()
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            return _describe(exc)
        finally:
            if client is not None and not client.is_closed:
                with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                    await client.close()
        return None

    async def aclose(self) -> None:
        if self._client is not None and not self._client.is_closed:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await self._client.close()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
