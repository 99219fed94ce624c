"""`create_app(settings)`: the Starlette application, with its resources owned by the lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
from sqlalchemy.engine import Connection, Engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from service.api import openapi
from service.api import routes as api_routes
from service.broker import routes as broker_routes
from service.broker import sessions
from service.config import Settings
from service.console import routes as console_routes
from service.forward import operate as forward_operate
from service.forward import routes as forward_routes
from service.forward.configured import build_sinks, sink_names
from service.forward.dispatcher import Dispatcher
from service.record import store
from service.storage.audio import AudioStoreError, BlobStore
from service.storage.db import StoreUnavailable, create_engine, transaction
from service.storage.stores import open_audio_store
from service.web import health, metrics
from service.web.errors import EXCEPTION_HANDLERS, unexpected
from service.web.state import AppState
from service.webhook import routes as webhook_routes
from service.webhook.body import DEFAULT_PACE, Pace
from service.webhook.pending import PendingBudget
from service.webhook.writer import BatchWriter

log = logging.getLogger("postcall.app")


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    clock: Callable[[], float] = time.time,
    pace: Pace = DEFAULT_PACE,
) -> Starlette:
    """The whole HTTP service. `engine`, `clock` and `pace` are for tests; by default they come from settings,
    time and the receiver's default pace."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        own_engine = engine is None
        db = create_engine(settings.database_url) if engine is None else engine
        blobs = open_audio_store(settings)
        await anyio.to_thread.run_sync(_tidy_data_dir, blobs, db)
        elevenlabs = sessions.elevenlabs_client(settings)
        writer = BatchWriter(db)
        writer.start()
        webhooks = webhook_routes.Receiver(
            secrets=[secret.get_secret_value().encode() for secret in settings.webhook_secrets],
            tolerance_seconds=settings.webhook_tolerance_seconds,
            max_body_bytes=settings.max_body_bytes,
            engine=db,
            blobs=blobs,
            writer=writer,
            pending=PendingBudget(settings.max_pending_bytes),
            count=app_metrics.webhook,
            clock=clock,
            pace=pace,
        )
        app.state.postcall = AppState(
            settings=settings, engine=db, blobs=blobs, clock=clock, elevenlabs=elevenlabs, webhooks=webhooks
        )
        try:
            async with anyio.create_task_group() as background:
                # Forwarding runs beside the receiver, never in its way: its own loops, threads and connections.
                if settings.forward_in_serve and sink_names(settings):
                    dispatcher = Dispatcher(
                        db,
                        build_sinks(settings),
                        retention_seconds=settings.events_retention,
                        observer=app_metrics.forward,
                    )
                    background.start_soon(dispatcher.run)
                    # The receiver's commits wake the dispatcher (from the writer's thread, so through the loop);
                    # the dispatcher's poll still finds what other processes commit.
                    loop = asyncio.get_running_loop()
                    writer.on_commit = lambda: loop.call_soon_threadsafe(dispatcher.wake)
                yield
                background.cancel_scope.cancel()
        finally:
            writer.on_commit = None
            await anyio.to_thread.run_sync(writer.stop)
            if elevenlabs is not None:
                await elevenlabs.aclose()
            if own_engine:
                db.dispose()

    routes: list[BaseRoute] = [
        *webhook_routes.routes(lambda: _state(app).webhooks),
        *broker_routes.routes(),
        *api_routes.routes(),
        *forward_routes.routes(),
        *forward_operate.routes(),
        *health.routes(),
        *metrics.routes(),
        *openapi.routes(),
        *console_routes.mounted(forward_backlog=_forward_backlog(settings)),
    ]
    # Per app, never prometheus' global registry: tests build many apps in one process.
    app_metrics = metrics.Metrics(engine=lambda: _running_engine(app), forward_sinks=lambda: sink_names(settings))
    webhook_paths = frozenset({webhook_routes.PATH})
    app = Starlette(
        routes=routes,
        middleware=[Middleware(metrics.MetricsMiddleware, metrics=app_metrics, webhook_paths=webhook_paths)],
        exception_handlers={**EXCEPTION_HANDLERS, Exception: unexpected},
        lifespan=lifespan,
    )
    # A trailing slash is a 404, not a 307 whose Location is built from the client's own Host header.
    app.router.redirect_slashes = False
    app.state.metrics = app_metrics
    return app


def _tidy_data_dir(blobs: BlobStore, engine: Engine) -> None:
    """Undo what writers that crashed left in the audio store: audio put in place by a transaction that never
    committed, then temp files (staged uploads) nobody is writing any more. A bucket that does not answer leaves
    them for the next start: serving must not wait for it (audio webhooks get 503 until it answers)."""
    try:
        blobs.settle_claims(lambda relpath: transaction(engine, lambda conn: store.audio_is_claimed(conn, relpath)))
    except StoreUnavailable as exc:
        log.warning("audio of interrupted writes left for the next start: database unavailable (%s)", exc)
    except AudioStoreError as exc:
        log.warning("audio of interrupted writes left for the next start: %s (%s)", blobs.describe(), exc.strerror)
    try:
        blobs.clean_temp()
    except AudioStoreError as exc:
        log.warning("staged uploads left for the next start: %s (%s)", blobs.describe(), exc.strerror)


def _state(app: Starlette) -> AppState:
    state: AppState = app.state.postcall
    return state


def _running_engine(app: Starlette) -> Engine | None:
    """The lifespan's engine, or None before the app has started (a scrape then reports the database down)."""
    state: AppState | None = getattr(app.state, "postcall", None)
    return state.engine if state is not None else None


def _forward_backlog(settings: Settings) -> Callable[[Connection], list[dict[str, Any]]] | None:
    """The console's view of each forwarding sink (None: no sink configured, and the page says so)."""
    names = sink_names(settings)
    if not names:
        return None
    return lambda conn: forward_operate.sinks_status(conn, names, datetime.now(UTC))
