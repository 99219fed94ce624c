"""The export's read: every matching record, oldest start first, in batches, with constant memory.

Order: `start_time_unix_secs` ascending, ties by `conversation_id` ascending; records with no start time (a broker
session whose call never reported back, a failure that carried none) follow every dated one, by `conversation_id`.
With `since` or `until` they are not exported at all: a window of start times cannot contain a record that has
none. Like the read API (api/reads.py) the dated and the undated records are two range scans of the (start, id)
index, so no dialect's NULL-ordering rule decides where they go.

How the rows are read differs by dialect, for the same reason in both: the export may take minutes and must not
hold up the webhook receiver.
- PostgreSQL: one server-side cursor per scan (`stream_results`), fetched `batch_rows` at a time, inside one
  read-only REPEATABLE READ transaction so both scans see one snapshot. Readers never block writers there.
- SQLite: every transaction of this engine takes the write lock (`BEGIN IMMEDIATE`, storage/db.py), so one long
  read would hold off every webhook for the whole export. Instead each batch is its own short transaction that
  continues after the last key read (keyset). A record whose start time changes between two batches can move
  across the walk: it may then be exported twice or not at all by that run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from service.api.reads import conversations
from service.record.public import DETAIL_FIELDS, RECORD_FIELDS, public_record
from service.storage.db import transaction, unavailable_as_store_error

BATCH_ROWS = 1000
Record = dict[str, Any]


@dataclass(frozen=True)
class Selection:
    """Which records to export: start in `[since, until)` (unix seconds; None = open) and one of `agents`."""

    since: int | None = None
    until: int | None = None
    agents: tuple[str, ...] = ()

    @property
    def undated_included(self) -> bool:
        return self.since is None and self.until is None

    def conditions(self) -> list[sa.ColumnElement[bool]]:
        c = conversations.c
        where: list[sa.ColumnElement[bool]] = []
        if self.agents:
            where.append(c.agent_id.in_(self.agents))
        if self.since is not None:
            where.append(c.start_time_unix_secs >= self.since)
        if self.until is not None:
            where.append(c.start_time_unix_secs < self.until)
        return where


def count(engine: Engine, selection: Selection) -> int:
    """How many records `batches` will yield (for the progress bar)."""
    where = selection.conditions()
    if not selection.undated_included:
        where.append(conversations.c.start_time_unix_secs.is_not(None))
    query = sa.select(sa.func.count()).select_from(conversations).where(*where)
    with unavailable_as_store_error(), engine.connect() as conn, conn.begin():
        _without_statement_timeout(conn)
        return int(conn.execute(query).scalar_one())


def _without_statement_timeout(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        # The service's statement timeout bounds a request; counting millions of records, or sorting them when
        # several agents are named, may take longer, and the export is not a request.
        conn.exec_driver_sql("SET LOCAL statement_timeout = 0")


def batches(
    engine: Engine, selection: Selection, *, detail: bool, batch_rows: int = BATCH_ROWS
) -> Iterator[list[Record]]:
    """The matching records as the read API serves them, in export order, at most `batch_rows` at a time.

    `detail`: with transcript, analysis and metadata (GET /v1/conversations/{id}), else the list fields.
    """
    extra = DETAIL_FIELDS if detail else ()
    names = (*RECORD_FIELDS, *extra)
    columns = [conversations.c[name] for name in names]
    if engine.dialect.name == "postgresql":
        rows = _streamed(engine, selection, columns, batch_rows)
    else:
        rows = _keyset(engine, selection, columns, batch_rows)
    for batch in rows:
        # Plain tuples made into dicts: SQLAlchemy's RowMapping took more time than all the rest of an export.
        yield [public_record(dict(zip(names, row, strict=False)), extra=extra) for row in batch]


def _streamed(
    engine: Engine, selection: Selection, columns: list[sa.Column[Any]], batch_rows: int
) -> Iterator[Sequence[sa.Row[Any]]]:
    start, conversation_id = conversations.c.start_time_unix_secs, conversations.c.conversation_id
    scans = [_dated(selection).order_by(start, conversation_id)]
    if selection.undated_included:
        scans.append(_undated(selection).order_by(conversation_id))
    streamed = {"stream_results": True, "yield_per": batch_rows}
    with unavailable_as_store_error(), engine.connect() as conn:
        conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with conn.begin():
            _without_statement_timeout(conn)
            for scan in scans:
                yield from conn.execute(scan.with_only_columns(*columns), execution_options=streamed).partitions()


def _keyset(
    engine: Engine, selection: Selection, columns: list[sa.Column[Any]], batch_rows: int
) -> Iterator[Sequence[sa.Row[Any]]]:
    start, conversation_id = conversations.c.start_time_unix_secs, conversations.c.conversation_id
    # The key columns are read along, last, whatever the record's columns are (dict(zip) leaves them out).
    selected = [*columns, start.label("_start"), conversation_id.label("_id")]
    after: tuple[int, str] | None = None
    while True:
        query = _dated(selection).order_by(start, conversation_id).limit(batch_rows)
        if after is not None:
            # `start >= s` is the index range; the OR only decides among records that share the start time.
            query = query.where(start >= after[0], sa.or_(start > after[0], conversation_id > after[1]))
        batch = _read(engine, query.with_only_columns(*selected))
        if batch:
            yield batch
            *_, last_start, last_id = tuple(batch[-1])
            after = (last_start, last_id)
        if len(batch) < batch_rows:
            break
    if not selection.undated_included:
        return
    last_id = None
    while True:
        query = _undated(selection).order_by(conversation_id).limit(batch_rows)
        if last_id is not None:
            query = query.where(conversation_id > last_id)
        batch = _read(engine, query.with_only_columns(*selected))
        if batch:
            yield batch
            last_id = tuple(batch[-1])[-1]
        if len(batch) < batch_rows:
            return


def _read(engine: Engine, query: sa.Select[Any]) -> list[sa.Row[Any]]:
    def work(conn: Connection) -> list[sa.Row[Any]]:
        return list(conn.execute(query))

    return transaction(engine, work)


def _dated(selection: Selection) -> sa.Select[Any]:
    where = [*selection.conditions(), conversations.c.start_time_unix_secs.is_not(None)]
    return sa.select(conversations.c.conversation_id).where(*where)


def _undated(selection: Selection) -> sa.Select[Any]:
    where = [*selection.conditions(), conversations.c.start_time_unix_secs.is_(None)]
    return sa.select(conversations.c.conversation_id).where(*where)
