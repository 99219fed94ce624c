"""Engines and the dialect details: SQLite in WAL mode with immediate write transactions, PostgreSQL via psycopg."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 5000
PG_CONNECT_TIMEOUT_SECONDS = 3
PG_STATEMENT_TIMEOUT_MS = 10_000


class StoreUnavailable(Exception):
    """The database (or the disk under it) cannot take the write now; the caller answers 503."""


class StoreRefused(Exception):
    """The database refused what this one write holds — a value too wide for an index entry, out of range, not
    valid text — so trying again cannot help: the caller answers 400. Unlike StoreUnavailable it is the
    request's failure only: the group-commit writer then commits the rest of the batch without it."""


def is_sqlite(url: str | sa.URL) -> bool:
    return sa.make_url(url).get_backend_name() == "sqlite"


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def create_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with the settings postcall relies on for durability and bounded waits."""
    # Transcripts are the bulk of every row: orjson writes them several times faster than the stdlib.
    kwargs.setdefault("json_serializer", _json_dumps)
    kwargs.setdefault("json_deserializer", orjson.loads)
    if is_sqlite(url):
        return _sqlite_engine(url, **kwargs)
    connect_args = {
        "connect_timeout": PG_CONNECT_TIMEOUT_SECONDS,
        "options": f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS} -c lock_timeout={PG_STATEMENT_TIMEOUT_MS}",
        # statement_timeout is the server's: when the network drops packets (no reset) only the client's TCP
        # timeouts notice, and without them a write would wait for minutes with every webhook queued behind it.
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": PG_STATEMENT_TIMEOUT_MS + 5000,
    }
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    kwargs.setdefault("pool_timeout", 5)
    return sa.create_engine(url, connect_args=connect_args, **kwargs)


def _sqlite_engine(url: str, **kwargs: Any) -> Engine:
    parsed = sa.make_url(url)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # Take transactions into our own hands (pysqlite's implicit BEGIN is deferred and racy for writers).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # a 200 means the commit survives power loss, not just a crash
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock up front, so two writers queue instead of deadlocking on upgrade.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE")

    return engine


@contextmanager
def unavailable_as_store_error() -> Iterator[None]:
    """Turn 'the database or disk cannot be reached' into StoreUnavailable; let real bugs through."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        reason = type(exc.orig or exc).__name__
        if _refuses_the_data(exc):
            raise StoreRefused(reason) from exc
        if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
            raise StoreUnavailable(reason) from exc
        raise
    except sa.exc.TimeoutError as exc:
        raise StoreUnavailable(str(exc)) from exc
    except OSError as exc:
        raise StoreUnavailable(f"{type(exc).__name__}: {exc.strerror}") from exc


# SQLSTATE classes that blame the statement's values, not the server: 22 data exception, 54 program limit
# exceeded. psycopg raises class 54 (an index entry over 2,704 bytes) as an OperationalError, the class that
# otherwise means the server is unreachable, so the code is what tells them apart.
_REFUSAL_CLASSES = ("22", "54")


def _refuses_the_data(exc: sa.exc.DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate[:2] in _REFUSAL_CLASSES
    return isinstance(exc, sa.exc.DataError)


# What `transaction()` runs once it has committed: how a file put in place inside a transaction learns that the
# record claiming it is durable too (see blobs.TempBlob.commit).
_after_commit: ContextVar[list[Callable[[], None]] | None] = ContextVar("postcall_after_commit", default=None)


def after_commit(callback: Callable[[], None]) -> None:
    """Run `callback` once the enclosing `transaction()` has committed, never if it fails; outside one, now."""
    pending = _after_commit.get()
    if pending is None:
        callback()
    else:
        pending.append(callback)


# The connection of the enclosing `transaction()`: how audio put in place inside it takes a lock that lasts until
# it ends (a bucket's path locks, storage/s3.py), without every caller on the way passing the connection down.
_connection: ContextVar[Connection | None] = ContextVar("postcall_connection", default=None)


def current_connection() -> Connection | None:
    """The connection of the enclosing `transaction()`; None outside one."""
    return _connection.get()


def transaction(engine: Engine, work: Callable[[Connection], T]) -> T:
    """Run `work` in one transaction (committed on return, rolled back on error), mapping outages."""
    pending: list[Callable[[], None]] = []
    token = _after_commit.set(pending)
    try:
        with unavailable_as_store_error(), engine.begin() as conn:
            connection_token = _connection.set(conn)
            try:
                result = work(conn)
            finally:
                _connection.reset(connection_token)
    finally:
        _after_commit.reset(token)
    for callback in pending:
        callback()
    return result


_READ_ONLY = "postcall_read_only"


def read_only(engine: Engine, work: Callable[[Connection], T]) -> T:
    """Run `work`, which only reads, in a transaction that takes no write lock on SQLite (a deferred BEGIN): a
    frequent probe then neither waits for the writers nor holds them up. `work` must not write."""
    with unavailable_as_store_error(), engine.connect() as conn:
        conn.execution_options(**{_READ_ONLY: True})
        with conn.begin():
            return work(conn)


def database_dir(engine: Engine) -> Path | None:
    """The directory of an SQLite database file, where it and its WAL grow; None for PostgreSQL or in memory."""
    if not is_sqlite(engine.url) or engine.url.database in (None, "", ":memory:"):
        return None
    return Path(engine.url.database).expanduser().resolve().parent


async def run_transaction(engine: Engine, work: Callable[[Connection], T]) -> T:
    """`transaction` on a worker thread, for async callers: the drivers are synchronous."""
    return await anyio.to_thread.run_sync(transaction, engine, work)


def ping(engine: Engine) -> None:
    """Raise StoreUnavailable unless the database can take a write now (what /readyz reports)."""
    if is_sqlite(engine.url):
        # `SELECT 1` never touches an SQLite file: a database on a failing or read-only disk, or locked by another
        # process, would look ready while every webhook got 503. Rewriting the header's user_version as it is
        # makes the probe a real commit, one page in the WAL.
        transaction(engine, _rewrite_user_version)
        return
    with unavailable_as_store_error(), engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")


def _rewrite_user_version(conn: Connection) -> None:
    version = int(conn.exec_driver_sql("PRAGMA user_version").scalar_one())
    conn.exec_driver_sql(f"PRAGMA user_version = {version}")


def insert_ignoring_conflict(conn: Connection, table: sa.Table, values: dict[str, Any], key: str) -> bool:
    """INSERT … ON CONFLICT (key) DO NOTHING on either dialect; True when the row was inserted."""
    return bool(insert_many_ignoring_conflict(conn, table, [values], key))


def insert_many_ignoring_conflict(
    conn: Connection, table: sa.Table, rows: Sequence[dict[str, Any]], key: str
) -> set[Any]:
    """Insert rows, skipping those whose `key` exists (or came earlier in `rows`); returns the keys inserted.

    PostgreSQL: one INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING RETURNING for the batch, its columns sent
    as binary arrays; RETURNING rather than rowcount, which psycopg does not report for ON CONFLICT DO NOTHING.
    SQLite: every transaction holds the write lock from its start (BEGIN IMMEDIATE), so what is not there when we
    look cannot appear before we commit: one SELECT of the keys, then the driver's executemany. That skips
    building and binding one statement of rows x columns parameters, which showed as the largest share of the
    webhook writer's time.
    """
    if not rows:
        return set()
    if conn.dialect.name == "sqlite":
        return _sqlite_insert_new(conn, table, rows, key)
    sql, names, processors = _unnest_insert(conn.dialect, table, tuple(rows[0]), key)
    columns = {
        name: [row[name] if process is None else process(row[name]) for row in rows]
        for name, process in zip(names, processors, strict=True)
    }
    return set(conn.exec_driver_sql(sql, columns).scalars())


def _sqlite_insert_new(conn: Connection, table: sa.Table, rows: Sequence[dict[str, Any]], key: str) -> set[Any]:
    keys = [row[key] for row in rows]
    present = set(conn.execute(_keys_present(table, key), {"keys": keys}).scalars())
    fresh: dict[Any, dict[str, Any]] = {}
    for row in rows:
        if row[key] not in present:
            fresh.setdefault(row[key], row)
    if fresh:
        sql, names, processors = _plain_insert(conn.dialect, table, tuple(rows[0]))
        values = [
            tuple(
                value if process is None else process(value)
                for value, process in zip((row[name] for name in names), processors, strict=True)
            )
            for row in fresh.values()
        ]
        conn.exec_driver_sql(sql, values)
    return set(fresh)


@functools.cache
def _unnest_insert(
    dialect: sa.Dialect, table: sa.Table, names: tuple[str, ...], key: str
) -> tuple[str, tuple[str, ...], list[Any]]:
    """`INSERT … SELECT FROM unnest(<one array per column>) ON CONFLICT DO NOTHING RETURNING key` for PostgreSQL.

    The text is the same whatever the batch size, so psycopg parses it once and the server prepares it, where a
    VALUES list of one row per delivery is new text for every batch size: parsing that text took a quarter of the
    webhook writer's time. The arrays go in binary (`%b`): in text, psycopg escapes every quote of every
    transcript with a regex, which cost more than everything else.
    """
    quote = dialect.identifier_preparer.quote
    arrays = ", ".join(f"%({name})b::{_array_element(table.c[name].type, dialect)}[]" for name in names)
    # Every identifier comes from the model, quoted; every value is a bound parameter.
    sql = (
        f"INSERT INTO {quote(table.name)} ({', '.join(map(quote, names))}) SELECT * FROM unnest({arrays}) "  # noqa: S608
        f"ON CONFLICT ({quote(key)}) DO NOTHING RETURNING {quote(key)}"
    )
    processors = [_array_processor(table.c[name].type, dialect) for name in names]
    return sql, names, processors


def _array_processor(column_type: sa.types.TypeEngine[Any], dialect: sa.Dialect) -> Any:
    process = column_type.dialect_impl(dialect).bind_processor(dialect)
    if process is None and isinstance(_underlying(column_type), sa.Float):
        # psycopg refuses an array that mixes int and float: a duration of 3 and one of 2.5 must both be floats.
        return lambda value: None if value is None else float(value)
    return process


def _array_element(column_type: sa.types.TypeEngine[Any], dialect: sa.Dialect) -> str:
    # Unbounded text: a cast to VARCHAR(n) would cut a long value short, where the insert itself refuses it.
    return "TEXT" if isinstance(_underlying(column_type), sa.String) else column_type.compile(dialect=dialect)


def _underlying(column_type: sa.types.TypeEngine[Any]) -> sa.types.TypeEngine[Any]:
    """The type a TypeDecorator (such as SQLModel's AutoString) stores as."""
    return column_type.impl_instance if isinstance(column_type, sa.TypeDecorator) else column_type


@functools.cache
def _keys_present(table: sa.Table, key: str) -> sa.Select[Any]:
    """`SELECT key FROM table WHERE key IN :keys`, built once: building a statement costs more than running it."""
    column = table.c[key]
    return sa.select(column).where(column.in_(sa.bindparam("keys", expanding=True)))


@functools.cache
def _plain_insert(
    dialect: sa.Dialect, table: sa.Table, names: tuple[str, ...]
) -> tuple[str, tuple[str, ...], list[Any]]:
    """`INSERT INTO table (names…) VALUES (?, …)` for the driver, with each column's own bind processing."""
    compiled = sa.insert(table).compile(dialect=dialect, column_keys=list(names))
    order = tuple(compiled.positiontup or names)
    processors = [table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in order]
    return str(compiled), order, processors
