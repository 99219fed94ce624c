"""`postcall forward`: the dispatcher as a process of its own, until SIGINT or SIGTERM."""

from __future__ import annotations

import logging
import signal

import anyio
from sqlalchemy.engine import Engine

from service.config import Settings
from service.forward.configured import build_sinks
from service.forward.dispatcher import Dispatcher, Observer

log = logging.getLogger("postcall.forward")


def run_dispatcher(settings: Settings, engine: Engine, observer: Observer) -> int:
    """Dispatch until a signal; the caller owns the engine and the metrics the observer counts into."""
    dispatcher = Dispatcher(
        engine, build_sinks(settings), retention_seconds=settings.events_retention, observer=observer
    )

    async def main() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(dispatcher.run)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for received in signals:
                    log.info("stopping forwarding (%s)", signal.Signals(received).name)
                    group.cancel_scope.cancel()
                    break

    anyio.run(main, backend_options={"use_uvloop": True})
    return 0
