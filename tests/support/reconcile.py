"""Running `postcall reconcile` for real (typer's CliRunner, in-process) against a fake platform."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel
from typer.testing import CliRunner

from service.cli import app
from service.config import Settings
from service.storage import tables  # noqa: F401 (registers the tables)


@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.stdout)
        return loaded


def cli_env(settings: Settings, base_url: str, api_key: str) -> dict[str, str]:
    return {
        "POSTCALL_DATABASE_URL": settings.database_url,
        "POSTCALL_DATA_DIR": str(settings.data_dir),
        "POSTCALL_ELEVENLABS_BASE_URL": base_url,
        "POSTCALL_ELEVENLABS_API_KEY": api_key,
        "POSTCALL_AGENT_IDS": "",
    }


def reconcile(settings: Settings, base_url: str, api_key: str, *args: str) -> Run:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        result = CliRunner().invoke(app, ["reconcile", *args], env=cli_env(settings, base_url, api_key))
    finally:
        # The command logs to the runner's stderr, which is closed afterwards: put pytest's handlers back.
        root.handlers[:] = handlers
        root.setLevel(level)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Run(result.exit_code, result.stdout, result.stderr)


def rows(engine: Engine, table: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        selected = sa.select(SQLModel.metadata.tables[table])
        return [dict(row) for row in conn.execute(selected).mappings()]


def checkpoint(engine: Engine, agent_id: str) -> int | None:
    with engine.connect() as conn:
        value = conn.execute(
            sa.text("SELECT checkpoint_unix FROM reconcile_checkpoint WHERE agent_id = :a"), {"a": agent_id}
        ).scalar()
    return int(value) if value is not None else None
