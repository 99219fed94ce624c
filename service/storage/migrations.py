"""Upgrade a database to the newest Alembic migration, from code (`postcall migrate`, `serve`, tests)."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
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
