"""Retention: `postcall purge --older-than 90d [--audio-only] [--dry-run]`.

A conversation's age is its `start_time_unix_secs`. A conversation with no start time (a session created through
the broker whose call never reported back, or a failure whose webhook carried none) is aged by `first_seen_at`
instead, so such records do not stay forever.

Work is done in batches of `BATCH_SIZE` conversations, one short transaction each, so a purge of millions of rows
never holds a long lock against the webhook receiver. Each batch locks its rows (`FOR UPDATE` on PostgreSQL; SQLite's
`BEGIN IMMEDIATE` takes the write lock), deletes them, their search entries and their archived webhook events (or,
with `audio_only`, clears their audio columns), commits, and only then unlinks the audio files: a crash in between
leaves an orphaned file, never a record pointing at a missing one. A file already gone is fine.

Audio accepted meanwhile. Between a batch's commit and the unlink, an audio webhook (or a reconcile) may store a
new file for one of those conversations, at the same path, under a new record. So each file is removed only if no
committed record claims its path, decided under the path's lock, which a writer holds until its transaction ends
(storage/audio.py, "Deleting"): a file committed after the batch's transaction is never deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from service.forward import outbox
from service.forward.events import change_event
from service.record import store
from service.search import index as search_index
from service.storage.audio import BlobStore
from service.storage.db import transaction
from service.storage.tables import Conversation, WebhookEvent

BATCH_SIZE = 500

conversations: sa.Table = Conversation.__table__  # type: ignore[attr-defined]
webhook_events: sa.Table = WebhookEvent.__table__  # type: ignore[attr-defined]


class CutoffError(ValueError):
    """An age that reaches back to a time no timestamp column can compare with: the caller exits 2 saying so."""


@dataclass(frozen=True)
class Cutoff:
    """Conversations that started before `unix` (or, with no start time, were first seen before it) are old."""

    unix: int

    def __post_init__(self) -> None:
        self.moment()  # refused here, with a reason, rather than as a traceback halfway through the purge

    def moment(self) -> datetime:
        try:
            return datetime.fromtimestamp(self.unix, UTC)
        except (ValueError, OverflowError, OSError):
            raise CutoffError("reaches back past the year 1; give a shorter age") from None

    def condition(self) -> sa.ColumnElement[bool]:
        started = conversations.c.start_time_unix_secs
        first_seen = conversations.c.first_seen_at
        return sa.or_(started < self.unix, sa.and_(started.is_(None), first_seen < self.moment()))


@dataclass
class PurgeReport:
    conversations: int = 0
    audio_files: int = 0
    audio_bytes: int = 0
    webhook_events: int = 0
    missing_files: int = 0
    kept_files: int = 0  # at a purged record's path, but put there and claimed by a write committed since


def count(engine: Engine, cutoff: Cutoff, audio_only: bool = False) -> PurgeReport:
    """What a purge would remove now (`--dry-run`); changes nothing."""

    def work(conn: Connection) -> PurgeReport:
        old = cutoff.condition()
        with_audio = sa.and_(old, conversations.c.audio_stored.is_(True))
        audio = conn.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(conversations.c.audio_bytes), 0)).where(with_audio)
        ).one()
        report = PurgeReport(audio_files=audio[0], audio_bytes=int(audio[1]))
        if audio_only:
            report.conversations = audio[0]
            return report
        report.conversations = conn.execute(sa.select(sa.func.count()).where(old)).scalar_one()
        old_ids = sa.select(conversations.c.conversation_id).where(old)
        report.webhook_events = conn.execute(
            sa.select(sa.func.count()).where(webhook_events.c.conversation_id.in_(old_ids))
        ).scalar_one()
        return report

    return transaction(engine, work)


def purge(
    engine: Engine,
    blobs: BlobStore,
    cutoff: Cutoff,
    audio_only: bool = False,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    batch_size: int = BATCH_SIZE,
    on_committed: Callable[[Sequence[str]], None] | None = None,
) -> PurgeReport:
    """Delete old conversations (or only their audio) batch by batch until none is left; returns the totals.

    `on_committed` is called with each batch's conversation ids once its transaction has committed, before its
    files are removed (progress; tests race writes against the purge there)."""
    report = PurgeReport()
    step = _clear_audio_batch if audio_only else _delete_batch
    while True:
        batch = transaction(engine, lambda conn: step(conn, cutoff, batch_size, now()))
        if not batch.ids:
            return report
        report.conversations += len(batch.ids)
        report.webhook_events += batch.webhook_events
        if on_committed is not None:
            on_committed(batch.ids)
        # The rows are committed away: from here a failure can only leave an orphaned file behind.
        transaction(engine, partial(_remove_files, blobs=blobs, audio=batch.audio, report=report))


def _remove_files(
    conn: Connection, blobs: BlobStore, audio: Sequence[tuple[str, str, int]], report: PurgeReport
) -> None:
    """Unlink each purged file no committed record claims any more. In a transaction of its own: on SQLite that
    holds the write lock, which every audio writer holds before the path's lock (storage/audio.py)."""
    for conversation_id, relpath, size in audio:
        report.audio_files += 1
        report.audio_bytes += size
        removed = blobs.remove_unclaimed(relpath, partial(store.audio_claimed_by, conn, conversation_id))
        if removed is False:
            report.missing_files += 1
        elif removed is None:
            report.kept_files += 1


def describe(report: PurgeReport, cutoff: Cutoff, older_than: str, audio_only: bool, dry_run: bool) -> str:
    """One line for the operator: what was (or, with --dry-run, would be) removed."""
    since = cutoff.moment().isoformat(timespec="seconds").replace("+00:00", "Z")
    scope = f"started before {since} (older than {older_than})"
    audio = f"{report.audio_files} audio files ({report.audio_bytes:,} bytes)"
    if audio_only:
        verb = "would remove" if dry_run else "removed"
        line = f"{verb} {audio} of conversations that {scope}; their records are kept"
    else:
        verb = "would purge" if dry_run else "purged"
        line = (
            f"{verb} {report.conversations} conversations that {scope}, "
            f"with {audio} and {report.webhook_events} archived webhook events"
        )
    if report.missing_files:
        line += f"; {report.missing_files} audio files were already missing"
    if report.kept_files:
        line += f"; {report.kept_files} audio files stored again meanwhile were kept"
    return line


@dataclass(frozen=True)
class _Batch:
    ids: Sequence[str]
    audio: Sequence[tuple[str, str, int]]  # (conversation_id, path relative to the data dir, bytes)
    webhook_events: int = 0


def _lock_batch(conn: Connection, condition: sa.ColumnElement[bool], limit: int) -> list[sa.Row[tuple[str, str, int]]]:
    query = (
        sa.select(conversations.c.conversation_id, conversations.c.audio_path, conversations.c.audio_bytes)
        .where(condition)
        .order_by(conversations.c.conversation_id)
        .limit(limit)
        .with_for_update()
    )
    return list(conn.execute(query))


def _audio_of(rows: Sequence[sa.Row[tuple[str, str, int]]]) -> list[tuple[str, str, int]]:
    return [(row.conversation_id, row.audio_path, row.audio_bytes or 0) for row in rows if row.audio_path]


def _delete_batch(conn: Connection, cutoff: Cutoff, limit: int, _now: datetime) -> _Batch:
    rows = _lock_batch(conn, cutoff.condition(), limit)
    ids = [row.conversation_id for row in rows]
    if not ids:
        return _Batch((), ())
    events = conn.execute(sa.delete(webhook_events).where(webhook_events.c.conversation_id.in_(ids))).rowcount
    search_index.forget(conn, ids)
    conn.execute(sa.delete(conversations).where(conversations.c.conversation_id.in_(ids)))
    return _Batch(ids, _audio_of(rows), events)


def _clear_audio_batch(conn: Connection, cutoff: Cutoff, limit: int, now: datetime) -> _Batch:
    rows = _lock_batch(conn, sa.and_(cutoff.condition(), conversations.c.audio_stored.is_(True)), limit)
    ids = [row.conversation_id for row in rows]
    if not ids:
        return _Batch((), ())
    # audio_received_at stays: it is provenance (audio did arrive), not a claim that audio is stored. The audio
    # no longer being stored is a content change like its arrival: one more revision.
    conn.execute(
        sa.update(conversations)
        .where(conversations.c.conversation_id.in_(ids))
        .values(
            audio_stored=False,
            audio_path=None,
            audio_bytes=None,
            revision=conversations.c.revision + 1,
            updated_at=now,
        )
    )
    _announce_cleared(conn, ids, now)
    return _Batch(ids, _audio_of(rows))


def _announce_cleared(conn: Connection, ids: Sequence[str], now: datetime) -> None:
    """A new revision is an event (forward/outbox.py), in this same transaction: the records as they are now,
    each against itself as it was a moment ago, with its audio."""
    events = []
    for row in conn.execute(sa.select(conversations).where(conversations.c.conversation_id.in_(ids))).mappings():
        after = dict(row)
        before = {**after, "audio_stored": True, "revision": after["revision"] - 1}
        events.append(change_event(before, after, now))
    outbox.add(conn, events)
