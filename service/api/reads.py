"""The read side's SQL: filtered keyset pages of conversations, one record, recent reconcile runs.

Order: newest `start_time_unix_secs` first, ties by `conversation_id` descending. Records without a start time (a
session just created, a failure webhook) sort as the oldest: they follow every dated record, by
`conversation_id` descending. A page is read in up to two index range scans — the dated records after the cursor,
then, when that runs short, the undated ones — so each uses a plain (column, start, id) index on either dialect
and no NULL-ordering rule of one database leaks into the order.

Keyset pagination: the cursor is the sort key of the last record returned, and the next page is "strictly after
it" in the order above. New conversations arriving between pages therefore never shift a page: those sorting
before the cursor are simply not seen by that walk, and nothing is returned twice or skipped. (A record whose
start time changes while a client pages — an undated session record that later learns its start — may move
across the cursor; that is inherent to any keyset and harmless for "find my conversation" lookups.)

A search (`q`) is one more condition, "the conversation's id is among those whose search entry holds every word"
(search/index.py), so it keeps this order and these pages; whether a page walks the start index or reads every
match from the search index depends on how many conversations hold the words (search/index.py `matching`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection

from service.api.query_params import ConversationFilter, Cursor, JsonMatch
from service.record.public import DETAIL_FIELDS, RECORD_FIELDS, plain, public_record
from service.search import index as search_index
from service.search.document import SOURCE_FIELDS as SEARCHED_FIELDS
from service.search.document import snippet
from service.storage.tables import RUN_FIELDS, Conversation, ReconcileRun

conversations: sa.Table = Conversation.__table__  # type: ignore[attr-defined]
reconcile_runs: sa.Table = ReconcileRun.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Page:
    records: list[dict[str, Any]]
    next_cursor: Cursor | None

    @property
    def has_more(self) -> bool:
        return self.next_cursor is not None


def list_conversations(conn: Connection, wanted: ConversationFilter) -> Page:
    """One page of records matching `wanted`, after `wanted.after`, in the documented order. With a search
    (`q`), each record also carries its `snippet`, made from the searched fields read with it."""
    search = wanted.search
    if search is not None and not search.can_match:
        return Page([], None)
    searched = SEARCHED_FIELDS if search is not None else ()
    columns = [conversations.c[name] for name in dict.fromkeys((*RECORD_FIELDS, *searched))]
    where = _conditions(conn, wanted)
    start, conversation_id = conversations.c.start_time_unix_secs, conversations.c.conversation_id
    after = wanted.after
    want = wanted.limit + 1  # one more than the page tells whether another page follows
    rows: list[sa.RowMapping] = []
    if after is None or after.start_time_unix_secs is not None:
        dated = [*where, start.is_not(None)]
        if after is not None:
            # `start <= s` is the index range; the OR only decides among records that share the start time.
            s = after.start_time_unix_secs
            dated += [start <= s, sa.or_(start < s, conversation_id < after.conversation_id)]
        query = sa.select(*columns).where(*dated).order_by(start.desc(), conversation_id.desc()).limit(want)
        rows.extend(conn.execute(query).mappings())
    undated_possible = wanted.started_after is None and wanted.started_before is None
    if len(rows) < want and undated_possible:
        undated = [*where, start.is_(None)]
        if after is not None and after.start_time_unix_secs is None:
            undated.append(conversation_id < after.conversation_id)
        query = sa.select(*columns).where(*undated).order_by(conversation_id.desc()).limit(want - len(rows))
        rows.extend(conn.execute(query).mappings())
    page = [public_record(row) for row in rows[: wanted.limit]]
    if search is not None:
        for record, row in zip(page, rows, strict=False):
            record["snippet"] = snippet(row, search.terms)
    if len(rows) <= wanted.limit:
        return Page(page, None)
    last = page[-1]
    return Page(page, Cursor(last["start_time_unix_secs"], last["conversation_id"]))


def _conditions(conn: Connection, wanted: ConversationFilter) -> list[sa.ColumnElement[bool]]:
    dialect = conn.dialect.name
    c = conversations.c
    where: list[sa.ColumnElement[bool]] = [c[name] == value for name, value in wanted.equal.items()]
    if wanted.first_seen_via is not None:
        where.append(c.first_seen_via == wanted.first_seen_via)
    if wanted.started_after is not None:
        where.append(c.start_time_unix_secs >= wanted.started_after)
    if wanted.started_before is not None:
        where.append(c.start_time_unix_secs < wanted.started_before)
    where += [_json_match(dialect, c.dynamic_variables, match) for match in wanted.variables]
    where += [_json_match(dialect, c.labels, match) for match in wanted.labels]
    if wanted.search is not None:
        where.append(search_index.matching(conn, wanted.search))
    return where


def _json_match(dialect: str, column: sa.Column[Any], match: JsonMatch) -> sa.ColumnElement[bool]:
    """The object in `column` has key `match.name` equal to the value (as a string, or as number/boolean)."""
    typed: list[Any] = [match.text]
    if match.number is not None:
        typed.append(match.number)
    if match.boolean is not None:
        typed.append(match.boolean)
    if dialect == "postgresql":
        # jsonb containment: exact per JSON type, and what a GIN index answers.
        document = sa.type_coerce(column, JSONB)
        return sa.or_(*(document.contains({match.name: value}) for value in typed))
    # SQLite: json_extract gives the value in its SQL type; a TEXT never equals an INTEGER, and json_type
    # keeps `true` (extracted as 1) apart from the number 1.
    path = f'$."{match.name}"'  # the name is [A-Za-z0-9_.-]+ (query_params.py): quoted, a dot is part of the key
    extracted = sa.func.json_extract(column, path)
    kind = sa.func.json_type(column, path)
    options = [sa.and_(kind == "text", extracted == match.text)]
    if match.number is not None:
        options.append(sa.and_(kind.in_(("integer", "real")), extracted == match.number))
    if match.boolean is not None:
        options.append(kind == ("true" if match.boolean else "false"))
    return sa.or_(*options)


def get_conversation(conn: Connection, conversation_id: str) -> dict[str, Any] | None:
    """The whole record: the list fields plus transcript, analysis, metadata and the initiation client data."""
    columns = [conversations.c[name] for name in (*RECORD_FIELDS, *DETAIL_FIELDS)]
    row = conn.execute(sa.select(*columns).where(conversations.c.conversation_id == conversation_id)).mappings().first()
    return None if row is None else public_record(row, extra=DETAIL_FIELDS)


def stored_audio(conn: Connection, conversation_id: str) -> str | None:
    """The blob-store path of the conversation's audio; None when it is unknown or has none."""
    c = conversations.c
    path: str | None = conn.execute(
        sa.select(c.audio_path).where(c.conversation_id == conversation_id, c.audio_stored.is_(True))
    ).scalar_one_or_none()
    return path


def recent_runs(conn: Connection, limit: int) -> list[dict[str, Any]]:
    query = (
        sa.select(*(reconcile_runs.c[name] for name in RUN_FIELDS))
        .order_by(reconcile_runs.c.started_at.desc(), reconcile_runs.c.id.desc())
        .limit(limit)
    )
    return [{name: plain(row[name]) for name in RUN_FIELDS} for row in conn.execute(query).mappings()]


def count_conversations(conn: Connection) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(conversations)).scalar_one())
