"""Group commit: one writer thread commits webhook deliveries in batches; each request awaits its batch.

A commit is the expensive part of a durable write (an fsync on SQLite, a round trip and a WAL flush on
PostgreSQL). Under a burst, requests that arrive while a batch commits are gathered into the next batch, so the
cost is shared and throughput rises with load, while a lone request still commits at once (no timer, no wait).
Every request still gets its answer only after the commit that holds its record and archived event.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from service.record import store
from service.record.merge import Observation
from service.storage.db import StoreUnavailable, transaction

log = logging.getLogger("postcall.writer")

MAX_BATCH = 256


@dataclass
class _Job:
    delivery: store.Delivery
    observation: Observation | None
    future: asyncio.Future[store.Outcome]
    loop: asyncio.AbstractEventLoop

    def resolve(self, outcome: store.Outcome | None, error: BaseException | None) -> None:
        self.loop.call_soon_threadsafe(self._set, outcome, error)

    def _set(self, outcome: store.Outcome | None, error: BaseException | None) -> None:
        if self.future.done():  # the request went away (client disconnected)
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            assert outcome is not None
            self.future.set_result(outcome)


class BatchWriter:
    """Owns one thread and one database connection at a time. `start()` before use, `stop()` after.

    `on_commit`, when set, is called on the writer's thread after each batch commits: how `serve`'s dispatcher
    learns of new events at once instead of at its next poll. It must be quick and never block."""

    def __init__(self, engine: Engine, max_batch: int = MAX_BATCH) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self.on_commit: Callable[[], object] | None = None
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="postcall-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    async def record(self, delivery: store.Delivery, observation: Observation | None) -> store.Outcome:
        """Archive and merge one delivery; returns once it is committed. Raises StoreUnavailable."""
        if self._thread is None:
            raise RuntimeError("BatchWriter is not started")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[store.Outcome] = loop.create_future()
        self._queue.put(_Job(delivery, observation, future, loop))
        return await future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._commit(batch)
                    return
                batch.append(job)
            self._commit(batch)

    def _commit(self, batch: list[_Job]) -> None:
        items = [(job.delivery, job.observation) for job in batch]
        try:
            outcomes = transaction(self._engine, lambda conn: store.record_deliveries(conn, items))
        except StoreUnavailable as exc:
            # The database is down or refused the commit: every request of the batch answers 503 now, rather
            # than each waiting out its own connection timeout.
            for job in batch:
                job.resolve(None, exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                batch[0].resolve(None, exc)
                return
            # One bad delivery must not fail its neighbours: commit them one by one to isolate it.
            log.exception("batch of %d failed; committing one by one", len(batch))
            for job in batch:
                self._commit([job])
            return
        for job, outcome in zip(batch, outcomes, strict=True):
            job.resolve(outcome, None)
        if self.on_commit is not None:
            try:
                self.on_commit()
            except Exception:  # a listener's failure must not cost the receiver its writer
                log.exception("after-commit callback failed")
