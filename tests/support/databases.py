"""Test databases: a fresh SQLite file per test, and one PostgreSQL database per test session (dropped after)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from service.storage import tables  # noqa: F401 (registers the tables)
from service.storage.db import create_engine
from service.storage.migrations import upgrade

PG_ADMIN_URL = os.environ.get("POSTCALL_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
# Every table but the sequencer's one-row counter (forward/feed.py), which is reset rather than emptied; and the
# search entries, which no model declares (service/search/index.py).
TABLES = (*sorted(name for name in SQLModel.metadata.tables if name != "forward_sequence"), "conversation_search")


@contextmanager
def postgres_database(migrated: bool = True) -> Iterator[str]:
    """Create a uniquely named database, migrate it (unless not `migrated`), yield its URL, drop it."""
    name = f"postcall_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        admin.dispose()
        raise RuntimeError(
            f"PostgreSQL is not reachable at {PG_ADMIN_URL}; the storage tests need it "
            "(start it, or set POSTCALL_TEST_PG_URL)"
        ) from exc
    url = sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url)
    try:
        if migrated:
            upgrade(engine)
        engine.dispose()
        yield url
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def empty_tables(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY")
        conn.exec_driver_sql("UPDATE forward_sequence SET last = 0")


def migrated_sqlite(path: str) -> str:
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    upgrade(engine)
    engine.dispose()
    return url
