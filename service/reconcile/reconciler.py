"""The reconciler: list each agent's conversations in a window and store whatever the webhooks missed.

One run, per agent: plan the window (windows.py), page through `GET /v1/convai/conversations`, merge every
summary through `record.store` (one transaction per page), fetch the detail of each final conversation that is new or
incomplete (bounded concurrency, in the client), optionally its audio, then move the agent's checkpoint — never
past a conversation that failed or is not final yet, so the next run lists it again.

The database side of a run — the lease that makes it one at a time, checkpoints, the run record — is the ledger
(ledger.py). `--dry-run` lists and counts but writes nothing at all (no lease, no run record, no checkpoint).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from service.elevenlabs import MAX_REASON_CHARS, ElevenLabsClient, ElevenLabsError, NotFound
from service.reconcile.ledger import (
    GIVE_UP_AFTER_RUNS,
    LEASE_RENEW_SECONDS,
    Counts,
    LeaseLost,
    Report,
    acquire_lease,
    count_not_found,
    default_holder,
    finish_run,
    forget_not_found,
    given_up_among,
    read_checkpoint,
    release_lease,
    renew_lease,
    start_run,
    write_checkpoint,
)
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
from service.storage.db import StoreUnavailable, run_transaction, unavailable_as_store_error

log = logging.getLogger("postcall.reconcile")
T = TypeVar("T")

MAX_ERRORS_KEPT = 20
# 1,000,000 conversations per agent and window at 100 a page: far above a real window, and a run that meets an
# API paging for ever (a new cursor each time) ends within minutes, not never: against the fake platform, 10,001
# list requests of 100 summaries each, merged into SQLite, took 405 s on a shared 2-core machine.
MAX_PAGES_PER_WINDOW = 10_000


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
    max_pages: int = MAX_PAGES_PER_WINDOW


class EndlessListing(Exception):
    """A listing still saying `has_more` after `Options.max_pages` pages: an API that pages for ever."""


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
    failed_starts: list[int | None] = field(default_factory=list)  # None: the summary carried no start time
    pending_starts: list[int | None] = field(default_factory=list)
    listing_failed: bool = False


@dataclass(frozen=True)
class _Listed:
    conversation_id: str
    start: int | None
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
        return await run_transaction(self.engine, work)

    async def run(self, options: Options) -> Report:
        """Raises LeaseHeld before doing anything when another run holds the lease. Any other way a run ends is in
        its report and its record: an exception is a failed run that names it, never one that looks fine."""
        report = Report(Counts(), agents=[], dry_run=options.dry_run)
        windows: list[Window] = []
        if options.dry_run:
            await self._guarded(options, report, windows)
            return report
        now = self._now()
        await self._db(lambda conn: acquire_lease(conn, self.holder, now))
        self._renewed = self.clock()
        try:
            run_id = await self._db(lambda conn: start_run(conn, self.holder, now))
            report.run_id = run_id
            try:
                await self._guarded(options, report, windows)
            finally:
                with anyio.CancelScope(shield=True):  # an interrupted run is recorded too
                    await self._db(lambda conn: finish_run(conn, run_id, report, windows, self._now()))
        finally:
            with anyio.CancelScope(shield=True):
                await self._db(lambda conn: release_lease(conn, self.holder))
        return report

    async def _guarded(self, options: Options, report: Report, windows: list[Window]) -> None:
        """The run's work; when it ends in an exception, `report.errors` says which (re-raised only when it is an
        interruption: KeyboardInterrupt, cancellation)."""
        try:
            await self._agents_and_windows(options, report, windows)
        except Exception as exc:
            report.errors.append(_why_it_failed(exc))
        except BaseException:
            report.errors.append("interrupted before it finished")
            raise

    async def _agents_and_windows(self, options: Options, report: Report, windows: list[Window]) -> None:
        agents = list(options.agents) or await self._workspace_agents(report)
        report.agents = agents
        end = int(self.clock())
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
            moved = next_checkpoint(checkpoint, window, outcome.failed_starts, outcome.pending_starts, now=end)
            if moved is not None and moved != checkpoint:
                await self._db(partial(write_checkpoint, agent_id=agent_id, checkpoint=moved, now=self._now()))
            log.info(
                "agent %s: window %d..%d, checkpoint %s → %s", agent_id, window.start, window.end, checkpoint, moved
            )

    async def _workspace_agents(self, report: Report) -> list[str]:
        """Every usable agent id of the agent list. An entry without one (not an object, an id that is not a
        string) is skipped with a warning; a list with entries but no usable id fails the run."""
        agents: list[str] = []
        skipped = 0
        async for entry in self.client.agents():
            agent_id = entry.get("agent_id") if isinstance(entry, dict) else None
            # One rule for every id: a printable string the columns hold.
            if isinstance(agent_id, str) and payloads.valid_conversation_id(agent_id):
                agents.append(agent_id)
            else:
                skipped += 1
        if skipped:
            self._warn(report, f"skipped {skipped} agent(s) listed without a usable agent_id")
        if skipped and not agents:
            report.errors.append(f"the agent list held {skipped} entries and no usable agent_id: nothing was listed")
        return agents

    async def _agent(self, agent_id: str, window: Window, options: Options, report: Report) -> _AgentOutcome:
        outcome = _AgentOutcome()
        pages = 0
        try:
            # The API's bounds are exclusive: start - 1 keeps a conversation that starts exactly at `start`.
            async for page in self.client.conversation_pages(agent_id, window.start - 1, window.end):
                pages += 1
                if pages > options.max_pages:
                    raise EndlessListing(f"more than {options.max_pages} pages: the API keeps saying there is more")
                await self._page(page, options, report, outcome)
                if self.on_progress is not None:
                    self.on_progress(report.counts)
        except (ElevenLabsError, EndlessListing) as exc:
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
        ids = list(listed)
        (flags, changes), gone = await self._db(
            lambda conn: (_apply_summaries(conn, observations, at), given_up_among(conn, ids))
        )
        tally = _Tally(changes)
        wanted: list[_Listed] = []
        for item in listed.values():
            complete = bool(flags.get(item.conversation_id, {}).get("complete"))
            if not is_final(item.status):
                out.pending_starts.append(item.start)
            elif complete or item.conversation_id in gone:  # a detail given up is not asked for again
                continue
            elif options.details:
                wanted.append(item)
            else:
                out.failed_starts.append(item.start)  # not failed, but not stored in full: hold the checkpoint
        details = await self._fetch_details(wanted, report, out)
        if details:
            observations = [payloads.detail_observation(d, Source.DETAIL, self._now()) for d in details]
            detail_changes = await self._db(lambda conn: _store_details(conn, observations, self._now()))
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
        missing: list[tuple[_Listed, NotFound]] = []

        async def fetch(item: _Listed) -> None:
            try:
                detail = await self.client.conversation(item.conversation_id)
            except NotFound as exc:
                missing.append((item, exc))
                return
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
        if missing:
            await self._not_found(missing, report, out)
        return details

    async def _not_found(self, missing: list[tuple[_Listed, NotFound]], report: Report, out: _AgentOutcome) -> None:
        """A detail that answers 404 fails the run (and holds the checkpoint) until GIVE_UP_AFTER_RUNS runs have
        each met the 404: then it is given up, reported as such, and holds nothing any more."""
        run_id = report.run_id
        assert run_id is not None  # a dry run fetches no details
        ids = [item.conversation_id for item, _ in missing]
        runs = await self._db(lambda conn: count_not_found(conn, ids, run_id, self._now()))
        for item, exc in missing:
            met = runs[item.conversation_id]
            if met < GIVE_UP_AFTER_RUNS:
                why = f"detail: {exc} (404 in {met} of the {GIVE_UP_AFTER_RUNS} runs before it is given up)"
                self._failed(item, why, report, out)
                continue
            report.counts.given_up += 1
            given_up = f"{item.conversation_id}: detail: 404 in {met} runs; given up, stored from its summary only"
            self._warn(report, given_up)

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

    def _warn(self, report: Report, message: str) -> None:
        if len(report.warnings) < MAX_ERRORS_KEPT:
            report.warnings.append(message)
        log.warning("%s", message)

    async def _keep_lease(self) -> None:
        if self.clock() - self._renewed < LEASE_RENEW_SECONDS:
            return
        now = self._now()
        await self._db(lambda conn: renew_lease(conn, self.holder, now))
        self._renewed = self.clock()

    async def _dry_page(self, observations: list[Observation], report: Report) -> None:
        """Count what a real run would do, from the stored records and the pure merge; write nothing."""
        ids = [obs.conversation_id for obs in observations]
        stored, gone = await anyio.to_thread.run_sync(_read_records, self.engine, ids)
        for obs in observations:
            record = stored.get(obs.conversation_id)
            if record is None:
                report.counts.new += 1
            elif merge(record, obs) != record:
                report.counts.updated += 1
            if is_final(obs.status) and not (record or {}).get("complete") and obs.conversation_id not in gone:
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


def _why_it_failed(exc: Exception) -> str:
    """The reason a run ended in `exc`, for the summary and the run record. A task group wraps what its tasks
    raised (a detail or audio fetch's): the first of those is the reason."""
    cause: BaseException = exc
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    if isinstance(cause, LeaseLost | ElevenLabsError):
        return str(cause)
    if isinstance(cause, StoreUnavailable):
        return f"database unavailable: {cause}"
    # A bug, or an answer nothing expected: the reason goes to the summary and the run record, the traceback to
    # the log.
    reason = f"unexpected error: {type(cause).__name__}: {str(cause)[:MAX_REASON_CHARS]}"
    log.error("reconcile run failed: %s", reason, exc_info=exc)
    return reason


def _store_details(conn: Connection, observations: list[Observation], now: datetime) -> dict[str, store.Change]:
    forget_not_found(conn, [obs.conversation_id for obs in observations])
    return store.apply_many(conn, observations, now)


def _read_records(engine: Engine, ids: Sequence[str]) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """The stored records among `ids`, and those whose detail was given up."""
    with unavailable_as_store_error(), engine.connect() as conn:
        return _stored_records(conn, ids), given_up_among(conn, ids)


def _listed(obs: Observation) -> _Listed:
    start = obs.fields.get("start_time_unix_secs")
    return _Listed(obs.conversation_id, start if isinstance(start, int) else None, obs.status)
