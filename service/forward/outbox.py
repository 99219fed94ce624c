"""The transactional outbox: an event is added in the transaction of the change it tells of.

So an event exists exactly when its change committed: a rolled-back write leaves no event, a committed one cannot
lose its event to a crash between "store" and "publish". Sending is someone else's job (the dispatcher reads the
feed, forward/feed.py); the writer pays one INSERT per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.forward.events import Event, deleted_event
from service.storage.tables import ForwardEvent

forward_events: sa.Table = ForwardEvent.__table__  # type: ignore[attr-defined]


def add(conn: Connection, events: Sequence[Event]) -> None:
    """Add `events` in the caller's transaction, in the order given (their `id`s follow it)."""
    if not events:
        return
    conn.execute(
        sa.insert(forward_events),
        [
            {
                "event_id": event.event_id,
                "type": event.type,
                "conversation_id": event.conversation_id,
                "agent_id": event.agent_id,
                "revision": event.revision,
                "committed_at": event.committed_at,
                "body": event.body,
            }
            for event in events
        ],
    )


def erased(conn: Connection, gone: Sequence[tuple[str, str | None, int]], at: datetime) -> None:
    """Erasure's part (erase/erasure.py): each conversation's earlier events hold its data and are deleted, and one
    `conversation.deleted` event (no record in it) is added per (conversation_id, agent_id, last revision)."""
    if not gone:
        return
    ids = [conversation_id for conversation_id, _, _ in gone]
    conn.execute(sa.delete(forward_events).where(forward_events.c.conversation_id.in_(ids)))
    add(conn, [deleted_event(cid, agent_id, revision, at) for cid, agent_id, revision in gone])
