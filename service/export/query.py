"""The export's read: every matching record, oldest start first, in batches of columns, with constant memory.

Order: `start_time_unix_secs` ascending, ties by `conversation_id` ascending; records with no start time (a broker
session whose call never reported back, a failure that carried none) follow every dated one, by `conversation_id`.
With `since` or `until` they are not exported at all: a window of start times cannot contain a record that has
none. Like the read API (api/reads.py) the dated and the undated records are two range scans of the (start, id)
index, so no dialect's NULL-ordering rule decides where they go.

How the rows are read differs by dialect, for the same reason in both: the export may take minutes and must not
hold up the webhook receiver.
- PostgreSQL: one `COPY (SELECT …) TO STDOUT (FORMAT BINARY)` per scan, read `batch_rows` rows at a time, inside
  one read-only REPEATABLE READ transaction so both scans see one snapshot. Readers never block writers there.
  COPY rather than a server-side cursor: the server streams the rows while we convert them, where a cursor waits
  for a round trip per batch; on the shared 2 cores that was 54-57 s against 32-40 s for 1,000,000 rows (CSV),
  for 2.5 s more CPU (the driver parses COPY's rows more slowly). Its values are the driver's binary loaders', the
  same Python values as a cursor's, and psycopg binds the parameters into the statement, quoted.
- SQLite: every transaction of this engine takes the write lock (`BEGIN IMMEDIATE`, storage/db.py), so one long
  read would hold off every webhook for the whole export. Instead each batch is its own short transaction that
  continues after the last key read (keyset). A record whose start time changes between two batches can move
  across the walk: it may then be exported twice or not at all by that run.

Speed: SQLAlchemy writes the SQL, and its column types read the values, but the rows come from the driver's own
cursor, and each column's type conversion runs once per column over the whole batch (`Columns`). Building a
SQLAlchemy Row per record and converting it value by value took more CPU than the driver's fetch and the format's
writer together (tests/bench/export.py: 1.3 s per 100,000 rows, where the driver's fetch alone takes 0.3 s).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect, Engine

from service.api.reads import conversations
from service.storage.db import transaction, unavailable_as_store_error

BATCH_ROWS = 1000

# One list per selected column, all of one length: what `batches` yields and the format writers take.
Columns = list[Sequence[Any]]
_Reader = Callable[[Any], Any] | None


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
    engine: Engine, selection: Selection, names: Sequence[str], *, batch_rows: int = BATCH_ROWS
) -> Iterator[Columns]:
    """The matching records' `names` columns, in export order, at most `batch_rows` records at a time.

    Each value is what the column's SQLAlchemy type reads (a timezone-aware UTC datetime, a parsed JSON value, a
    bool, an int or float for `call_duration_secs`), whatever the dialect.
    """
    columns = [conversations.c[name] for name in names]
    readers = [column.type.dialect_impl(engine.dialect).result_processor(engine.dialect, None) for column in columns]
    if engine.dialect.name == "postgresql":
        rows = _streamed(engine, selection, columns, batch_rows)
    else:
        rows = _keyset(engine, selection, columns, batch_rows)
    for batch in rows:
        yield _read_columns(batch, readers)


def _read_columns(rows: Sequence[Sequence[Any]], readers: Sequence[_Reader]) -> Columns:
    """The driver's rows as columns, each converted by its type's reader (if it has one) in one pass."""
    # strict=False: SQLite's rows end with the keyset's own key columns, which have no reader and are left out.
    return [
        column if reader is None else list(map(reader, column))
        for column, reader in zip(zip(*rows, strict=True), readers, strict=False)
    ]


def _streamed(
    engine: Engine, selection: Selection, columns: list[sa.Column[Any]], batch_rows: int
) -> Iterator[Sequence[Sequence[Any]]]:
    start, conversation_id = conversations.c.start_time_unix_secs, conversations.c.conversation_id
    scans = [_dated(selection).order_by(start, conversation_id)]
    if selection.undated_included:
        scans.append(_undated(selection).order_by(conversation_id))
    with unavailable_as_store_error(), engine.connect() as conn:
        conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with conn.begin():
            _without_statement_timeout(conn)
            driver = conn.connection.dbapi_connection
            assert driver is not None  # a connection checked out of the pool has one
            for scan in scans:
                sql, parameters = _driver_sql(scan.with_only_columns(*columns), engine.dialect)
                with _wrapped_errors(engine.dialect, sql), closing(driver.cursor()) as cursor:
                    # COPY's binary rows carry no types: the columns' come from the same query, planned, not run.
                    cursor.execute(f"{sql} LIMIT 0", parameters)
                    types = [column[1] for column in cursor.description or ()]  # DB-API: (name, type_code, …)
                    copying = f"COPY ({sql}) TO STDOUT (FORMAT BINARY)"
                    with cursor.copy(copying, parameters) as copy:
                        copy.set_types(types)
                        rows = copy.rows()
                        while batch := list(islice(rows, batch_rows)):
                            yield batch


def _keyset(
    engine: Engine, selection: Selection, columns: list[sa.Column[Any]], batch_rows: int
) -> Iterator[Sequence[Sequence[Any]]]:
    start, conversation_id = conversations.c.start_time_unix_secs, conversations.c.conversation_id
    # The key columns are read along, last, whatever the record's columns are (zip leaves them out of `columns`).
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
            *_, last_start, last_id = batch[-1]
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
            last_id = batch[-1][-1]
        if len(batch) < batch_rows:
            return


def _read(engine: Engine, query: sa.Select[Any]) -> list[Sequence[Any]]:
    sql, parameters = _driver_sql(query, engine.dialect)

    def work(conn: Connection) -> list[Sequence[Any]]:
        driver = conn.connection.dbapi_connection
        assert driver is not None  # a connection checked out of the pool has one
        with _wrapped_errors(engine.dialect, sql), closing(driver.cursor()) as cursor:
            cursor.execute(sql, parameters)
            return list(cursor.fetchall())

    return transaction(engine, work)


def _driver_sql(query: sa.Select[Any], dialect: Dialect) -> tuple[str, Any]:
    """The statement in the driver's own SQL and parameters. Its parameters are start times (integers), agent ids
    and conversation ids (text): none has a type that converts it on the way in, so they go to the driver as they
    are."""
    compiled = query.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
    parameters = compiled.construct_params()
    if compiled.positional:
        return compiled.string, tuple(parameters[name] for name in compiled.positiontup or ())
    return compiled.string, parameters


@contextmanager
def _wrapped_errors(dialect: Dialect, sql: str) -> Iterator[None]:
    """The driver's errors as SQLAlchemy wraps them, so `unavailable_as_store_error` tells an outage (exit 1,
    "database unavailable") from a bug, as it does for every other read."""
    try:
        yield
    except dialect.loaded_dbapi.Error as exc:
        raise sa.exc.DBAPIError.instance(sql, None, exc, dialect.loaded_dbapi.Error, dialect=dialect) from exc


def _dated(selection: Selection) -> sa.Select[Any]:
    where = [*selection.conditions(), conversations.c.start_time_unix_secs.is_not(None)]
    return sa.select(conversations.c.conversation_id).where(*where)


def _undated(selection: Selection) -> sa.Select[Any]:
    where = [*selection.conditions(), conversations.c.start_time_unix_secs.is_(None)]
    return sa.select(conversations.c.conversation_id).where(*where)
