"""Forwarding tests' parts: a real webhook receiver that verifies Standard Webhooks signatures, a dispatcher running
on its own event loop in a thread, and emptying the forwarding tables of the shared PostgreSQL database."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anyio
import anyio.from_thread
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.forward.dispatcher import Dispatcher, Timing
from service.forward.schedule import RetrySchedule
from service.forward.signing import Signer
from service.forward.sinks import Sink
from service.forward.webhook_sink import WebhookSink
from tests.support.live import live_server

FORWARD_SECRET = "whsec_" + base64.b64encode(b"postcall-forward-test-secret-32b").decode()
# Retries in tenths of a second, so a test sees a sink fail and recover without waiting minutes.
QUICK = RetrySchedule(delays=(0.05, 0.1, 0.2), then_every=0.3, give_up_after=3600, jitter=0.0)


def quick_timing(**overrides: Any) -> Timing:
    return Timing(**{"poll": 0.01, "schedule": QUICK, "prune_every": 3600.0, **overrides})


@dataclass
class Received:
    event: dict[str, Any]
    headers: dict[str, str]

    @property
    def key(self) -> tuple[str, int]:
        return self.event["data"]["conversation_id"], self.event["data"]["revision"]


@dataclass
class Receiver:
    """An endpoint that verifies each POST with the `standardwebhooks` library and keeps what verified.

    `answer(event) -> status` decides its answer (200 by default); `delay` seconds pass before it answers;
    `in_flight`/`max_in_flight` count concurrent requests per event id (two at once would break the lease)."""

    secret: str = FORWARD_SECRET
    answer: Callable[[dict[str, Any]], int] = lambda event: 200
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    unverified: int = 0
    in_flight: dict[str, int] = field(default_factory=dict)
    overlapping: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        verifier = Webhook(self.secret)

        async def hook(request: Request) -> Response:
            body = await request.body()
            try:
                event = verifier.verify(body, dict(request.headers))
            except Exception:
                with self.lock:
                    self.unverified += 1
                return Response(status_code=401)
            event_id = event["id"]
            with self.lock:
                self.in_flight[event_id] = self.in_flight.get(event_id, 0) + 1
                if self.in_flight[event_id] > 1:
                    self.overlapping.append(event_id)
            try:
                if self.delay:
                    await anyio.sleep(self.delay)
                status = self.answer(event)
                with self.lock:
                    if 200 <= status < 300:
                        self.received.append(Received(event, dict(request.headers)))
                    else:
                        self.refused.append(event)
                return Response(status_code=status)
            finally:
                with self.lock:
                    self.in_flight[event_id] -= 1

        return Starlette(routes=[Route("/hook", hook, methods=["POST"])])

    def keys(self) -> list[tuple[str, int]]:
        with self.lock:
            return [item.key for item in self.received]

    def ids(self) -> list[str]:
        with self.lock:
            return [item.event["id"] for item in self.received]


@contextmanager
def receiving(receiver: Receiver) -> Iterator[str]:
    """The receiver on a free port; yields its hook URL."""
    with live_server(receiver.app()) as base:
        yield f"{base}/hook"


def webhook_sink(url: str, **options: Any) -> WebhookSink:
    return WebhookSink(url, Signer(FORWARD_SECRET), **options)


@contextmanager
def dispatching(
    engine: Engine, sinks: Sequence[Sink], timing: Timing | None = None, retention_seconds: float = 30 * 86400
) -> Iterator[Dispatcher]:
    """A dispatcher running in a thread of its own (its own event loop) until the block ends."""
    dispatcher = Dispatcher(engine, sinks, retention_seconds=retention_seconds, timing=timing or quick_timing())
    with anyio.from_thread.start_blocking_portal() as portal:
        future = portal.start_task_soon(dispatcher.run)
        try:
            yield dispatcher
        finally:
            future.cancel()
            time.sleep(0.05)


def wait_until(condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


FORWARD_TABLES = ("forward_attempt", "forward_delivery", "forward_sink", "forward_event")


def empty_forwarding(engine: Engine) -> None:
    """The session's PostgreSQL database is shared by the tests: start each forwarding test from an empty feed."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"TRUNCATE {', '.join(FORWARD_TABLES)} RESTART IDENTITY")
        else:
            for table in FORWARD_TABLES:
                conn.exec_driver_sql(f"DELETE FROM {table}")
        conn.exec_driver_sql("UPDATE forward_sequence SET last = 0")


def table_rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(sql), params).all())


def by_revision(received: Sequence[tuple[str, int]]) -> dict[str, list[int]]:
    """conversation_id → the revisions received, in arrival order."""
    order: dict[str, list[int]] = {}
    for conversation_id, revision in received:
        order.setdefault(conversation_id, []).append(revision)
    return order


def lease(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def loads(body: bytes) -> Any:
    return orjson.loads(body)
