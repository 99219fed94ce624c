"""What the routes need, built once in the app's lifespan and reached through `request.app.state.postcall`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine
from starlette.requests import Request

from service.config import Settings
from service.elevenlabs import ElevenLabsClient
from service.storage.audio import BlobStore
from service.webhook.routes import Receiver


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    blobs: BlobStore
    clock: Callable[[], float] = field(default=time.time)
    elevenlabs: ElevenLabsClient | None = field(kw_only=True)  # the broker's (None: no key); lifespan closes it
    webhooks: Receiver = field(kw_only=True)  # the webhook route's own parts; the lifespan stops its writer


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.postcall
    return state
