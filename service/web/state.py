"""What the routes need, built once in the app's lifespan and reached through `request.app.state.postcall`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio.to_thread
from sqlalchemy.engine import Connection, Engine
from starlette.requests import Request

from service.config import Settings
from service.elevenlabs import ElevenLabsClient
from service.storage.audio import BlobStore
from service.storage.db import transaction
from service.webhook.body import DEFAULT_PACE, Pace
from service.webhook.pending import PendingBudget
from service.webhook.writer import BatchWriter

T = TypeVar("T")


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    blobs: BlobStore
    clock: Callable[[], float] = field(default=time.time)
    elevenlabs: ElevenLabsClient | None = field(kw_only=True)  # the broker's (None: no key); lifespan closes it
    writer: BatchWriter = field(kw_only=True)  # group commit for webhook deliveries, stopped by the lifespan
    pace: Pace = field(default=DEFAULT_PACE, kw_only=True)  # how slowly a webhook body may arrive
    webhook_secrets: list[bytes] = field(init=False)  # encoded once: every webhook needs them
    pending: PendingBudget = field(init=False)  # what webhook bodies not yet verified hold, together

    def __post_init__(self) -> None:
        self.webhook_secrets = [secret.get_secret_value().encode() for secret in self.settings.webhook_secrets]
        self.pending = PendingBudget(self.settings.max_pending_bytes)

    async def write(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in one database transaction on a worker thread (the drivers are synchronous)."""
        return await anyio.to_thread.run_sync(transaction, self.engine, work)


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.postcall
    return state
