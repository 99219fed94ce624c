"""The one write path: archive a delivery, merge an observation into its conversation, upsert.

Every function takes a Connection inside a transaction the caller owns (the webhook route, the reconciler, the
session broker), so an archived event and the record it produced commit together or not at all.
Idempotency lives in the database: the archive's unique body hash and the conversation's primary key.

Erased conversations. A conversation with a tombstone (erase/erasure.py) is never written again, whoever brings it:
`apply_many` (the reconciler, the broker) answers Change.ERASED for it, a webhook delivery is IGNORED and not
archived, audio is not put in place. Each write looks for tombstones after it has locked the records it writes,
and an erase locks those records before it writes its tombstones and deletes: so either the erase waits for the
write and then deletes what it wrote, or the write waits for the erase and then sees its tombstone. (A
conversation never stored has no record to lock: an erase of such an id that commits during the very first write
of it, on PostgreSQL, can leave that write stored. Its next write is refused and erasing it again removes it.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.forward import outbox
from service.forward.events import change_event
from service.record import payloads
from service.record.merge import Audio, Observation, Source, merge, revised
from service.search import index as search_index
from service.storage.audio import TempBlob
from service.storage.db import insert_ignoring_conflict, insert_many_ignoring_conflict
from service.storage.tables import Conversation, ConversationTombstone, WebhookEvent

conversations: sa.Table = Conversation.__table__  # type: ignore[attr-defined]
webhook_events: sa.Table = WebhookEvent.__table__  # type: ignore[attr-defined]
tombstones: sa.Table = ConversationTombstone.__table__  # type: ignore[attr-defined]


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"


class Change(StrEnum):
    NEW = "new"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    ERASED = "erased"  # the conversation has a tombstone: nothing was written


@dataclass(frozen=True)
class Delivery:
    """One webhook request as received. `body` is None for audio, whose bytes live in the blob store."""

    body_sha256: str
    event_type: str
    conversation_id: str | None
    received_at: datetime
    body_bytes: int
    body: bytes | None


def _archive_values(delivery: Delivery) -> dict[str, Any]:
    return {
        "body_sha256": delivery.body_sha256,
        "event_type": delivery.event_type,
        "conversation_id": delivery.conversation_id,
        "received_at": delivery.received_at,
        "body_bytes": delivery.body_bytes,
        "body": delivery.body,
    }


def archive(conn: Connection, delivery: Delivery) -> bool:
    """Store the delivery; False when a byte-identical body was stored before (a replay)."""
    return insert_ignoring_conflict(conn, webhook_events, _archive_values(delivery), "body_sha256")


def record_deliveries(conn: Connection, items: Sequence[tuple[Delivery, Observation | None]]) -> list[Outcome]:
    """Archive webhook deliveries and, for each that is not a replay nor of an unknown type, merge what it says:
    a batch in one transaction, in a constant number of statements.

    Order is kept: a body that appears twice in the batch is a duplicate the second time, and observations of
    one conversation merge in the order given.
    """
    ids = sorted({delivery.conversation_id for delivery, _ in items if delivery.conversation_id is not None})
    stored = _locked_records(conn, ids)
    erased = erased_among(conn, ids)  # after the lock: see "Erased conversations" above
    # Nothing of an erased conversation is archived: its body would keep what the erasure removed.
    live = [delivery for delivery, _ in items if delivery.conversation_id not in erased]
    # In hash order, as the conversation rows are locked in id order: two batches holding the same two events
    # (duplicates racing through two workers) then wait for each other instead of deadlocking.
    rows = sorted((_archive_values(delivery) for delivery in live), key=lambda row: row["body_sha256"])
    archived = insert_many_ignoring_conflict(conn, webhook_events, rows, "body_sha256")
    outcomes: list[Outcome] = []
    fresh: set[str] = set()
    observations: list[Observation] = []
    for delivery, observation in items:
        if delivery.conversation_id in erased:
            outcomes.append(Outcome.IGNORED)
            continue
        if delivery.body_sha256 not in archived or delivery.body_sha256 in fresh:
            outcomes.append(Outcome.DUPLICATE)
            continue
        fresh.add(delivery.body_sha256)
        if observation is None:
            outcomes.append(Outcome.IGNORED)
            continue
        outcomes.append(Outcome.ACCEPTED)
        observations.append(observation)
    if observations:
        _merge_locked(conn, stored, observations, now=items[0][0].received_at)
    return outcomes


def record_audio_delivery(conn: Connection, delivery: Delivery, agent_id: str | None, blob: TempBlob) -> Outcome:
    """Archive an audio webhook and put its audio in place, unless the same body was stored before (DUPLICATE) or
    the conversation was erased (IGNORED: neither archived nor put in place)."""
    if not archive(conn, delivery):
        return Outcome.DUPLICATE
    assert delivery.conversation_id is not None  # the envelope of an audio event always has one
    change = store_audio(conn, delivery.conversation_id, blob, Source.AUDIO_WEBHOOK, delivery.received_at, agent_id)
    if change is Change.ERASED:
        conn.execute(sa.delete(webhook_events).where(webhook_events.c.body_sha256 == delivery.body_sha256))
        return Outcome.IGNORED
    return Outcome.ACCEPTED


def store_audio(
    conn: Connection, conversation_id: str, blob: TempBlob, source: Source, at: datetime, agent_id: str | None = None
) -> Change:
    """Move synced audio to the conversation's path and record it, inside the caller's transaction: the file's
    claim settles when that transaction commits (the audio webhook and the reconciler's audio fetch both come here).

    Audio of an erased conversation is not put in place (ERASED; the caller discards the blob). The first look is
    only to spare the move: the authoritative one comes with the record's lock in `apply`, and when the erase
    committed in between, the file is taken back while the path's lock still keeps deleters and writers away.
    """
    if erased_among(conn, [conversation_id]):
        return Change.ERASED
    relpath = blob.commit(conversation_id)
    observation = payloads.audio_observation(conversation_id, agent_id, Audio(relpath, blob.size), source, at)
    change = apply(conn, observation, at)
    if change is Change.ERASED:
        blob.withdraw()
    return change


def apply(conn: Connection, obs: Observation, now: datetime) -> Change:
    """Merge one observation into its conversation record (creating it if new); ERASED when it has a tombstone."""
    return apply_many(conn, [obs], now)[obs.conversation_id]


def apply_many(conn: Connection, observations: Sequence[Observation], now: datetime) -> dict[str, Change]:
    """Merge observations into their records: one locking read, one insert, one update per changed record.
    Conversations with a tombstone are left alone and answered ERASED."""
    ids = sorted({obs.conversation_id for obs in observations})
    stored = _locked_records(conn, ids)
    erased = erased_among(conn, ids)  # after the lock: see "Erased conversations" above
    wanted = [obs for obs in observations if obs.conversation_id not in erased]
    return {**_merge_locked(conn, stored, wanted, now), **dict.fromkeys(erased, Change.ERASED)}


def _merge_locked(
    conn: Connection, stored: dict[str, dict[str, Any]], observations: Sequence[Observation], now: datetime
) -> dict[str, Change]:
    """`apply_many` once the stored records among the observations' ids are locked and read into `stored`."""
    merged = _fold(stored, observations)
    created = {cid: record for cid, record in merged.items() if cid not in stored}
    lost_race: set[str] = set()
    if created:
        rows = [{**record, "updated_at": now} for record in created.values()]
        inserted = insert_many_ignoring_conflict(conn, conversations, rows, "conversation_id")
        lost_race = set(created) - inserted
    if lost_race:
        # Another transaction created these between our read and insert (PostgreSQL): merge into theirs.
        stored.update(_locked_records(conn, sorted(lost_race)))
        merged.update(_fold(stored, [obs for obs in observations if obs.conversation_id in lost_race]))
    changes: dict[str, Change] = {}
    for cid, record in merged.items():
        if cid in created and cid not in lost_race:
            changes[cid] = Change.NEW
            continue
        changed = {name: value for name, value in record.items() if stored[cid].get(name) != value}
        changes[cid] = Change.UPDATED if changed else Change.UNCHANGED
        if changed:
            conn.execute(
                sa.update(conversations)
                .where(conversations.c.conversation_id == cid)
                .values({**changed, "updated_at": now})
            )
    search_index.refresh(conn, stored, merged)  # in the same transaction: the search never sees another version
    # One event per new revision, in this same transaction (forward/outbox.py): a provenance time alone is none.
    outbox.add(
        conn,
        [
            change_event(None if changes[cid] is Change.NEW else stored[cid], record, now)
            for cid, record in merged.items()
            if changes[cid] is Change.NEW or record["revision"] != stored[cid]["revision"]
        ],
    )
    return changes


def _fold(stored: Mapping[str, dict[str, Any]], observations: Sequence[Observation]) -> dict[str, dict[str, Any]]:
    """Each record after this transaction's observations, its `revision` counting them as one change at most."""
    merged: dict[str, dict[str, Any]] = {}
    for obs in observations:
        cid = obs.conversation_id
        merged[cid] = merge(merged.get(cid, stored.get(cid)), obs)
    for cid, record in merged.items():
        record["revision"] = revised(stored.get(cid), record)
    return merged


# Built once: constructing a statement cost more than running it on the webhook path.
_LOCKED_RECORDS = (
    sa.select(conversations)
    .where(conversations.c.conversation_id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(conversations.c.conversation_id)
    .with_for_update()
)


def _locked_records(conn: Connection, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The stored records among `ids`, locked for update in id order (so concurrent batches cannot deadlock)."""
    if not ids:
        return {}
    rows = conn.execute(_LOCKED_RECORDS, {"ids": list(ids)}).mappings()
    records = {}
    for row in rows:
        record = dict(row)
        record.pop("updated_at", None)
        records[record["conversation_id"]] = record
    return records


# Built once, like _LOCKED_RECORDS: every write asks it.
_ERASED_AMONG = sa.select(tombstones.c.conversation_id).where(
    tombstones.c.conversation_id.in_(sa.bindparam("ids", expanding=True))
)


def erased_among(conn: Connection, ids: Sequence[str]) -> set[str]:
    """The ids among `ids` that have a tombstone (their conversation was erased)."""
    if not ids:
        return set()
    return set(conn.execute(_ERASED_AMONG, {"ids": list(ids)}).scalars())


def audio_is_claimed(conn: Connection, relpath: str) -> bool:
    """Whether a committed record says its audio is at `relpath` (how blobs.BlobStore.settle_claims decides)."""
    claimed = sa.select(conversations.c.conversation_id).where(
        conversations.c.audio_path == relpath, conversations.c.audio_stored.is_(True)
    )
    return conn.execute(claimed.limit(1)).first() is not None


def audio_claimed_by(conn: Connection, conversation_id: str, relpath: str) -> bool:
    """`audio_is_claimed` when the path is known to be `conversation_id`'s: a conversation's audio path is a
    function of its id (storage/audio.py `audio_relpath`), so only its own record can claim it, and a primary-key
    lookup answers what would otherwise scan the table (audio_path has no index) once per file."""
    claimed = sa.select(conversations.c.conversation_id).where(
        conversations.c.conversation_id == conversation_id,
        conversations.c.audio_path == relpath,
        conversations.c.audio_stored.is_(True),
    )
    return conn.execute(claimed).first() is not None
