"""Fixtures shared by the whole suite.

Storage tests take the `database_url` fixture, which runs each of them on SQLite and on PostgreSQL. PostgreSQL
is required: a run that cannot reach it errors instead of skipping (POSTCALL_TEST_PG_URL points elsewhere).
Every test that needs it carries the `postgres` marker, so `pytest -m "not postgres"` runs the rest without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import stamina
from sqlalchemy.engine import Engine

from service.config import Settings
from service.storage.db import create_engine
from tests.support.databases import empty_tables, migrated_sqlite, postgres_database
from tests.support.s3 import s3_server, set_aws_environment
from tests.support.webhooks import SECRET


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("database_url") == "postgresql"
        if on_postgres or "postgres_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield migrated_sqlite(str(tmp_path / "postcall.db"))
        return
    url: str = request.getfixturevalue("postgres_url")
    yield url
    engine = create_engine(url)
    empty_tables(engine)
    engine.dispose()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        webhook_secrets=SECRET,
        data_dir=tmp_path / "data",
        api_tokens="test-token",
        elevenlabs_api_key="test-api-key",
        _env_file=None,  # type: ignore[call-arg]
    )


@pytest.fixture
def tiny_retry_waits() -> Iterator[None]:
    """stamina's testing mode for the test: the ElevenLabs client makes every attempt its policy allows (capped at
    10), without backoff between them. A Retry-After is still waited out: the client's gate honours it."""
    with stamina.set_testing(True, attempts=10, cap=True):
        yield


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """One S3-compatible server (moto's) for the session's `s3` tests; each test makes a bucket of its own."""
    set_aws_environment()
    with s3_server() as endpoint:
        yield endpoint
