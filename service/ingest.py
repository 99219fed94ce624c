"""The one write path: archive a delivery, merge an observation into its conversation, upsert.

Every function takes a Connection inside a transaction the caller owns (the webhook route, the reconciler, the
session broker), so an archived event and the record it produced commit together or not at all.
Idempotency lives in the database: the archive's unique body hash and the conversation's primary key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.db import insert_ignoring_conflict
from service.merge import Observation, merge
from service.models import Conversation, WebhookEvent

conversations: sa.Table = Conversation.__table__  # type: ignore[attr-defined]
webhook_events: sa.Table = WebhookEvent.__table__  # type: ignore[attr-defined]


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"


class Change(StrEnum):
    NEW = "new"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class Delivery:
    """One webhook request as received. `body` is None for audio, whose bytes live in the blob store."""

    body_sha256: str
    event_type: str
    conversation_id: str | None
    received_at: datetime
    body_bytes: int
    body: bytes | None


def archive(conn: Connection, delivery: Delivery) -> bool:
    """Store the delivery; False when a byte-identical body was stored before (a replay)."""
    values = {
        "body_sha256": delivery.body_sha256,
        "event_type": delivery.event_type,
        "conversation_id": delivery.conversation_id,
        "received_at": delivery.received_at,
        "body_bytes": delivery.body_bytes,
        "body": delivery.body,
    }
    return insert_ignoring_conflict(conn, webhook_events, values, "body_sha256")


def record_delivery(conn: Connection, delivery: Delivery, observation: Observation | None) -> Outcome:
    """Archive a webhook delivery and, unless it is a replay or of an unknown type, merge what it says."""
    if not archive(conn, delivery):
        return Outcome.DUPLICATE
    if observation is None:
        return Outcome.IGNORED
    apply(conn, observation, now=delivery.received_at)
    return Outcome.ACCEPTED


def apply(conn: Connection, obs: Observation, now: datetime) -> Change:
    """Merge one observation into its conversation record (creating it if new)."""
    current = _locked_record(conn, obs.conversation_id)
    if current is None:
        created = merge(None, obs)
        created["updated_at"] = now
        if insert_ignoring_conflict(conn, conversations, created, "conversation_id"):
            return Change.NEW
        # Another transaction created it between our read and insert (PostgreSQL): merge into theirs.
        current = _locked_record(conn, obs.conversation_id)
        assert current is not None
    merged = merge(current, obs)
    changed = {name: value for name, value in merged.items() if current.get(name) != value}
    if not changed:
        return Change.UNCHANGED
    changed["updated_at"] = now
    conn.execute(sa.update(conversations).where(conversations.c.conversation_id == obs.conversation_id).values(changed))
    return Change.UPDATED


def _locked_record(conn: Connection, conversation_id: str) -> dict[str, Any] | None:
    row = (
        conn.execute(
            sa.select(conversations).where(conversations.c.conversation_id == conversation_id).with_for_update()
        )
        .mappings()
        .first()
    )
    return _record(dict(row)) if row is not None else None


def _record(row: Mapping[str, Any]) -> dict[str, Any]:
    record = dict(row)
    record.pop("updated_at", None)
    return record


def get_record(conn: Connection, conversation_id: str) -> dict[str, Any] | None:
    """The stored record as a dict of column values (for readers and tests)."""
    row = (
        conn.execute(sa.select(conversations).where(conversations.c.conversation_id == conversation_id))
        .mappings()
        .first()
    )
    return dict(row) if row is not None else None
