"""Upgrade a database to the newest Alembic migration, from code (`postcall migrate`, `serve`, tests)."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from alembic import command
from service.storage.db import unavailable_as_store_error

ALEMBIC_DIR = Path(__file__).resolve().parents[2] / "alembic"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply every migration up to `revision` in one connection."""
    config = alembic_config()
    with unavailable_as_store_error(), engine.connect() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
        conn.commit()


def unmigrated(engine: Engine) -> str | None:
    """Why the database is not at the newest migration, for a person; None when it is. StoreUnavailable when it
    cannot be reached."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with unavailable_as_store_error(), engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current == head:
        return None
    return "no migration has run" if current is None else f"it is at migration {current}, this postcall needs {head}"
