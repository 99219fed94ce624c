"""/healthz answers while the process runs; /readyz only while the database answers and the disks take writes."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from service.config import Settings
from service.storage.db import create_engine, transaction
from service.web.app import create_app
from service.web.health import MIN_FREE_BYTES
from tests.reliability.test_disk_full import fill, make_read_only, mount_tmpfs
from tests.support.databases import migrated_sqlite


def test_healthz_and_readyz_with_a_database(settings: Settings, engine: Engine) -> None:
    with TestClient(create_app(settings, engine=engine)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


def test_readyz_is_503_when_the_database_is_unreachable(tmp_path: Path) -> None:
    settings = Settings(
        database_url="postgresql+psycopg://postgres@127.0.0.1:9/nowhere",  # the discard port: refused at once
        data_dir=tmp_path / "data",
        _env_file=None,  # type: ignore[call-arg]
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"error": "storage unavailable, try again later"}


# --- a disk that cannot take a write (issue 18, item 14) ----------------------------------------------------------


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs the test can fill or make read-only (mounting needs root; skipped otherwise)."""
    path = tmp_path / "disk"
    path.mkdir()
    mount_tmpfs(path, "size=32m")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _slack_in_the_wal(engine: Engine) -> None:
    """Leave SQLite's WAL large and checkpointed, as a busy database's is: the next small commits reuse its room
    without growing any file, which is how a one-page commit probe passed on a full disk. (The engine's pool keeps
    a connection open, so the WAL file stays.)"""
    body = os.urandom(6 * 1024 * 1024)
    transaction(engine, lambda conn: conn.execute(sa.text("CREATE TABLE ballast (b BLOB)")))
    transaction(engine, lambda conn: conn.execute(sa.text("INSERT INTO ballast VALUES (:b)"), {"b": body}))
    transaction(engine, lambda conn: conn.execute(sa.text("DROP TABLE ballast")))
    with contextlib.closing(sqlite3.connect(str(engine.url.database))) as conn:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")


def test_readyz_is_503_while_the_disk_under_sqlite_and_the_data_dir_is_full(disk: Path) -> None:
    engine = create_engine(migrated_sqlite(str(disk / "postcall.db")))
    _slack_in_the_wal(engine)
    settings = Settings(database_url=str(engine.url), data_dir=disk / "data", _env_file=None)  # type: ignore[call-arg]
    try:
        with TestClient(create_app(settings, engine=engine)) as client:
            assert client.get("/readyz").status_code == 200
            make_room = fill(disk)
            assert client.get("/readyz").status_code == 503
            make_room()
            assert client.get("/readyz").status_code == 200
    finally:
        engine.dispose()


@pytest.mark.parametrize("fault", ["below-the-floor", "read-only"])
def test_readyz_is_503_while_the_data_dir_cannot_take_audio(disk: Path, postgres_url: str, fault: str) -> None:
    settings = Settings(database_url=postgres_url, data_dir=disk / "data", _env_file=None)  # type: ignore[call-arg]
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        undo = fill(disk, leave=MIN_FREE_BYTES // 2) if fault == "below-the-floor" else make_read_only(disk)
        ready = client.get("/readyz")
        undo()
        assert ready.status_code == 503
        assert ready.json() == {"error": "storage unavailable, try again later"}
        assert client.get("/readyz").status_code == 200
