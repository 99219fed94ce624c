"""Prometheus metrics: one `CollectorRegistry` per app (never the global one, so tests can build many apps).

Counted in the process: webhook deliveries by type and outcome, request latency per route. Read from the
database at scrape time (so every replica and the cron-run reconciler agree): reconcile runs, gaps filled, the
last successful reconcile, the workspace's post-call webhook as the last run found it, stored conversations, and
each forwarding sink's backlog. Forwarding attempts and delivery latency are counted by the dispatcher that made
them (in `serve`, or in `postcall forward --metrics-port`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.reads import count_conversations
from service.forward import deliveries
from service.storage.db import StoreUnavailable, unavailable_as_store_error
from service.storage.tables import ReconcileRun

# Commit to delivery: tens of milliseconds when all is well, hours when a sink was down.
DELIVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNMATCHED_ROUTE = "unmatched"
# A refused delivery was not (or not fully) read, and an unverified body is not to be trusted: its type is unknown.
UNREAD_TYPE = "unknown"
REFUSALS = {
    400: "bad_payload",
    401: "invalid_signature",
    408: "too_slow",
    413: "too_large",
    499: "disconnected",
    503: "unavailable",
    500: "error",
}

reconcile_runs: sa.Table = ReconcileRun.__table__  # type: ignore[attr-defined]


class ForwardMetrics:
    """What a dispatcher reports (forward/dispatcher.py `Observer`): attempts by outcome, commit-to-delivery time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.attempts = Counter(
            "postcall_forward_attempts",
            "Attempts at sending an event to a sink, by outcome: delivered, failed (to be retried) or dead.",
            ["sink", "outcome"],
            registry=registry,
        )
        self.delivery_seconds = Histogram(
            "postcall_forward_delivery_seconds",
            "Time from an event's commit to its delivery to a sink.",
            ["sink"],
            buckets=DELIVERY_BUCKETS,
            registry=registry,
        )

    def attempted(self, sink: str, outcome: str) -> None:
        self.attempts.labels(sink, outcome).inc()

    def delivered(self, sink: str, seconds_since_commit: float) -> None:
        self.delivery_seconds.labels(sink).observe(seconds_since_commit)


class BacklogCollector(Collector):
    """Each sink's backlog, read from the database when Prometheus scrapes (every replica agrees)."""

    def __init__(self, engine: Callable[[], Engine | None], sinks: Callable[[], Sequence[str]]) -> None:
        self._engine = engine
        self._sinks = sinks

    def describe(self) -> Iterator[Metric]:
        yield from self._families([])

    def collect(self) -> Iterator[Metric]:
        engine, names = self._engine(), list(self._sinks())
        report: list[deliveries.SinkStatus] = []
        if engine is not None and names:
            try:
                with unavailable_as_store_error(), engine.connect() as conn:
                    report = deliveries.status(conn, names)
            except (StoreUnavailable, sa.exc.SQLAlchemyError):
                report = []
        yield from self._families(report)

    def _families(self, report: list[deliveries.SinkStatus]) -> Iterator[Metric]:
        backlog = GaugeMetricFamily(
            "postcall_forward_backlog", "Events waiting to be delivered to a sink (retries included).", labels=["sink"]
        )
        oldest = GaugeMetricFamily(
            "postcall_forward_oldest_pending_seconds",
            "Age of the oldest event waiting for a sink (0: none waits).",
            labels=["sink"],
        )
        dead = GaugeMetricFamily(
            "postcall_forward_dead", "Events a sink was given up on (replayable).", labels=["sink"]
        )
        now = datetime.now(UTC)
        for sink in report:
            backlog.add_metric([sink.sink], float(sink.pending))
            waited = (now - sink.oldest_pending_at).total_seconds() if sink.oldest_pending_at else 0.0
            oldest.add_metric([sink.sink], max(waited, 0.0))
            dead.add_metric([sink.sink], float(sink.dead))
        yield backlog
        yield oldest
        yield dead


class Metrics:
    def __init__(
        self, engine: Callable[[], Engine | None], forward_sinks: Callable[[], Sequence[str]] = lambda: ()
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.forward = ForwardMetrics(self.registry)
        self.registry.register(BacklogCollector(engine, forward_sinks))
        self.webhooks = Counter(
            "postcall_webhooks",
            "Webhook deliveries by event type and outcome (accepted, duplicate, ignored, or why it was refused).",
            ["type", "outcome"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "postcall_http_request_duration_seconds",
            "Time from request to the end of the answer, per route template.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(StoredCollector(engine))

    def webhook(self, event_type: str, outcome: str) -> None:
        self.webhooks.labels(event_type, outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class StoredCollector(Collector):
    """Figures that live in the database, read when Prometheus scrapes; a database outage is `database_up 0`."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self._engine = engine

    def describe(self) -> Iterator[Metric]:
        yield from self._families({})

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        figures: dict[str, Any] = {}
        if engine is not None:
            try:
                with unavailable_as_store_error(), engine.connect() as conn:
                    figures = _read_figures(conn)
            except (StoreUnavailable, sa.exc.SQLAlchemyError):
                figures = {}
        yield from self._families(figures)

    def _families(self, figures: Mapping[str, Any]) -> Iterator[Metric]:
        up = GaugeMetricFamily("postcall_database_up", "1 when the last scrape could read the database.")
        up.add_metric([], 1.0 if figures else 0.0)
        yield up
        runs = CounterMetricFamily(
            "postcall_reconcile_runs", "Finished reconcile runs (dry runs excluded), by status.", labels=["status"]
        )
        for status, count in sorted(figures.get("runs", {}).items()):
            runs.add_metric([status], count)
        yield runs
        gaps = CounterMetricFamily(
            "postcall_reconcile_gaps_filled", "Conversations the reconciler stored that no webhook had delivered."
        )
        if figures:
            gaps.add_metric([], figures["gaps_filled"])
        yield gaps
        last = GaugeMetricFamily(
            "postcall_reconcile_last_success_timestamp_seconds",
            "Unix time the last successful reconcile run finished (0: never).",
        )
        if figures:
            last.add_metric([], figures["last_success"])
        yield last
        webhook = GaugeMetricFamily(
            "postcall_upstream_webhook_healthy",
            "1 when the last finished reconcile run found the workspace's post-call webhook healthy at ElevenLabs "
            "(enabled, not auto-disabled, no failure in the last day), 0 when not; absent when no run could tell.",
        )
        if figures.get("webhook_healthy") is not None:
            webhook.add_metric([], 1.0 if figures["webhook_healthy"] else 0.0)
        yield webhook
        stored = GaugeMetricFamily("postcall_conversations_stored", "Conversations stored.")
        if figures:
            stored.add_metric([], figures["conversations"])
        yield stored


def _read_figures(conn: sa.Connection) -> dict[str, Any]:
    r = reconcile_runs.c
    real = r.dry_run.is_(False)
    runs = conn.execute(
        sa.select(r.status, sa.func.count()).where(real, r.status != "running").group_by(r.status)
    ).all()
    gaps = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(r.new), 0)).where(real)).scalar_one()
    last = conn.execute(sa.select(sa.func.max(r.finished_at)).where(real, r.status == "succeeded")).scalar_one()
    latest = sa.select(r.upstream_webhook_healthy).where(real, r.status != "running")
    webhook = conn.execute(latest.order_by(r.started_at.desc(), r.id.desc()).limit(1)).scalar_one_or_none()
    return {
        "runs": {status: float(count) for status, count in runs},
        "gaps_filled": float(gaps),
        "last_success": last.timestamp() if last is not None else 0.0,
        "webhook_healthy": webhook,
        "conversations": float(count_conversations(conn)),
    }


class MetricsMiddleware:
    """Times every HTTP request, labelled with the route template (never the raw path).

    It also counts webhook deliveries that were refused: those answers come from the error handlers, so the
    status is the one place that knows them all. Accepted ones are counted by the route, which knows the type.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, webhook_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.metrics = metrics
        self.webhook_paths = webhook_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")  # set by the router on the scope it was given
            template = route.path if isinstance(route, Route) else UNMATCHED_ROUTE
            self.metrics.request_seconds.labels(scope["method"], template, str(status)).observe(
                time.perf_counter() - started
            )
            if template in self.webhook_paths and status >= 400:
                self.metrics.webhook(UNREAD_TYPE, REFUSALS.get(status, f"http_{status}"))


def metrics_of(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def scrape(request: Request) -> Response:
    # The collector queries the database (synchronous drivers): off the event loop.
    body = await anyio.to_thread.run_sync(metrics_of(request).exposition)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def routes() -> list[Route]:
    return [Route("/metrics", scrape, methods=["GET"])]
