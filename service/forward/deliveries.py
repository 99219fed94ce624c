"""The deliveries' SQL: fan-out from the feed, claims, outcomes, replay, status and retention.

Each function runs in the caller's transaction (`storage.db.transaction`); the dispatcher decides when.

- **Fan-out** (`fan_out`): the feed's events after a sink's cursor become that sink's pending deliveries, and the
  cursor moves past them, in one transaction that holds the sink's row lock (PostgreSQL `FOR UPDATE`; SQLite has
  one writer at a time anyway). So however many dispatchers run, each event gets one delivery per sink, and
  none is skipped: the feed's positions only grow in commit order (forward/feed.py).
- **Claims** (`claim`): a due delivery is taken by writing a lease on it (`claimed_until`, `claimed_by`) in a
  transaction that selected it `FOR UPDATE SKIP LOCKED`, so two dispatchers never take the same one, and no one
  takes it again while the lease runs — longer than a send may take (the sinks' deadlines), so one event is never
  in flight twice at once to one sink. A dispatcher that dies holding claims leaves them to expire.
- **Revision order**: only a conversation's earliest pending delivery (by feed position, which is revision order
  within a conversation) may be claimed. A failing conversation waits alone; a dead delivery is no longer pending,
  so it stops holding its conversation. To keep claims from scanning deliveries that wait behind their
  conversation's failing head, those take the head's next attempt time (when it fails, and when they are fanned
  out behind it) and are made due again when the head is delivered or dead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.forward import feed
from service.forward.sinks import Outgoing
from service.storage.db import insert_ignoring_conflict
from service.storage.tables import ForwardAttempt, ForwardDelivery, ForwardEvent, ForwardSink

events: sa.Table = ForwardEvent.__table__  # type: ignore[attr-defined]
sinks: sa.Table = ForwardSink.__table__  # type: ignore[attr-defined]
deliveries: sa.Table = ForwardDelivery.__table__  # type: ignore[attr-defined]
attempts: sa.Table = ForwardAttempt.__table__  # type: ignore[attr-defined]

PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"
FAILED = "failed"  # an attempt's outcome when the delivery stays pending

FAN_OUT_BATCH = 2000


def ensure_sinks(conn: Connection, names: Iterable[str]) -> None:
    """A row per sink; a new sink starts at the start of the feed, so it gets every event still kept."""
    for name in names:
        insert_ignoring_conflict(conn, sinks, {"sink": name, "cursor": 0}, "sink")


def fan_out(conn: Connection, sink: str, now: datetime, batch: int = FAN_OUT_BATCH) -> int:
    """Turn the feed's events after the sink's cursor into pending deliveries; how many."""
    turn = sa.select(sinks.c.cursor).where(sinks.c.sink == sink)
    if conn.dialect.name == "postgresql":
        turn = turn.with_for_update()
    cursor = conn.execute(turn).scalar_one()
    fresh = conn.execute(
        sa.select(events.c.id, events.c.conversation_id, events.c.revision, events.c.position, events.c.committed_at)
        .where(events.c.position > cursor)
        .order_by(events.c.position)
        .limit(batch)
    ).all()
    if not fresh:
        return 0
    held = _held_back(conn, sink, {row.conversation_id for row in fresh}, now)
    conn.execute(
        sa.insert(deliveries),
        [
            {
                "event": row.id,
                "sink": sink,
                "conversation_id": row.conversation_id,
                "revision": row.revision,
                "position": row.position,
                "committed_at": row.committed_at,
                "status": PENDING,
                "attempts": 0,
                "next_attempt_at": held.get(row.conversation_id, now),
            }
            for row in fresh
        ],
    )
    conn.execute(sa.update(sinks).where(sinks.c.sink == sink).values(cursor=fresh[-1].position))
    return len(fresh)


def _held_back(conn: Connection, sink: str, conversation_ids: set[str], now: datetime) -> dict[str, datetime]:
    """For conversations whose pending head waits for a retry: when it is due."""
    d = deliveries.c
    rows = conn.execute(
        sa.select(d.conversation_id, sa.func.max(d.next_attempt_at))
        .where(d.sink == sink, d.status == PENDING, d.conversation_id.in_(conversation_ids), d.next_attempt_at > now)
        .group_by(d.conversation_id)
    ).all()
    return {conversation_id: due for conversation_id, due in rows}


@dataclass(frozen=True)
class Claim:
    """A delivery taken for one attempt: what to send, and what its outcome is recorded against."""

    outgoing: Outgoing
    conversation_id: str
    position: int
    attempts: int  # before this one
    first_attempt_at: datetime | None


def claim(conn: Connection, sink: str, holder: str, now: datetime, lease: timedelta, limit: int) -> list[Claim]:
    """Take up to `limit` due deliveries of `sink`, each its conversation's earliest pending one."""
    d = deliveries.c
    other = deliveries.alias("earlier")
    # A correlated min() rather than NOT EXISTS: PostgreSQL then always looks it up per candidate in the
    # (sink, conversation_id, status, position) index. With NOT EXISTS, a planner whose statistics say the table
    # is nearly empty (a burst after quiet, a table just pruned) chose a nested loop that scanned every pending
    # delivery per candidate: 200 ms a claim at 5,000 pending, the dispatcher's whole ceiling.
    head = (
        sa.select(sa.func.min(other.c.position))
        .where(other.c.sink == d.sink, other.c.conversation_id == d.conversation_id, other.c.status == PENDING)
        .scalar_subquery()
    )
    due = (
        sa.select(d.id)
        .where(
            d.sink == sink,
            d.status == PENDING,
            d.next_attempt_at <= now,
            sa.or_(d.claimed_until.is_(None), d.claimed_until <= now),
            d.position == head,
        )
        .order_by(d.next_attempt_at)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True, of=deliveries)
    ids = list(conn.execute(due).scalars())
    if not ids:
        return []
    conn.execute(sa.update(deliveries).where(d.id.in_(ids)).values(claimed_until=now + lease, claimed_by=holder))
    e = events.c
    rows = conn.execute(
        sa.select(
            d.id, d.conversation_id, d.position, d.attempts, d.first_attempt_at,
            e.event_id, e.type, e.agent_id, e.body, e.committed_at,
        )
        .join(events, e.id == d.event)
        .where(d.id.in_(ids))
        .order_by(d.position)
    ).all()  # fmt: skip
    return [
        Claim(
            outgoing=Outgoing(row.id, row.event_id, row.type, row.agent_id, row.body, row.committed_at),
            conversation_id=row.conversation_id,
            position=row.position,
            attempts=row.attempts,
            first_attempt_at=row.first_attempt_at,
        )
        for row in rows
    ]


@dataclass(frozen=True)
class Settled:
    """What one attempt did to its delivery (see dispatcher.settle)."""

    claim: Claim
    status: str  # PENDING (retry), DELIVERED or DEAD
    attempted_at: datetime
    first_attempt_at: datetime
    next_attempt_at: datetime | None  # the retry, when still PENDING
    status_code: int | None
    latency_seconds: float
    error: str | None


_AFTER_HEAD = sa.and_(
    deliveries.c.sink == sa.bindparam("b_sink"),
    deliveries.c.conversation_id == sa.bindparam("b_conversation"),
    deliveries.c.status == PENDING,
    deliveries.c.position > sa.bindparam("b_position"),
)
# The head failed: what waits behind it is due no sooner than its retry.
_HOLD = (
    sa.update(deliveries)
    .where(_AFTER_HEAD, deliveries.c.next_attempt_at < sa.bindparam("b_until"))
    .values(next_attempt_at=sa.bindparam("b_until"))
)
# The head is done with (delivered or dead): what waited behind it untried is due now.
_RELEASE = (
    sa.update(deliveries)
    .where(_AFTER_HEAD, deliveries.c.attempts == 0, deliveries.c.next_attempt_at > sa.bindparam("b_now"))
    .values(next_attempt_at=sa.bindparam("b_now"))
)


def record(conn: Connection, sink: str, holder: str, results: Sequence[Settled], now: datetime) -> None:
    """Write a batch of attempts' outcomes, their attempt rows and the sink's last news, in a few statements."""
    if not results:
        return
    _settle(conn, holder, results)
    # Only conversations with a later pending delivery need their followers held or released: most have none.
    last = _last_pending(conn, sink, {r.claim.conversation_id for r in results})
    followed = [r for r in results if last.get(r.claim.conversation_id, r.claim.position) > r.claim.position]
    held = [{**_head(sink, r), "b_until": r.next_attempt_at} for r in followed if r.status == PENDING]
    done = [{**_head(sink, r), "b_now": now} for r in followed if r.status != PENDING]
    if held:
        conn.execute(_HOLD, held)
    if done:
        conn.execute(_RELEASE, done)
    conn.execute(
        sa.insert(attempts),
        [
            {
                "delivery": r.claim.outgoing.delivery_id,
                "attempted_at": r.attempted_at,
                "outcome": FAILED if r.status == PENDING else r.status,
                "status_code": r.status_code,
                "latency_seconds": r.latency_seconds,
                "error": r.error,
                "next_attempt_at": r.next_attempt_at,
            }
            for r in results
        ],
    )
    news: dict[str, Any] = {}
    if any(r.status == DELIVERED for r in results):
        news["last_success_at"] = max(r.attempted_at for r in results if r.status == DELIVERED)
    failures = [r for r in results if r.status != DELIVERED]
    if failures:
        news.update(last_error=failures[-1].error, last_error_at=failures[-1].attempted_at)
    if news:
        conn.execute(sa.update(sinks).where(sinks.c.sink == sink).values(**news))


# SQLite's settle: a statement per delivery (executemany), cheap in-process; SQLite's VALUES takes no column names.
_SETTLE = (
    sa.update(deliveries)
    .where(deliveries.c.id == sa.bindparam("b_id"), deliveries.c.claimed_by == sa.bindparam("b_holder"))
    .values(
        status=sa.bindparam("b_status"),
        attempts=sa.bindparam("b_attempts"),
        first_attempt_at=sa.bindparam("b_first"),
        next_attempt_at=sa.bindparam("b_next"),
        delivered_at=sa.bindparam("b_delivered"),
        last_status_code=sa.bindparam("b_code"),
        last_error=sa.bindparam("b_error"),
        claimed_until=None,
        claimed_by=None,
    )
)


# PostgreSQL's settle: one statement, its values sent as one array per column (as storage/db.py inserts).
_SETTLE_COLUMNS = ("b_id", "b_status", "b_attempts", "b_first", "b_next", "b_delivered", "b_code", "b_error")
_SETTLE_PG = """
UPDATE forward_delivery AS d
SET status = o.b_status, attempts = o.b_attempts, first_attempt_at = o.b_first, next_attempt_at = o.b_next,
    delivered_at = o.b_delivered, last_status_code = o.b_code, last_error = o.b_error,
    claimed_until = NULL, claimed_by = NULL
FROM unnest(%(b_id)s::bigint[], %(b_status)s::text[], %(b_attempts)s::integer[], %(b_first)s::timestamptz[],
            %(b_next)s::timestamptz[], %(b_delivered)s::timestamptz[], %(b_code)s::integer[], %(b_error)s::text[])
     AS o(b_id, b_status, b_attempts, b_first, b_next, b_delivered, b_code, b_error)
WHERE d.id = o.b_id AND d.claimed_by = %(b_holder)s
"""


def _settle(conn: Connection, holder: str, results: Sequence[Settled]) -> None:
    """Each delivery's new state. Only a claim still ours: a replay (or a lease that ran out and another
    dispatcher) took the row meanwhile. On PostgreSQL one UPDATE … FROM unnest(arrays) rather than a statement per
    delivery: a turn settles hundreds. (A SQLAlchemy VALUES construct of as many rows was slower than either:
    compiling and binding thousands of parameters.)"""
    rows = [
        {
            "b_id": r.claim.outgoing.delivery_id,
            "b_holder": holder,
            "b_status": r.status,
            "b_attempts": r.claim.attempts + 1,
            "b_first": r.first_attempt_at,
            "b_next": r.next_attempt_at if r.next_attempt_at is not None else r.attempted_at,
            "b_delivered": r.attempted_at if r.status == DELIVERED else None,
            "b_code": r.status_code,
            "b_error": r.error,
        }
        for r in results
    ]
    if conn.dialect.name != "postgresql":
        conn.execute(_SETTLE, rows)
        return
    columns = {name: [row[name] for row in rows] for name in _SETTLE_COLUMNS}
    conn.exec_driver_sql(_SETTLE_PG, {**columns, "b_holder": holder})


def _last_pending(conn: Connection, sink: str, conversation_ids: set[str]) -> dict[str, int]:
    """The feed position of each conversation's last pending delivery to `sink` (none: nothing pending)."""
    d = deliveries.c
    rows = conn.execute(
        sa.select(d.conversation_id, sa.func.max(d.position))
        .where(d.sink == sink, d.status == PENDING, d.conversation_id.in_(conversation_ids))
        .group_by(d.conversation_id)
    ).all()
    return {conversation_id: position for conversation_id, position in rows}


def waiting(conn: Connection, sink: str, now: datetime, claiming: bool) -> bool:
    """Whether a dispatcher's turn for `sink` may find work: an event to number or to fan out, or (when it may
    claim) a due delivery nobody holds. Only reads, so a loop can ask it often without taking SQLite's write
    lock; it may say yes when a claim then finds nothing (a due delivery waiting behind its conversation's head)."""
    if feed.unsequenced(conn):
        return True
    cursor = sa.select(sinks.c.cursor).where(sinks.c.sink == sink).scalar_subquery()
    if conn.execute(sa.select(events.c.id).where(events.c.position > cursor).limit(1)).first() is not None:
        return True
    if not claiming:
        return False
    d = deliveries.c
    due = sa.select(d.id).where(
        d.sink == sink,
        d.status == PENDING,
        d.next_attempt_at <= now,
        sa.or_(d.claimed_until.is_(None), d.claimed_until <= now),
    )
    return conn.execute(due.limit(1)).first() is not None


def _head(sink: str, result: Settled) -> dict[str, Any]:
    return {"b_sink": sink, "b_conversation": result.claim.conversation_id, "b_position": result.claim.position}


def unclaim(conn: Connection, holder: str, ids: Sequence[int]) -> None:
    """Give back claims that were never sent (they waited too long for a connection): due again, no attempt."""
    if ids:
        d = deliveries.c
        conn.execute(
            sa.update(deliveries)
            .where(d.id.in_(ids), d.claimed_by == holder)
            .values(claimed_until=None, claimed_by=None)
        )


def release(conn: Connection, holder: str) -> int:
    """Give back the claims of a dispatcher that stops with sends unfinished: they are due again at once."""
    return int(
        conn.execute(
            sa.update(deliveries)
            .where(deliveries.c.claimed_by == holder, deliveries.c.claimed_until.is_not(None))
            .values(claimed_until=None, claimed_by=None)
        ).rowcount
    )


def replay(conn: Connection, names: Sequence[str], since: datetime, now: datetime) -> int:
    """Make every delivery to `names` of events committed at or after `since` pending again, due now, as if new
    (its dead or delivered past forgotten, its attempt rows kept). One in flight keeps its lease, so it is not sent
    twice at once, but loses its claim, so the outcome of that send does not count for the replay: it goes again
    once the lease ends. Events not fanned out yet need nothing: they are on their way. How many deliveries."""
    d = deliveries.c
    return int(
        conn.execute(
            sa.update(deliveries)
            .where(d.sink.in_(names), d.committed_at >= since)
            .values(
                status=PENDING,
                attempts=0,
                first_attempt_at=None,
                next_attempt_at=now,
                delivered_at=None,
                claimed_by=None,
            )
        ).rowcount
    )


@dataclass(frozen=True)
class SinkStatus:
    sink: str
    pending: int  # waiting, for a first try or a retry, or not yet fanned out
    dead: int
    oldest_pending_at: datetime | None
    last_success_at: datetime | None
    last_error: str | None


def status(conn: Connection, names: Sequence[str]) -> list[SinkStatus]:
    """Each sink's backlog and last news; a sink no dispatcher has started yet is all backlog."""
    d = deliveries.c
    e = events.c
    known = {row.sink: row for row in conn.execute(sa.select(sinks).where(sinks.c.sink.in_(names)))}
    counts: dict[tuple[str, str], int] = {}
    oldest: dict[str, datetime] = {}
    for sink, state, count, first in conn.execute(
        sa.select(d.sink, d.status, sa.func.count(), sa.func.min(d.committed_at))
        .where(d.sink.in_(names), d.status.in_((PENDING, DEAD)))
        .group_by(d.sink, d.status)
    ):
        counts[(sink, state)] = count
        if state == PENDING and first is not None:
            oldest[sink] = first
    report = []
    for name in names:
        row = known.get(name)
        cursor = row.cursor if row is not None else 0
        waiting, first = conn.execute(
            sa.select(sa.func.count(), sa.func.min(e.committed_at)).where(
                sa.or_(e.position.is_(None), e.position > cursor)
            )
        ).one()
        candidates = [when for when in (oldest.get(name), first) if when is not None]
        report.append(
            SinkStatus(
                sink=name,
                pending=counts.get((name, PENDING), 0) + int(waiting),
                dead=counts.get((name, DEAD), 0),
                oldest_pending_at=min(candidates) if candidates else None,
                last_success_at=row.last_success_at if row is not None else None,
                last_error=row.last_error if row is not None else None,
            )
        )
    return report


def prune(conn: Connection, names: Sequence[str], before: datetime, batch: int) -> int:
    """Delete up to `batch` events committed before `before` that every sink in `names` has delivered (their
    deliveries and attempts go with them); never one that is pending or dead for any of them, nor one not yet
    fanned out to all of them. How many."""
    if not names:
        return 0
    floor = conn.execute(sa.select(sa.func.min(sinks.c.cursor)).where(sinks.c.sink.in_(names))).scalar()
    known = conn.execute(sa.select(sa.func.count()).select_from(sinks).where(sinks.c.sink.in_(names))).scalar_one()
    if floor is None or known < len(set(names)):
        return 0
    d = deliveries.c
    unfinished = sa.exists().where(d.event == events.c.id, d.sink.in_(names), d.status != DELIVERED)
    doomed = (
        sa.select(events.c.id)
        .where(events.c.committed_at < before, events.c.position <= floor, ~unfinished)
        .order_by(events.c.id)
        .limit(batch)
    )
    ids = list(conn.execute(doomed).scalars())
    if not ids:
        return 0
    return int(conn.execute(sa.delete(events).where(events.c.id.in_(ids))).rowcount)
