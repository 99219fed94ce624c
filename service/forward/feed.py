"""The feed: events in commit order, read with a cursor that never skips one.

Why not the row id. `forward_event.id` is given at INSERT, inside the writer's transaction. On PostgreSQL two
writers can take ids 7 and 8 and commit 8 first: a consumer that reads "after 6" then gets 8, moves its cursor to
8, and never sees 7 when it commits a moment later. Any number taken inside the writing transaction (a sequence, a
timestamp, a transaction id) has that hole, because the order numbers are taken in is not the order commits
become visible in.

What we do instead: positions are given *after* commit, by the sequencer (`sequence`). It runs as a transaction of
its own that first locks the single `forward_sequence` row, then numbers every committed event that has no
position yet, in id order, continuing from the row's `last`, and commits. The row lock makes sequencers take turns:
the next one starts only once the previous one's commit is visible (PostgreSQL releases row locks after the commit
is visible to new snapshots), so it sees the positions already given and continues after them. Hence:
- positions only grow in the order they become visible: when a reader sees position p, every position below p
  that will ever exist is already visible to it (each was given by this or an earlier, already visible sequencer);
- an event whose writer commits late simply gets its position from a later sequencer, above every position any
  reader has seen — it lands after a consumer's cursor, never behind it.
So a consumer that reads `position > cursor` in order and moves its cursor to the last position it got sees each
event exactly once. An event is in the feed from the first sequencer run after its commit: every reader and the
dispatcher run one before they read (cheap when there is nothing to number; one that finds another at work skips
instead of queueing, and what that other one numbers is there on the next read).

Order within a conversation. Two writes of one conversation are serialised by the lock on its record (record/
store.py): the second takes its event id after the first committed, so it has the larger id; a sequencer that
sees both numbers them in id order, and one that sees only one sees the first. So within a conversation, feed
order is revision order.

SQLite has one writer at a time (BEGIN IMMEDIATE), so its ids are in commit order already; it runs the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.storage.tables import ForwardEvent, ForwardSequence

forward_events: sa.Table = ForwardEvent.__table__  # type: ignore[attr-defined]
forward_sequence: sa.Table = ForwardSequence.__table__  # type: ignore[attr-defined]

SEQUENCE = "events"  # the one row of forward_sequence
SEQUENCE_BATCH = 5000  # events numbered per sequencer transaction: bounds its lock time on a big backlog

# GET /v1/events: the most events one answer holds, and the longest a long-poll waits.
MAX_PAGE = 1000
MAX_WAIT_SECONDS = 30

_UNSEQUENCED = sa.select(forward_events.c.id).where(forward_events.c.position.is_(None))


class BadCursor(ValueError):
    """A cursor this feed did not give out."""


def encode_cursor(position: int) -> str:
    return str(position)


def decode_cursor(cursor: str | None) -> int:
    """The position a cursor stands at; no cursor is the start, before the oldest event kept."""
    if cursor is None or cursor == "":
        return 0
    if not cursor.isascii() or not cursor.isdigit() or len(cursor) > 19:
        raise BadCursor("cursor must be a next_cursor this feed returned")
    return int(cursor)


def unsequenced(conn: Connection) -> bool:
    """Whether a committed event waits for its position (a read: cheap, and it takes no lock)."""
    return conn.execute(_UNSEQUENCED.limit(1)).first() is not None


def sequence(conn: Connection, batch: int = SEQUENCE_BATCH) -> int:
    """Give commit-order positions to committed events that have none (see the module's docstring); how many.

    Commit right after, or soon after: the row lock is held until then, and other sequencers skip meanwhile (the
    dispatcher folds it into its turn's transaction, see dispatcher.SinkLoop). When another sequencer holds the
    turn this returns 0 at once (PostgreSQL's SKIP LOCKED): that one is numbering the same events."""
    if not unsequenced(conn):
        return 0
    turn = sa.select(forward_sequence.c.last).where(forward_sequence.c.name == SEQUENCE)
    if conn.dialect.name == "postgresql":
        turn = turn.with_for_update(skip_locked=True)
    last = conn.execute(turn).scalar_one_or_none()
    if last is None:
        return 0
    todo = (
        sa.select(forward_events.c.id, sa.func.row_number().over(order_by=forward_events.c.id).label("step"))
        .where(forward_events.c.position.is_(None))
        .order_by(forward_events.c.id)
        .limit(batch)
        .subquery()
    )
    numbered = conn.execute(
        sa.update(forward_events).where(forward_events.c.id == todo.c.id).values(position=last + todo.c.step)
    ).rowcount
    if numbered:
        conn.execute(
            sa.update(forward_sequence).where(forward_sequence.c.name == SEQUENCE).values(last=last + numbered)
        )
    return int(numbered)


@dataclass(frozen=True)
class FeedPage:
    bodies: list[str]  # each event's document as stored (JSON text)
    last_position: int  # the position of the last event, or the `after` given when there were none

    @property
    def next_cursor(self) -> str:
        return encode_cursor(self.last_position)

    def json(self) -> bytes:
        """The answer of GET /v1/events, composed from the stored documents without parsing them again."""
        events = ",".join(self.bodies)
        return f'{{"events":[{events}],"next_cursor":"{self.next_cursor}"}}'.encode()


def read(conn: Connection, after: int, limit: int) -> FeedPage:
    """Up to `limit` events after position `after`, in commit order."""
    rows = conn.execute(
        sa.select(forward_events.c.position, forward_events.c.body)
        .where(forward_events.c.position > after)
        .order_by(forward_events.c.position)
        .limit(limit)
    ).all()
    if not rows:
        return FeedPage([], after)
    return FeedPage([body for _, body in rows], rows[-1][0])
