"""The reconciler's ledger: the one list of a run's counts, and what the run record keeps (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from service.reconcile.command import describe
from service.reconcile.ledger import COUNTS, Counts, Report, finish_run, runs, start_run
from service.reconcile.windows import Window
from service.storage.db import transaction
from service.storage.tables import RUN_FIELDS

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def distinct_counts() -> Counts:
    """Each count a different number, so that a count written to the wrong place shows."""
    return Counts(**{name: 10 + i for i, name in enumerate(COUNTS)})


def test_every_count_is_an_integer_column_of_the_run_record_and_is_served() -> None:
    for name in COUNTS:
        assert isinstance(runs.c[name].type, sa.Integer), name
        assert not runs.c[name].nullable, name
    assert sorted(RUN_FIELDS) == sorted(runs.c.keys())  # every column served, each once


def test_a_finished_run_record_holds_every_count_and_how_the_run_ended(engine: Engine) -> None:
    report = Report(distinct_counts(), agents=["agent_a"], dry_run=False, errors=["conv_1: detail: HTTP 500"])
    run_id = transaction(engine, lambda conn: start_run(conn, "test holder", AT))
    transaction(engine, lambda conn: finish_run(conn, run_id, report, [Window(100, 200), Window(50, 150)], AT))

    with engine.connect() as conn:
        row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).mappings().one()
    assert {name: row[name] for name in COUNTS} == report.counts.as_dict()
    assert row["status"] == "failed"
    assert row["error"] == "conv_1: detail: HTTP 500"
    assert (row["window_start_unix"], row["window_end_unix"]) == (50, 200)
    assert row["agents"] == ["agent_a"]


def test_the_summary_and_the_json_object_name_every_count() -> None:
    report = Report(distinct_counts(), agents=["agent_a"], dry_run=False)
    summary = describe(report)
    for i, name in enumerate(COUNTS):
        assert f"{name.replace('_', ' ')} {10 + i}" in summary, name
        assert report.as_dict()[name] == 10 + i
    assert (
        "listed 10, new 11, updated 12, details fetched 13, audio fetched 14, audio failed 15, failed 16, given up 17"
        in summary
    )


def test_the_migrations_build_the_reconcile_tables_as_the_models_describe_them(engine: Engine) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = compare_metadata(context, SQLModel.metadata)
    assert [difference for difference in differences if "reconcile_" in repr(difference)] == []
