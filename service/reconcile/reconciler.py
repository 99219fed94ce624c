"""The reconciler: list the workspace's conversations in a window and store whatever the webhooks missed.

One run: read the workspace's post-call webhook health (upstream.py; a failure to read it is a warning), then for
each scope — the whole workspace with no agent filter, or each agent named — plan the window (windows.py), page
through `GET /v1/convai/conversations`, merge every summary through `record.store` (one transaction per page), fetch
the detail of each final conversation that is new or incomplete (bounded concurrency, in the client), and move the
scope's checkpoint — never past a conversation that failed or is not final yet, so the next run lists it again.

With `--audio`, the recording of each `done` conversation that has none stored is fetched, unless ElevenLabs said
it has none (`has_audio` false in its summary or its detail). An audio fetch that fails never holds a checkpoint:
the ledger counts the runs that tried it, each later `--audio` run tries again, and after AUDIO_TRIES runs it is
given up (`audio_failed`).

The database side of a run — the lease that makes it one at a time, checkpoints, audio tries, the run record — is
the ledger (ledger.py). `--dry-run` lists and counts but writes nothing at all (no lease, no run record, no
checkpoint).
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
from service.reconcile import upstream
from service.reconcile.ledger import (
    AUDIO_TRIES,
    GIVE_UP_AFTER_RUNS,
    LEASE_RENEW_SECONDS,
    WORKSPACE,
    Counts,
    LeaseLost,
    Report,
    acquire_lease,
    audio_given_up_among,
    audio_to_retry,
    count_audio_try,
    count_not_found,
    default_holder,
    finish_run,
    forget_audio_tries,
    forget_not_found,
    given_up_among,
    read_checkpoint,
    read_workspace_checkpoint,
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
from service.storage.audio import BlobStore, TempBlob
from service.storage.db import StoreUnavailable, run_transaction, unavailable_as_store_error

log = logging.getLogger("postcall.reconcile")
T = TypeVar("T")

MAX_ERRORS_KEPT = 20
# 1,000,000 conversations per agent and window at 100 a page: far above a real window, and a run that meets an
# API paging for ever (a new cursor each time) ends within minutes, not never: against the fake platform, 10,001
# list requests of 100 summaries each, merged into SQLite, took 405 s on a shared 2-core machine.
MAX_PAGES_PER_WINDOW = 10_000
# A run's wall-clock bound, so that a listing which pages slowly for ever ends too (and frees the lease): six hours
# is about 50 times the 405 s that a million-conversation window took above.
MAX_RUN_SECONDS = 6 * 3600
# Audio that failed in earlier runs, tried again at the end of a run: a bound on one run's share of them (each is
# tried at most AUDIO_TRIES times in all, so a longer backlog is worked off over the next runs).
AUDIO_RETRIES_PER_RUN = 1000
# The record's column that says postcall holds the audio (`has_audio` is ElevenLabs' own flag, as it sent it).
AUDIO_STORED = "audio_stored"


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
    max_seconds: float = MAX_RUN_SECONDS


class EndlessListing(Exception):
    """A listing still saying `has_more` after `Options.max_pages` pages, or past the run's `Options.max_seconds`:
    an API that pages for ever."""


# What "updated" means to a person: the status or the content changed, not just `reconciled_at` (which every
# listing moves). The JSON columns change only with a richer source, which moves `data_rank` too.
_FINGERPRINT = (
    "status",
    "data_rank",
    "complete",
    AUDIO_STORED,
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


@dataclass(frozen=True)
class _Scope:
    """What one listing covers — one agent, or the whole workspace (`agent_id` None) — and whose checkpoint it
    moves."""

    agent_id: str | None

    @property
    def key(self) -> str:
        return self.agent_id if self.agent_id is not None else WORKSPACE

    def __str__(self) -> str:
        return f"agent {self.agent_id}" if self.agent_id is not None else "the workspace"


@dataclass
class _Outcome:
    """What holds a scope's checkpoint back after its listing."""

    failed_starts: list[int | None] = field(default_factory=list)  # None: the summary carried no start time
    pending_starts: list[int | None] = field(default_factory=list)
    listing_failed: bool = False


@dataclass(frozen=True)
class _Listed:
    conversation_id: str
    start: int | None
    status: str | None
    has_audio: bool | None  # ElevenLabs' flag, when the summary carries it


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
        self._started = 0.0

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    async def _db(self, work: Callable[[Connection], T]) -> T:
        return await run_transaction(self.engine, work)

    async def run(self, options: Options) -> Report:
        """Raises LeaseHeld before doing anything when another run holds the lease. Any other way a run ends is in
        its report and its record: an exception is a failed run that names it, never one that looks fine."""
        report = Report(Counts(), agents=[], dry_run=options.dry_run)
        self._started = self.clock()
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
            await self._webhook_health(report)
            await self._scopes(options, report, windows)
            if options.audio and not options.dry_run:
                await self._retry_audio(report)
        except Exception as exc:
            report.errors.append(_why_it_failed(exc))
        except BaseException:
            report.errors.append("interrupted before it finished")
            raise

    async def _webhook_health(self, report: Report) -> None:
        """The workspace's post-call webhook as ElevenLabs reports it: a problem is a warning, never a failure."""
        try:
            settings = await self.client.convai_settings()
            webhooks = await self.client.workspace_webhooks()
        except ElevenLabsError as exc:
            self._warn(report, f"could not read the workspace's post-call webhook from ElevenLabs: {exc}")
            return
        healthy, warnings = upstream.assess(settings, webhooks, int(self.clock()))
        report.upstream_webhook_healthy = healthy
        for warning in warnings:
            self._warn(report, warning)

    async def _scopes(self, options: Options, report: Report, windows: list[Window]) -> None:
        scopes = [_Scope(agent_id) for agent_id in options.agents] or [_Scope(None)]
        report.agents = list(options.agents)
        end = int(self.clock())
        for scope in scopes:
            if scope.agent_id is None:
                checkpoint = await self._db(read_workspace_checkpoint)
            else:
                checkpoint = await self._db(partial(read_checkpoint, agent_id=scope.agent_id))
            try:
                window = plan_window(checkpoint, end, options.since, options.until, options.overlap, options.lookback)
            except WindowError as exc:
                log.warning("%s: %s; skipped", scope, exc)
                continue
            windows.append(window)
            outcome = await self._listing(scope, window, options, report)
            if outcome.listing_failed or options.dry_run:
                continue
            moved = next_checkpoint(checkpoint, window, outcome.failed_starts, outcome.pending_starts, now=end)
            if moved is not None and moved != checkpoint:
                await self._db(partial(write_checkpoint, agent_id=scope.key, checkpoint=moved, now=self._now()))
            log.info("%s: window %d..%d, checkpoint %s → %s", scope, window.start, window.end, checkpoint, moved)

    async def _listing(self, scope: _Scope, window: Window, options: Options, report: Report) -> _Outcome:
        outcome = _Outcome()
        pages = 0
        try:
            # The API's bounds are exclusive: start - 1 keeps a conversation that starts exactly at `start`.
            async for page in self.client.conversation_pages(scope.agent_id, window.start - 1, window.end):
                pages += 1
                if pages > options.max_pages:
                    raise EndlessListing(f"more than {options.max_pages} pages: the API keeps saying there is more")
                if self.clock() - self._started > options.max_seconds:
                    raise EndlessListing(f"still listing after {options.max_seconds:g} s, the run's bound")
                await self._page(page, options, report, outcome)
                if self.on_progress is not None:
                    self.on_progress(report.counts)
        except (ElevenLabsError, EndlessListing) as exc:
            outcome.listing_failed = True
            report.counts.failed += 1
            report.errors.append(f"{scope}: listing conversations failed: {exc}")
            log.error("%s: listing conversations failed: %s", scope, exc)
        return outcome

    async def _page(self, page: list[dict[str, Any]], options: Options, report: Report, out: _Outcome) -> None:
        at = self._now()
        summaries = [s for s in page if payloads.valid_conversation_id(s.get("conversation_id"))]
        observations = [payloads.summary_observation(s, at) for s in summaries]
        listed = {obs.conversation_id: _listed(obs, s) for obs, s in zip(observations, summaries, strict=True)}
        report.counts.listed += len(listed)
        if not listed:
            return
        if options.dry_run:
            await self._dry_page(observations, report)
            return
        await self._keep_lease()
        ids = list(listed)
        (flags, changes), gone, audio_gone = await self._db(
            lambda conn: (
                _apply_summaries(conn, observations, at),
                given_up_among(conn, ids),
                audio_given_up_among(conn, ids) if options.audio else set(),
            )
        )
        tally = _Tally(changes)
        # Erased here (a tombstone): ElevenLabs may list it for years, but nothing of it is asked for or stored.
        erased = {cid for cid, change in changes.items() if change is store.Change.ERASED}
        wanted: list[_Listed] = []
        for item in listed.values():
            complete = bool(flags.get(item.conversation_id, {}).get("complete"))
            if item.conversation_id in erased:
                continue
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
            await self._fetch_audio(_audio_to_fetch(listed, flags, details, audio_gone | erased), report, tally)
        report.counts.new += tally.new
        report.counts.updated += tally.updated

    async def _fetch_details(self, wanted: list[_Listed], report: Report, out: _Outcome) -> list[dict[str, Any]]:
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

    async def _not_found(self, missing: list[tuple[_Listed, NotFound]], report: Report, out: _Outcome) -> None:
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

    async def _fetch_audio(self, ids: list[str], report: Report, tally: _Tally) -> None:
        """Fetch and store each recording. A failure is one try of AUDIO_TRIES (warned), never a held checkpoint;
        a local one (the disk) fails the run as well, since it is ours to fix."""

        async def fetch(conversation_id: str) -> None:
            try:
                blob = await self.client.download_audio(conversation_id, self.blobs)
            except NotFound:
                return  # no recording (or none yet): nothing to store
            except ElevenLabsError as exc:
                await self._audio_failed(conversation_id, str(exc), report)
                return
            except OSError as exc:
                why = f"cannot write it to the data dir: {exc}"
                self._error(report, f"{conversation_id}: audio: {why}")
                await self._audio_failed(conversation_id, why, report)
                return
            try:
                change = await self._db(
                    partial(_store_audio, conversation_id=conversation_id, blob=blob, now=self._now())
                )
            finally:
                blob.discard()  # a no-op once committed into place
            report.counts.audio_fetched += 1
            tally.add({conversation_id: change})

        async with anyio.create_task_group() as group:
            for conversation_id in ids:
                group.start_soon(fetch, conversation_id)

    async def _audio_failed(self, conversation_id: str, why: str, report: Report) -> None:
        run_id = report.run_id
        assert run_id is not None  # a dry run fetches no audio
        why = why[:MAX_REASON_CHARS]
        tries = await self._db(lambda conn: count_audio_try(conn, conversation_id, run_id, why, self._now()))
        if tries >= AUDIO_TRIES:
            report.counts.audio_failed += 1
            self._warn(report, f"{conversation_id}: audio: {why}; failed in {tries} runs, given up (kept without it)")
        else:
            self._warn(report, f"{conversation_id}: audio: {why} (try {tries} of {AUDIO_TRIES}; tried again next run)")

    async def _retry_audio(self, report: Report) -> None:
        """Audio that failed in earlier runs, whatever window its conversation is in: tried once more. What has
        been stored since (an audio webhook) or erased is forgotten instead."""
        run_id = report.run_id
        assert run_id is not None
        ids = await self._db(lambda conn: _audio_wanted(conn, audio_to_retry(conn, run_id, AUDIO_RETRIES_PER_RUN)))
        tally = _Tally({})
        await self._fetch_audio(ids, report, tally)
        report.counts.updated += tally.updated

    def _failed(self, item: _Listed, why: str, report: Report, out: _Outcome) -> None:
        out.failed_starts.append(item.start)
        self._error(report, f"{item.conversation_id}: {why}")

    def _error(self, report: Report, message: str) -> None:
        report.counts.failed += 1
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


def _listed(obs: Observation, summary: dict[str, Any]) -> _Listed:
    start = obs.fields.get("start_time_unix_secs")
    has_audio = summary.get("has_audio")
    return _Listed(
        obs.conversation_id,
        start if isinstance(start, int) else None,
        obs.status,
        has_audio if isinstance(has_audio, bool) else None,
    )


def _audio_to_fetch(
    listed: dict[str, _Listed], stored: dict[str, dict[str, Any]], details: list[dict[str, Any]], left: set[str]
) -> list[str]:
    """The `done` conversations of a page whose audio is not stored, unless ElevenLabs said it has none (its summary,
    or a detail fetched now: when neither says, ask; a 404 means none) or they are `left` (audio given up, erased)."""
    said = {cid: item.has_audio for cid, item in listed.items()}
    said |= {d["conversation_id"]: d["has_audio"] for d in details if isinstance(d.get("has_audio"), bool)}
    return [
        cid
        for cid, item in listed.items()
        if item.status == "done"
        and not stored.get(cid, {}).get(AUDIO_STORED)
        and said[cid] is not False
        and cid not in left
    ]


def _store_audio(conn: Connection, conversation_id: str, blob: TempBlob, now: datetime) -> store.Change:
    change = store.store_audio(conn, conversation_id, blob, Source.AUDIO_FETCH, now)
    forget_audio_tries(conn, [conversation_id])
    return change


def _audio_wanted(conn: Connection, ids: Sequence[str]) -> list[str]:
    """Those of `ids` whose record is stored without its audio; the tries of the others are forgotten."""
    table = store.conversations
    query = sa.select(table.c.conversation_id).where(table.c.conversation_id.in_(ids), table.c[AUDIO_STORED].is_(False))
    wanted = set(conn.execute(query).scalars())
    forget_audio_tries(conn, [cid for cid in ids if cid not in wanted])
    return [cid for cid in ids if cid in wanted]
