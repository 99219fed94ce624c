"""The dispatcher: every sink gets every event, at least once, in revision order per conversation.

Each sink has a loop of its own (`SinkLoop`), so a slow or dead sink never holds back another. One turn of a loop:
1. number newly committed events (feed.sequence: their commit-order positions), in the same transaction as 5, 2, 3;
2. fan the feed's new events out into the sink's deliveries, moving its cursor (deliveries.fan_out);
3. claim due deliveries with a lease, each its conversation's earliest pending one (deliveries.claim), up to a
   window of claims held at once (`Timing.window`, far more than the sink's connections);
4. send them concurrently, at most `sink.concurrency` at once (a semaphore); a send that takes long holds one
   connection, not the loop;
5. write the outcomes that came back, with their attempt rows (deliveries.record) — in the next turn's transaction
   of steps 2 and 3.
Why a window wider than the connections: a turn's commit is the cost per turn, so the more events one turn claims
and settles, the more events a second. With claims limited to free connections (16), every turn carried 16 events
or fewer, and dispatch stayed near 150 events/s.
A loop that finds nothing to do waits `poll` seconds, or less when `wake()` is called.

No event in flight twice at once to one sink, even with several dispatchers (replicas, `postcall forward`) on one
PostgreSQL: a claim's lease must cover its wait for a connection, the send and writing the outcome. A send runs
within the sink's deadline, so a claim may start its send only while `lease - MARGIN - deadline` has not passed
since it was claimed (`start_within`); one that waited longer for a connection (a slow sink, a full window) is
given back unsent — no attempt is counted, and the next turn may claim it again.

The database calls run on worker threads (the drivers are synchronous); sends on the event loop. A database that
is down pauses the loops (they try again every `OUTAGE_PAUSE` seconds) and never ends them.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup
from sqlalchemy.engine import Connection, Engine

from service.forward import deliveries, feed
from service.forward.deliveries import DEAD, DELIVERED, PENDING, Claim, Settled
from service.forward.schedule import RetrySchedule
from service.forward.sinks import Outcome, Sink
from service.storage.db import StoreUnavailable, read_only, transaction

log = logging.getLogger("postcall.forward")

POLL_SECONDS = 0.02  # how soon a loop with nothing to do looks again: commit-to-delivery latency rests on it
LEASE = timedelta(seconds=30)  # longer than any sink's deadline (15 s) plus the wait for a connection and MARGIN
MARGIN = 5.0  # seconds of a lease kept for writing the outcome once the send has ended
WINDOW = 512  # claims one loop holds at once (waiting for a connection or sending): what one turn may claim
OUTAGE_PAUSE = 1.0
PRUNE_EVERY_SECONDS = 300.0
PRUNE_BATCH = 1000


def utcnow() -> datetime:
    return datetime.now(UTC)


class Observer(Protocol):
    """Where a dispatcher reports what it did (web/metrics.py `ForwardMetrics`)."""

    def attempted(self, sink: str, outcome: str) -> None: ...

    def delivered(self, sink: str, seconds_since_commit: float) -> None: ...


class _Unobserved:
    def attempted(self, sink: str, outcome: str) -> None:
        pass

    def delivered(self, sink: str, seconds_since_commit: float) -> None:
        pass


def settle(claim: Claim, outcome: Outcome, now: datetime, schedule: RetrySchedule) -> Settled:
    """What an attempt's outcome makes of its delivery: delivered, a retry at the schedule's time, or dead. Pure."""
    first = claim.first_attempt_at or now
    status, retry = DELIVERED, None
    if not outcome.delivered:
        retry = schedule.next_attempt(claim.attempts + 1, first, now)
        status = PENDING if retry is not None else DEAD
    return Settled(
        claim=claim,
        status=status,
        attempted_at=now,
        first_attempt_at=first,
        next_attempt_at=retry,
        status_code=outcome.status_code,
        latency_seconds=outcome.latency_seconds,
        error=outcome.error,
    )


def holder_name() -> str:
    """Who holds a claim: host, process and a nonce (a restarted process is someone else)."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Timing:
    poll: float = POLL_SECONDS
    lease: timedelta = LEASE
    schedule: RetrySchedule = field(default_factory=RetrySchedule)
    clock: Callable[[], datetime] = utcnow
    prune_every: float = PRUNE_EVERY_SECONDS
    window: int = WINDOW


def start_within(lease: timedelta, deadline: float) -> float:
    """How long after its claim a send may still start and end, outcome written, before the lease runs out; inf
    when the lease leaves no room for waiting (then the window is the sink's connections: every claim starts at
    once, as the lease already assumed)."""
    room = lease.total_seconds() - MARGIN - deadline
    return room if room > 0 else math.inf


class SinkLoop:
    def __init__(self, engine: Engine, sink: Sink, holder: str, timing: Timing, observer: Observer) -> None:
        self.engine = engine
        self.sink = sink
        self.holder = holder
        self.timing = timing
        self.observer = observer
        self._start_within = start_within(timing.lease, sink.deadline)
        roomy = self._start_within != math.inf
        self.window = max(timing.window, sink.concurrency) if roomy else sink.concurrency
        self._connections = anyio.Semaphore(sink.concurrency)
        self._held = 0  # claims taken and neither sent nor given back yet
        self._full = False  # the last turn claimed all the window let it: more may be waiting
        self._results: list[Settled] = []
        self._unsent: list[Claim] = []  # claims that waited too long to start: given back next turn
        self._nudge = anyio.Event()

    def wake(self) -> None:
        self._nudge.set()

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as sends:
                while True:
                    try:
                        busy = await self._turn(sends)
                    except StoreUnavailable as exc:
                        log.warning("forwarding to %s paused: database unavailable (%s)", self.sink.name, exc)
                        await anyio.sleep(OUTAGE_PAUSE)
                        continue
                    if not busy:
                        with anyio.move_on_after(self.timing.poll):
                            await self._nudge.wait()
                        self._nudge = anyio.Event()
        finally:
            with anyio.CancelScope(shield=True):
                await self._give_back()

    async def _turn(self, sends: TaskGroup) -> bool:
        """One turn; True when it did something (so the next comes at once)."""
        settled, self._results = self._results, []
        unsent, self._unsent = self._unsent, []
        free = self.window - self._held
        claimed_at = time.monotonic()  # before the lease's clock starts: errs on the safe side
        try:
            fanned, claims = await anyio.to_thread.run_sync(self._settle_fan_out_and_claim, settled, unsent, free)
        except BaseException:
            self._results = settled + self._results  # written on a later turn
            self._unsent = unsent + self._unsent
            raise
        self._observe(settled)
        self._full = free > 0 and len(claims) >= free
        start_by = claimed_at + self._start_within
        for claim in claims:
            self._held += 1
            sends.start_soon(self._send, claim, start_by)
        return bool(settled or claims or fanned)

    def _settle_fan_out_and_claim(
        self, settled: list[Settled], unsent: list[Claim], free: int
    ) -> tuple[int, list[Claim]]:
        """Steps 1, 5, 2 and 3 in one transaction: each commit costs a sync to disk, and a turn's are what bound
        how many turns, and so events, a loop gets through in a second. A turn with nothing to write first asks
        (deliveries.waiting, a read) whether there is anything to do: on SQLite every write transaction takes the
        one write lock, and a loop polling 50 times a second with it would queue the receiver's commits behind
        its own, and its own behind theirs."""
        now = self.timing.clock()
        idle = not (settled or unsent)
        if idle and not read_only(self.engine, lambda conn: deliveries.waiting(conn, self.sink.name, now, free > 0)):
            return 0, []

        def work(conn: Connection) -> tuple[int, list[Claim]]:
            # Numbering the feed here rather than in a transaction of its own saves a commit per turn and keeps
            # the sequencer's guarantee (feed.py): its row lock is still held from numbering until this commit,
            # so the next sequencer still starts only once these positions are visible. Holding it through the
            # fan-out and claim only makes other sequencers skip a little longer; what this one numbers is theirs
            # to read once it commits. Lock order is always the sequence row, then the sink's row, and the first
            # is taken with SKIP LOCKED (never waited for): no deadlock with another dispatcher.
            feed.sequence(conn)
            deliveries.record(conn, self.sink.name, self.holder, settled, now)
            deliveries.unclaim(conn, self.holder, [claim.outgoing.delivery_id for claim in unsent])
            fanned = deliveries.fan_out(conn, self.sink.name, now)
            if free <= 0:
                return fanned, []
            return fanned, deliveries.claim(conn, self.sink.name, self.holder, now, self.timing.lease, free)

        return transaction(self.engine, work)

    def _record(self, settled: list[Settled]) -> None:
        transaction(
            self.engine, lambda conn: deliveries.record(conn, self.sink.name, self.holder, settled, self.timing.clock())
        )
        self._observe(settled)

    def _observe(self, settled: list[Settled]) -> None:
        for result in settled:
            self.observer.attempted(self.sink.name, "failed" if result.status == PENDING else result.status)
            if result.status == DELIVERED:
                since = (result.attempted_at - result.claim.outgoing.committed_at).total_seconds()
                self.observer.delivered(self.sink.name, max(since, 0.0))

    async def _send(self, claim: Claim, start_by: float) -> None:
        try:
            async with self._connections:
                if time.monotonic() > start_by:
                    self._unsent.append(claim)  # its lease could run out mid-send: another may take it then
                    return
                try:
                    outcome = await self.sink.send(claim.outgoing)
                except Exception as exc:  # a sink's bug must cost one attempt, not the loop
                    log.exception("forwarding to %s: the sink failed", self.sink.name)
                    outcome = Outcome(False, 0.0, error=f"{type(exc).__name__} in postcall's sink")
                self._results.append(settle(claim, outcome, self.timing.clock(), self.timing.schedule))
        finally:
            self._held -= 1
            # Outcomes alone do not call for a turn: they are written by the next one (at the next poll or wake,
            # well within the lease), with whatever it claims, so a trickle of events costs one commit each rather
            # than two. Only a loop that left due deliveries behind for want of room turns again at once.
            if self._full:
                self._nudge.set()

    async def _give_back(self) -> None:
        """Stopping: write what came back, and give back the claims whose sends were cut short."""
        settled, self._results = self._results, []
        try:
            if settled:
                await anyio.to_thread.run_sync(self._record, settled)
            await anyio.to_thread.run_sync(transaction, self.engine, lambda conn: deliveries.release(conn, self.holder))
        except StoreUnavailable:
            log.warning("forwarding to %s stopped with claims left to expire (database unavailable)", self.sink.name)


class Dispatcher:
    """Runs a loop per sink, and retention, until cancelled (`run`)."""

    def __init__(
        self,
        engine: Engine,
        sinks: Sequence[Sink],
        *,
        retention_seconds: float,
        timing: Timing | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.engine = engine
        self.sinks = list(sinks)
        self.retention = timedelta(seconds=retention_seconds)
        self.timing = timing or Timing()
        self.holder = holder_name()
        watcher = observer or _Unobserved()
        self.loops = [SinkLoop(engine, sink, self.holder, self.timing, watcher) for sink in self.sinks]

    def wake(self) -> None:
        """Look for new events now rather than at the next poll (after a commit of our own)."""
        for loop in self.loops:
            loop.wake()

    async def run(self) -> None:
        names = [sink.name for sink in self.sinks]
        while True:
            try:
                await anyio.to_thread.run_sync(
                    transaction, self.engine, lambda conn: deliveries.ensure_sinks(conn, names)
                )
                break
            except StoreUnavailable as exc:
                log.warning("forwarding waits for the database: %s", exc)
                await anyio.sleep(OUTAGE_PAUSE)
        log.info("forwarding to %s", ", ".join(names))
        try:
            async with anyio.create_task_group() as group:
                for loop in self.loops:
                    group.start_soon(loop.run)
                group.start_soon(self._retention)
        finally:
            with anyio.CancelScope(shield=True):
                for sink in self.sinks:
                    await sink.aclose()

    async def _retention(self) -> None:
        names = [sink.name for sink in self.sinks]
        while True:
            try:
                await anyio.to_thread.run_sync(self.prune_once, names)
            except StoreUnavailable as exc:
                log.warning("event retention skipped: database unavailable (%s)", exc)
            await anyio.sleep(self.timing.prune_every)

    def prune_once(self, names: Sequence[str]) -> int:
        """Delete delivered events older than the retention, in batches; how many."""
        before = self.timing.clock() - self.retention
        total = 0
        while True:
            gone = transaction(self.engine, lambda conn: deliveries.prune(conn, names, before, PRUNE_BATCH))
            total += gone
            if gone < PRUNE_BATCH:
                break
        if total:
            log.info("event retention: %d delivered event(s) older than %s deleted", total, self.retention)
        return total
