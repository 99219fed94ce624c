"""The reconciler: list each agent's conversations in a window and store whatever the webhooks missed.

One run, per agent: plan the window (windows.py), page through `GET /v1/convai/conversations`, merge every
summary through `record.store` (one transaction per page), fetch the detail of each final conversation that is new or
incomplete (bounded concurrency, in the client), optionally its audio, then move the agent's checkpoint — never
past a conversation that failed or is not final yet, so the next run lists it again.

A lease row (`reconcile_lease`) makes it one run at a time per database; each run is recorded in `reconcile_run`
with its counts. `--dry-run` lists and counts but writes nothing at all (no lease, no run record, no checkpoint).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from service.elevenlabs import ElevenLabsClient, ElevenLabsError, NotFound
from service.reconcile.windows import (
    DEFAULT_OVERLAP_SECONDS,
    FIRST_RUN_LOOKBACK_SECONDS,
    Window,
    WindowError,
    next_checkpoint,
    plan_window,
)
from service.record import fields, payloads, store
from service.record.merge import Observation, Source, is_final, merge
from service.storage.audio import BlobStore
from service.storage.db import insert_ignoring_conflict, transaction, unavailable_as_store_error
from service.storage.tables import ReconcileCheckpoint, ReconcileLease, ReconcileRun

log = logging.getLogger("postcall.reconcile")
T = TypeVar("T")

LEASE_NAME = "reconcile"
LEASE_TTL_SECONDS = 600
LEASE_RENEW_SECONDS = 60
MAX_ERRORS_KEPT = 20

checkpoints: sa.Table = ReconcileCheckpoint.__table__  # type: ignore[attr-defined]
runs: sa.Table = ReconcileRun.__table__  # type: ignore[attr-defined]
leases: sa.Table = ReconcileLease.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Options:
    agents: tuple[str, ...] = ()
    since: int | None = None
    until: int | None = None
    audio: bool = False
    details: bool = True
    dry_run: bool = False
    overlap: int = DEFAULT_OVERLAP_SECONDS
    lookback: int = FIRST_RUN_LOOKBACK_SECONDS


@dataclass
class Counts:
    listed: int = 0
    new: int = 0
    updated: int = 0
    details_fetched: int = 0
    audio_fetched: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Report:
    counts: Counts
    agents: list[str]
    dry_run: bool
    run_id: int | None = None
    details_needed: int = 0  # a dry run's count of the detail calls a real run would make
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.counts.failed == 0 and not self.errors

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.counts.as_dict(), "ok": self.ok, "dry_run": self.dry_run, "run_id": self.run_id}
        out["agents"] = self.agents
        if self.dry_run:
            out["details_needed"] = self.details_needed
        out["errors"] = self.errors
        return out


class LeaseHeld(Exception):
    """Another run holds the lease: the caller exits 3 naming `holder`."""

    def __init__(self, holder: str, expires_at: datetime) -> None:
        super().__init__(f"another reconcile run holds the lease: {holder} (until {expires_at.isoformat()})")
        self.holder = holder
        self.expires_at = expires_at


class LeaseLost(Exception):
    """Our lease expired and someone else took it: stop before writing further."""


def default_holder() -> str:
    return f"{socket.gethostname()} pid {os.getpid()} run {uuid.uuid4().hex[:8]}"


# --- the lease, run records and checkpoints (synchronous; run in a worker thread) ----------------------------------


def acquire_lease(conn: Connection, holder: str, now: datetime, ttl: int = LEASE_TTL_SECONDS) -> None:
    """Take the lease, or take over an expired one; LeaseHeld otherwise."""
    expires = now + timedelta(seconds=ttl)
    row = {"name": LEASE_NAME, "holder": holder, "acquired_at": now, "expires_at": expires}
    if insert_ignoring_conflict(conn, leases, row, "name"):
        return
    taken = conn.execute(
        sa.update(leases)
        .where(leases.c.name == LEASE_NAME, leases.c.expires_at < now)
        .values(holder=holder, acquired_at=now, expires_at=expires)
    )
    if taken.rowcount == 1:
        return
    current = conn.execute(sa.select(leases.c.holder, leases.c.expires_at).where(leases.c.name == LEASE_NAME)).one()
    raise LeaseHeld(current.holder, current.expires_at)


def renew_lease(conn: Connection, holder: str, now: datetime, ttl: int = LEASE_TTL_SECONDS) -> None:
    renewed = conn.execute(
        sa.update(leases)
        .where(leases.c.name == LEASE_NAME, leases.c.holder == holder)
        .values(expires_at=now + timedelta(seconds=ttl))
    )
    if renewed.rowcount != 1:
        raise LeaseLost(f"the reconcile lease of {holder} was taken over")


def release_lease(conn: Connection, holder: str) -> None:
    conn.execute(sa.delete(leases).where(leases.c.name == LEASE_NAME, leases.c.holder == holder))


def read_checkpoint(conn: Connection, agent_id: str) -> int | None:
    value = conn.execute(sa.select(checkpoints.c.checkpoint_unix).where(checkpoints.c.agent_id == agent_id)).scalar()
    return int(value) if value is not None else None


def write_checkpoint(conn: Connection, agent_id: str, checkpoint: int, now: datetime) -> None:
    row = {"agent_id": agent_id, "checkpoint_unix": checkpoint, "updated_at": now}
    if not insert_ignoring_conflict(conn, checkpoints, row, "agent_id"):
        conn.execute(
            sa.update(checkpoints)
            .where(checkpoints.c.agent_id == agent_id)
            .values(checkpoint_unix=checkpoint, updated_at=now)
        )


def start_run(conn: Connection, holder: str, now: datetime) -> int:
    values = {"started_at": now, "status": "running", "holder": holder, "dry_run": False, **Counts().as_dict()}
    run_id = conn.execute(sa.insert(runs).values(values).returning(runs.c.id)).scalar_one()
    return int(run_id)


def finish_run(conn: Connection, run_id: int, report: Report, windows: list[Window], now: datetime) -> None:
    conn.execute(
        sa.update(runs)
        .where(runs.c.id == run_id)
        .values(
            finished_at=now,
            status="succeeded" if report.ok else "failed",
            agents=report.agents,
            window_start_unix=min((w.start for w in windows), default=None),
            window_end_unix=max((w.end for w in windows), default=None),
            error="\n".join(report.errors) or None,
            **report.counts.as_dict(),
        )
    )


# What "updated" means to a person: the status or the content changed, not just `reconciled_at` (which every
# listing moves). The JSON columns change only with a richer source, which moves `data_rank` too.
_FINGERPRINT = (
    "status",
    "data_rank",
    "complete",
    "audio_stored",
    *(entry.name for entry in fields.FIELDS if entry.content and not entry.is_json),
)


def _fingerprints(conn: Connection, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """conversation_id → the columns that say whether a record changed, for the stored ones among `ids`."""
    table = store.conversations
    columns = [table.c.conversation_id, *(table.c[name] for name in _FINGERPRINT)]
    rows = conn.execute(sa.select(*columns).where(table.c.conversation_id.in_(ids))).mappings()
    return {row["conversation_id"]: dict(row) for row in rows}


def _stored_records(conn: Connection, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    table = store.conversations
    rows = conn.execute(sa.select(table).where(table.c.conversation_id.in_(ids))).mappings()
    return {row["conversation_id"]: {k: v for k, v in row.items() if k != "updated_at"} for row in rows}


# --- the run -----------------------------------------------------------------------------------------------------


@dataclass
class _AgentOutcome:
    failed_starts: list[int] = field(default_factory=list)
    pending_starts: list[int] = field(default_factory=list)
    listing_failed: bool = False


@dataclass(frozen=True)
class _Listed:
    conversation_id: str
    start: int
    status: str | None


class Reconciler:
    """One reconcile run against one database. Build it with its parts; `run()` does the rest."""

    def __init__(
        self,
        engine: Engine,
        client: ElevenLabsClient,
        blobs: BlobStore,
        *,
        clock: Callable[[], float] = time.time,
        holder: str | None = None,
        on_progress: Callable[[Counts], None] | None = None,
    ) -> None:
        self.engine = engine
        self.client = client
        self.blobs = blobs
        self.clock = clock
        self.holder = holder or default_holder()
        self.on_progress = on_progress
        self._renewed = 0.0

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    async def _db(self, work: Callable[[Connection], T]) -> T:
        return await anyio.to_thread.run_sync(transaction, self.engine, work)

    async def run(self, options: Options) -> Report:
        """Raises LeaseHeld before doing anything when another run holds the lease."""
        report = Report(Counts(), agents=[], dry_run=options.dry_run)
        if options.dry_run:
            await self._agents_and_windows(options, report)
            return report
        now = self._now()
        await self._db(lambda conn: acquire_lease(conn, self.holder, now))
        self._renewed = self.clock()
        try:
            report.run_id = await self._db(lambda conn: start_run(conn, self.holder, now))
            windows: list[Window] = []
            try:
                windows = await self._agents_and_windows(options, report)
            except (LeaseLost, ElevenLabsError) as exc:
                report.errors.append(str(exc))
            finally:
                run_id = report.run_id
                await self._db(lambda conn: finish_run(conn, run_id, report, windows, self._now()))
        finally:
            with anyio.CancelScope(shield=True):
                await self._db(lambda conn: release_lease(conn, self.holder))
        return report

    async def _agents_and_windows(self, options: Options, report: Report) -> list[Window]:
        agents = list(options.agents) or [a["agent_id"] async for a in self.client.agents() if a.get("agent_id")]
        report.agents = agents
        end = int(self.clock())
        windows = []
        for agent_id in agents:
            checkpoint = await self._db(partial(read_checkpoint, agent_id=agent_id))
            try:
                window = plan_window(checkpoint, end, options.since, options.until, options.overlap, options.lookback)
            except WindowError as exc:
                log.warning("agent %s: %s; skipped", agent_id, exc)
                continue
            windows.append(window)
            outcome = await self._agent(agent_id, window, options, report)
            if outcome.listing_failed or options.dry_run:
                continue
            moved = next_checkpoint(checkpoint, window, outcome.failed_starts, outcome.pending_starts)
            if moved is not None and moved != checkpoint:
                await self._db(partial(write_checkpoint, agent_id=agent_id, checkpoint=moved, now=self._now()))
            log.info(
                "agent %s: window %d..%d, checkpoint %s → %s", agent_id, window.start, window.end, checkpoint, moved
            )
        return windows

    async def _agent(self, agent_id: str, window: Window, options: Options, report: Report) -> _AgentOutcome:
        outcome = _AgentOutcome()
        try:
            # The API's bounds are exclusive: start - 1 keeps a conversation that starts exactly at `start`.
            async for page in self.client.conversation_pages(agent_id, window.start - 1, window.end):
                await self._page(page, options, report, outcome)
                if self.on_progress is not None:
                    self.on_progress(report.counts)
        except ElevenLabsError as exc:
            outcome.listing_failed = True
            report.counts.failed += 1
            report.errors.append(f"agent {agent_id}: listing conversations failed: {exc}")
            log.error("agent %s: listing conversations failed: %s", agent_id, exc)
        return outcome

    async def _page(self, page: list[dict[str, Any]], options: Options, report: Report, out: _AgentOutcome) -> None:
        at = self._now()
        summaries = [s for s in page if payloads.valid_conversation_id(s.get("conversation_id"))]
        observations = [payloads.summary_observation(s, at) for s in summaries]
        listed = {obs.conversation_id: _listed(obs) for obs in observations}
        report.counts.listed += len(listed)
        if not listed:
            return
        if options.dry_run:
            await self._dry_page(observations, report)
            return
        await self._keep_lease()
        flags, changes = await self._db(lambda conn: _apply_summaries(conn, observations, at))
        tally = _Tally(changes)
        wanted: list[_Listed] = []
        for item in listed.values():
            complete = bool(flags.get(item.conversation_id, {}).get("complete"))
            if not is_final(item.status):
                out.pending_starts.append(item.start)
            elif not complete:
                if options.details:
                    wanted.append(item)
                else:
                    out.failed_starts.append(item.start)  # not failed, but not stored in full: hold the checkpoint
        details = await self._fetch_details(wanted, report, out)
        if details:
            observations = [payloads.detail_observation(d, Source.DETAIL, self._now()) for d in details]
            detail_changes = await self._db(lambda conn: store.apply_many(conn, observations, self._now()))
            tally.add(detail_changes)
            for detail in details:
                if not is_final(detail.get("status") if isinstance(detail.get("status"), str) else None):
                    out.pending_starts.append(listed[detail["conversation_id"]].start)
        if options.audio:
            said = {d["conversation_id"]: bool(d.get("has_audio")) for d in details}
            # A detail fetched now says whether there is audio; without one, ask (a 404 means there is none).
            audio = [
                item
                for item in listed.values()
                if item.status == "done"
                and not flags.get(item.conversation_id, {}).get("audio_stored")
                and said.get(item.conversation_id, True)
            ]
            await self._fetch_audio(audio, report, out, tally)
        report.counts.new += tally.new
        report.counts.updated += tally.updated

    async def _fetch_details(self, wanted: list[_Listed], report: Report, out: _AgentOutcome) -> list[dict[str, Any]]:
        details: list[dict[str, Any]] = []

        async def fetch(item: _Listed) -> None:
            try:
                detail = await self.client.conversation(item.conversation_id)
            except ElevenLabsError as exc:
                self._failed(item, f"detail: {exc}", report, out)
                return
            if detail.get("conversation_id") != item.conversation_id:
                self._failed(item, "detail: the answer names another conversation", report, out)
                return
            report.counts.details_fetched += 1
            details.append(detail)

        async with anyio.create_task_group() as group:
            for item in wanted:
                group.start_soon(fetch, item)
        return details

    async def _fetch_audio(self, items: list[_Listed], report: Report, out: _AgentOutcome, tally: _Tally) -> None:
        async def fetch(item: _Listed) -> None:
            try:
                blob = await self.client.download_audio(item.conversation_id, self.blobs)
            except NotFound:
                return  # no recording (or none yet): nothing to store
            except (ElevenLabsError, OSError) as exc:
                self._failed(item, f"audio: {exc}", report, out)
                return
            try:
                change = await self._db(
                    lambda conn: store.store_audio(conn, item.conversation_id, blob, Source.AUDIO_FETCH, self._now())
                )
            finally:
                blob.discard()  # a no-op once committed into place
            report.counts.audio_fetched += 1
            tally.add({item.conversation_id: change})

        async with anyio.create_task_group() as group:
            for item in items:
                group.start_soon(fetch, item)

    def _failed(self, item: _Listed, why: str, report: Report, out: _AgentOutcome) -> None:
        report.counts.failed += 1
        out.failed_starts.append(item.start)
        message = f"{item.conversation_id}: {why}"
        if len(report.errors) < MAX_ERRORS_KEPT:
            report.errors.append(message)
        log.error("%s", message)

    async def _keep_lease(self) -> None:
        if self.clock() - self._renewed < LEASE_RENEW_SECONDS:
            return
        now = self._now()
        await self._db(lambda conn: renew_lease(conn, self.holder, now))
        self._renewed = self.clock()

    async def _dry_page(self, observations: list[Observation], report: Report) -> None:
        """Count what a real run would do, from the stored records and the pure merge; write nothing."""
        ids = [obs.conversation_id for obs in observations]
        stored = await anyio.to_thread.run_sync(_read_records, self.engine, ids)
        for obs in observations:
            record = stored.get(obs.conversation_id)
            if record is None:
                report.counts.new += 1
            elif merge(record, obs) != record:
                report.counts.updated += 1
            if is_final(obs.status) and not (record or {}).get("complete"):
                report.details_needed += 1


class _Tally:
    """Each conversation counts once per page: new if its first write created it, else updated if any changed it."""

    def __init__(self, first: dict[str, store.Change]) -> None:
        self._seen = dict(first)

    def add(self, changes: dict[str, store.Change]) -> None:
        for cid, change in changes.items():
            before = self._seen.get(cid, store.Change.UNCHANGED)
            if before is store.Change.UNCHANGED:
                self._seen[cid] = change

    @property
    def new(self) -> int:
        return sum(1 for change in self._seen.values() if change is store.Change.NEW)

    @property
    def updated(self) -> int:
        return sum(1 for change in self._seen.values() if change is store.Change.UPDATED)


def _apply_summaries(
    conn: Connection, observations: list[Observation], at: datetime
) -> tuple[dict[str, dict[str, Any]], dict[str, store.Change]]:
    """The records as stored before this page (their fingerprints), and what merging the summaries changed."""
    ids = [obs.conversation_id for obs in observations]
    before = _fingerprints(conn, ids)
    changes = store.apply_many(conn, observations, at)
    after = _fingerprints(conn, [cid for cid, change in changes.items() if change is store.Change.UPDATED])
    for cid, fingerprint in after.items():
        if before.get(cid) == fingerprint:
            changes[cid] = store.Change.UNCHANGED  # only `reconciled_at` moved
    return before, changes


def _read_records(engine: Engine, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    with unavailable_as_store_error(), engine.connect() as conn:
        return _stored_records(conn, ids)


def _listed(obs: Observation) -> _Listed:
    start = obs.fields.get("start_time_unix_secs")
    return _Listed(obs.conversation_id, start if isinstance(start, int) else 0, obs.status)
