"""Erasure: conversations removed for good, in batches; what stays is a tombstone and an audit row.

What goes, in one transaction per batch of BATCH_SIZE conversations: the record, its search entry and its archived
webhook bodies (`webhook_event` rows of its id); then, once that transaction has committed, its audio file, as purge
does: under the path's lock, and only if no committed record claims it (storage/audio.py `remove_unclaimed`). A
crash between the two leaves an orphaned file, never a record pointing at a missing one; erasing the same ids again
removes it.

What stays: a tombstone per conversation (its id and when, nothing else), which the one write path honours
(record/store.py): the reconciler while ElevenLabs still lists it, a late or retried webhook (answered 200
`ignored`, its body not archived) and the broker leave it gone. And one `erase_log` row per batch for audits: who
(an admin token's position, or "cli"), when, how many, by which kind of selector — never the ids, the user or a
token. A dry run (`count`) changes nothing and logs nothing.

Order inside a batch's transaction: lock the records, write the tombstones, delete. Writers lock the records first
and look for tombstones second, so an erase and a write of the same conversation never both miss each other.

Named ids (the CLI's `--conversation`) get a tombstone even when they are not stored (yet): a conversation erased on
request before its webhook arrived is then never stored. The API's DELETE erases only a stored conversation (else
404) and tombstones only what it erased.

Forwarding: a conversation's earlier events hold its data, so they go too (forward/outbox.py `erased`), and one
`conversation.deleted` event takes their place, in the batch's transaction: the erasure and its announcement
commit together or not at all. `on_erased(conn, ids, at)` then runs in that same transaction with the ids of the
records deleted (a seam for tests that need to act inside it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from service.forward import outbox
from service.record import store
from service.search import index as search_index
from service.storage.audio import BlobStore
from service.storage.db import insert_many_ignoring_conflict, run_transaction, transaction
from service.storage.tables import EraseLog

log = logging.getLogger("postcall.erase")

BATCH_SIZE = 500
CLI_ACTOR = "cli"

conversations = store.conversations
webhook_events = store.webhook_events
erase_log: sa.Table = EraseLog.__table__  # type: ignore[attr-defined]

OnErased = Callable[[Connection, Sequence[str], datetime], None]
Upstream = Callable[[Sequence[str]], Awaitable[None]]


class Selector(StrEnum):
    """How the conversations were chosen: the only thing the erase log says about them."""

    CONVERSATION = "conversation"
    USER_ID = "user_id"


@dataclass(frozen=True)
class Plan:
    """What to erase: `ids`, chosen by `selector`. With `tombstone_unstored`, ids that are not stored get a
    tombstone too (named by the CLI); without, only the records erased do (the API)."""

    selector: Selector
    ids: tuple[str, ...]
    tombstone_unstored: bool = False


def named(ids: Iterable[str], *, tombstone_unstored: bool) -> Plan:
    return Plan(Selector.CONVERSATION, tuple(dict.fromkeys(ids)), tombstone_unstored)


def of_user(engine: Engine, user_id: str) -> Plan:
    """Every conversation stored for `user_id` now (one stored later is a new conversation, not part of this)."""
    query = (
        sa.select(conversations.c.conversation_id)
        .where(conversations.c.user_id == user_id)
        .order_by(conversations.c.conversation_id)
    )
    ids = transaction(engine, lambda conn: tuple(conn.execute(query).scalars()))
    return Plan(Selector.USER_ID, ids)


@dataclass
class EraseReport:
    conversations: int = 0  # records deleted
    tombstones: int = 0  # ids tombstoned now (not those erased before)
    webhook_events: int = 0
    audio_files: int = 0
    audio_bytes: int = 0
    missing_files: int = 0  # audio a record pointed at, already gone from disk


@dataclass(frozen=True)
class _Batch:
    erased: Sequence[str] = ()
    tombstones: int = 0
    webhook_events: int = 0
    audio: Sequence[tuple[str, str, int]] = field(default=())  # (conversation_id, relpath, bytes)


async def erase(
    engine: Engine,
    blobs: BlobStore,
    plan: Plan,
    actor: str,
    *,
    upstream: Upstream | None = None,
    on_erased: OnErased | None = None,
    clock: Callable[[], float] = time.time,
    batch_size: int = BATCH_SIZE,
) -> EraseReport:
    """Erase `plan` batch by batch; returns the totals. `upstream(ids)` is awaited for each batch before it is
    erased here, so that a run cut short can be run again over what is still stored (and so still selectable)."""
    report = EraseReport()
    for start in range(0, len(plan.ids), batch_size):
        ids = plan.ids[start : start + batch_size]
        if upstream is not None:
            await upstream(ids)
        at = datetime.fromtimestamp(clock(), UTC)
        work = partial(_erase_batch, ids=ids, plan=plan, actor=actor, at=at, on_erased=on_erased)
        batch = await run_transaction(engine, work)
        report.conversations += len(batch.erased)
        report.tombstones += batch.tombstones
        report.webhook_events += batch.webhook_events
        # The rows are committed away: from here a failure can only leave an orphaned file behind.
        await run_transaction(engine, partial(_remove_files, blobs=blobs, audio=batch.audio, report=report))
        log.info("erase batch committed: %d conversations, %d tombstones", len(batch.erased), batch.tombstones)
    return report


def _erase_batch(
    conn: Connection, ids: Sequence[str], plan: Plan, actor: str, at: datetime, on_erased: OnErased | None
) -> _Batch:
    locked = (
        sa.select(
            conversations.c.conversation_id,
            conversations.c.agent_id,
            conversations.c.revision,
            conversations.c.audio_path,
            conversations.c.audio_bytes,
        )
        .where(conversations.c.conversation_id.in_(ids))
        .order_by(conversations.c.conversation_id)
        .with_for_update()
    )
    rows = list(conn.execute(locked))
    found = [row.conversation_id for row in rows]
    gone = list(ids) if plan.tombstone_unstored else found
    if not gone:
        return _Batch()
    values = [{"conversation_id": cid, "erased_at": at} for cid in gone]
    tombstoned = insert_many_ignoring_conflict(conn, store.tombstones, values, "conversation_id")
    events = conn.execute(sa.delete(webhook_events).where(webhook_events.c.conversation_id.in_(gone))).rowcount
    if found:
        search_index.forget(conn, found)
        conn.execute(sa.delete(conversations).where(conversations.c.conversation_id.in_(found)))
        outbox.erased(conn, [(row.conversation_id, row.agent_id, row.revision) for row in rows], at)
    audio = [(row.conversation_id, row.audio_path, row.audio_bytes or 0) for row in rows if row.audio_path]
    entry = {
        "erased_at": at,
        "actor": actor,
        "selector": plan.selector.value,
        "conversations": len(found),
        "tombstones": len(tombstoned),
        "audio_files": len(audio),
        "webhook_events": events,
    }
    conn.execute(sa.insert(erase_log).values(entry))
    if on_erased is not None and found:
        on_erased(conn, found, at)
    return _Batch(found, len(tombstoned), events, audio)


def _remove_files(
    conn: Connection, blobs: BlobStore, audio: Sequence[tuple[str, str, int]], report: EraseReport
) -> None:
    """Unlink each erased file no committed record claims. In a transaction of its own: on SQLite that holds the
    write lock, which every audio writer holds before the path's lock (storage/audio.py, "Deleting")."""
    for conversation_id, relpath, size in audio:
        removed = blobs.remove_unclaimed(relpath, partial(store.audio_claimed_by, conn, conversation_id))
        if removed is False:
            report.missing_files += 1
        elif removed is True:
            report.audio_files += 1
            report.audio_bytes += size


def count(engine: Engine, plan: Plan, batch_size: int = BATCH_SIZE) -> EraseReport:
    """What erasing `plan` would remove now (`--dry-run`); changes nothing, logs nothing."""
    report = EraseReport()

    def work(conn: Connection) -> EraseReport:
        for start in range(0, len(plan.ids), batch_size):
            _count_batch(conn, plan, plan.ids[start : start + batch_size], report)
        return report

    return transaction(engine, work)


def _count_batch(conn: Connection, plan: Plan, ids: Sequence[str], report: EraseReport) -> None:
    found = list(conn.execute(sa.select(conversations.c.conversation_id).where(_among(ids))).scalars())
    gone = list(ids) if plan.tombstone_unstored else found
    audio = conn.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(conversations.c.audio_bytes), 0)).where(
            _among(ids), conversations.c.audio_path.is_not(None)
        )
    ).one()
    report.conversations += len(found)
    report.audio_files += audio[0]
    report.audio_bytes += int(audio[1])
    if gone:
        events = sa.select(sa.func.count()).where(webhook_events.c.conversation_id.in_(gone))
        report.webhook_events += conn.execute(events).scalar_one()
        report.tombstones += len(set(gone) - store.erased_among(conn, gone))


def _among(ids: Sequence[str]) -> sa.ColumnElement[bool]:
    return conversations.c.conversation_id.in_(ids)
