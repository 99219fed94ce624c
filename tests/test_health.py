"""/healthz answers while the process runs; /readyz only while the database answers."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from service.config import Settings
from service.web.app import create_app


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
