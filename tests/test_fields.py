"""The record's one field list (record/fields.py), its columns (storage/tables.py) and the migrations agree.

The columns are written out in tables.py rather than built from the list, so these tests are what keeps a field, its
column and the migration that adds it from drifting apart.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from service.api import query_params
from service.api.openapi import LIST_PARAMETERS
from service.record import merge
from service.record.fields import BY_NAME, FIELDS, FILTERS, Kind, RecordField, Rule
from service.record.merge import CHANNEL
from service.search import index as search_index
from service.storage.tables import Conversation, JSONNumber, UTCDateTime

conversations: sa.Table = Conversation.__table__  # type: ignore[attr-defined]

# Columns of the table that are not part of the record a user reads: audio bookkeeping, merge state, write time.
BOOKKEEPING = {"audio_path", "audio_bytes", "first_seen_at", "data_rank", "updated_at"}

FIXED_SQL_TYPES = {  # kind → the column type on (PostgreSQL, SQLite)
    Kind.INTEGER: ("BIGINT", "BIGINT"),
    Kind.NUMBER: ("VARCHAR(32)", "VARCHAR(32)"),  # JSON text: 22 and 22.0 stay apart on both (JSONNumber)
    Kind.BOOLEAN: ("BOOLEAN", "BOOLEAN"),
    Kind.OBJECT: ("JSONB", "JSON"),
    Kind.LIST: ("JSONB", "JSON"),
    Kind.TIMESTAMP: ("TIMESTAMP WITH TIME ZONE", "DATETIME"),
}


def expected_sql_types(field: RecordField) -> tuple[str, str]:
    if field.kind is Kind.TEXT:
        sql = "TEXT" if field.max_length is None else f"VARCHAR({field.max_length})"
        return sql, sql
    return FIXED_SQL_TYPES[field.kind]


def sql_types(column: sa.Column[object]) -> tuple[str, str]:
    return column.type.compile(dialect=postgresql.dialect()), column.type.compile(dialect=sqlite.dialect())


@pytest.mark.parametrize("field", FIELDS, ids=lambda field: field.name)
def test_every_field_has_a_column_of_its_kind_bound_and_nullability(field: RecordField) -> None:
    assert field.name in conversations.c, f"{field.name} has no column in storage/tables.py (and no migration?)"
    column = conversations.c[field.name]
    assert sql_types(column) == expected_sql_types(field)
    assert column.nullable == field.nullable
    if field.kind is Kind.TIMESTAMP:
        assert isinstance(column.type, UTCDateTime)  # read back timezone-aware on SQLite too
    if field.kind is Kind.NUMBER:
        assert isinstance(column.type, JSONNumber)  # an integer read back as an integer, a float as a float


def test_every_column_is_a_field_or_bookkeeping() -> None:
    assert set(conversations.c.keys()) - {field.name for field in FIELDS} == BOOKKEEPING


def test_the_declaration_is_consistent() -> None:
    names = [field.name for field in FIELDS]
    assert len(names) == len(set(names))
    for field in FIELDS:
        assert field.description
        assert field.kind is Kind.TEXT or field.max_length is None, f"{field.name}: only text has a bound"


def test_first_seen_via_takes_the_channels_merge_writes_and_the_source_filter_accepts() -> None:
    assert set(BY_NAME["first_seen_via"].choices) == set(CHANNEL.values()) == set(query_params.SOURCES)


def test_the_migrations_build_exactly_the_declared_tables(engine: Engine) -> None:
    """What tables.py declares (and so what the field list is pinned to) is what `postcall migrate` builds."""
    with engine.connect() as conn:
        # The search index's tables are migration 0008's alone (an FTS5 table cannot be declared): search/index.py.
        outside = {"include_name": lambda name, kind, _: kind != "table" or not search_index.owns_table(name)}
        context = MigrationContext.configure(conn, opts={"compare_type": True, **outside})
        assert compare_metadata(context, SQLModel.metadata) == []


def test_every_rule_has_its_merge_function_and_only_sources_set_ranked_fields() -> None:
    assert set(merge._RULES) == set(Rule)
    assert set(merge.CONTENT_FIELDS) == {field.name for field in FIELDS if field.rule is Rule.RANKED}


def test_only_provenance_times_and_the_revision_itself_change_without_a_new_revision() -> None:
    unrevised = {field.name for field in FIELDS if not field.revises}
    assert unrevised == {"webhook_received_at", "audio_received_at", "reconciled_at", "revision"}


def test_the_list_filters_are_the_fields_marked_filter_in_the_parser_and_the_document() -> None:
    assert all(field.kind in (Kind.TEXT, Kind.BOOLEAN) and not field.detail_only for field in FILTERS)
    assert set(query_params.EXACT_PARAMETERS) == {field.name for field in FILTERS}
    documented = {parameter["name"] for parameter in LIST_PARAMETERS}
    assert {field.name for field in FILTERS} <= documented
    assert set(query_params.DOCUMENTED_PARAMETERS) == documented
