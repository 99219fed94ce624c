"""The search index: kept in step with the records, and asked which conversations hold every word of a query.

Where it lives (migration 0008), beside the `conversation` table rather than in it, on both databases:
- PostgreSQL: `conversation_search (conversation_id PRIMARY KEY, document tsvector)` with a GIN index. A tsvector
  column on `conversation` itself would need a second UPDATE of that wide row after each write (the record's
  columns come from the one field list, and the write path inserts and updates exactly those): a new row version
  with an entry in each of its nine indexes, where a row here is one small insert. The tsvector is built with
  `array_to_tsvector` from the words search/words.py cut and folded, not with `to_tsvector`: no parser, no
  dictionary, no `unaccent` (so no extension to install), and exactly the words SQLite stores.
- SQLite: an FTS5 table `conversation_search_fts (document)` whose rowid is `conversation_search.id`, the key
  table that maps it to the conversation (a conversation's own rowid may change on VACUUM: its key is text). The
  document is the folded words separated by spaces, and the tokenizer is `ascii`: it splits at the spaces and at
  nothing else (every non-ASCII character is a token character), so FTS5 holds the same words as PostgreSQL.
  `unicode61 remove_diacritics 2` would fold again what is folded already, and its Unicode 6.1 tables would cut a
  word at any letter added to Unicode since. `detail=none` and `columnsize=0`: a search asks only which documents
  hold a word, never where (no phrases, no ranking), so positions and sizes are not stored.

Kept in step by the one write path (`refresh`, from record/store.py, for every record whose title, summary or
transcript changed, a batch in a few statements) and by whatever deletes records (`forget`: erasure and purge).
Existing records get their entries from migration 0008 (`rebuild`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, TSQUERY
from sqlalchemy.engine import Connection

from service.search.document import SOURCE_FIELDS, document, same_text
from service.search.query import Search
from service.storage.tables import Conversation

conversations: sa.Table = Conversation.__table__  # type: ignore[attr-defined]

# Created by migration 0008, outside the record's tables (storage/tables.py): FTS5 cannot be declared there.
KEY_TABLE = "conversation_search"
FTS_TABLE = "conversation_search_fts"
TABLES = (KEY_TABLE, FTS_TABLE)
REBUILD_BATCH = 1000
# PostgreSQL: up to this many matches a search reads them all from the GIN index, above it walks the start-time
# order (`matching`). The two cost the same where reading M matches equals walking limit * N / M conversations
# to fill a page; measured at a million conversations and 50 a page (~190 µs a match, ~60 µs a conversation
# walked, neither in shared buffers), about 4,000.
FEW_MATCHES = 4000
SAMPLE_ENTRIES = 1000  # how many entries `_estimated_matches` reads: at 1% they hold about 10 matches

_entries = sa.table(KEY_TABLE, sa.column("conversation_id"), sa.column("id"), sa.column("document"))
_fts = sa.table(FTS_TABLE, sa.column("rowid"))

_PG_UPSERT = sa.text(
    f"INSERT INTO {KEY_TABLE} (conversation_id, document) "  # noqa: S608 (constant names; values are bound)
    "SELECT id, array_to_tsvector(string_to_array(words, ' ')) "
    "FROM unnest(CAST(:ids AS text[]), CAST(:documents AS text[])) AS entry (id, words) "
    "ON CONFLICT (conversation_id) DO UPDATE SET document = EXCLUDED.document"
)
_PG_SAMPLE = sa.text(
    "SELECT count(*), count(*) FILTER (WHERE document @@ CAST(:search_tsquery AS tsquery)),"  # noqa: S608 (constants)
    f" (SELECT reltuples FROM pg_class WHERE oid = CAST('{KEY_TABLE}' AS regclass))"
    f" FROM (SELECT document FROM {KEY_TABLE} LIMIT {SAMPLE_ENTRIES}) AS sample"
)
_SQLITE_NEW_KEY = f"INSERT INTO {KEY_TABLE} (conversation_id) VALUES (?) ON CONFLICT DO NOTHING"  # noqa: S608
_SQLITE_INSERT = f"INSERT INTO {FTS_TABLE} (rowid, document) VALUES (?, ?)"  # noqa: S608


def owns_table(name: str) -> bool:
    """Whether a table of the database is the search index's (FTS5 adds `conversation_search_fts_*` shadows)."""
    return name in TABLES or name.startswith(FTS_TABLE + "_")


def refresh(conn: Connection, before: Mapping[str, Mapping[str, Any]], after: Mapping[str, Mapping[str, Any]]) -> None:
    """Bring the entries of the records in `after` (id → record as written) up to date, `before` holding those
    stored before this write. Records whose searchable fields did not change cost a comparison, nothing more."""
    changed = {cid: document(record) for cid, record in after.items() if not same_text(before.get(cid), record)}
    if changed:
        write(conn, changed)


def write(conn: Connection, documents: Mapping[str, Sequence[str]]) -> None:
    """Store each conversation's words (an empty list: the conversation has no entry)."""
    emptied = [cid for cid, words in documents.items() if not words]
    kept = {cid: " ".join(words) for cid, words in documents.items() if words}
    if emptied:
        forget(conn, emptied)
    if not kept:
        return
    if conn.dialect.name == "postgresql":
        conn.execute(_PG_UPSERT, {"ids": list(kept), "documents": list(kept.values())})
        return
    conn.exec_driver_sql(_SQLITE_NEW_KEY, [(cid,) for cid in kept])
    rows = conn.execute(sa.select(_entries.c.conversation_id, _entries.c.id).where(_among(kept)))
    keys: dict[str, int] = {cid: key for cid, key in rows}
    conn.execute(sa.delete(_fts).where(_fts.c.rowid.in_(list(keys.values()))))
    conn.exec_driver_sql(_SQLITE_INSERT, [(keys[cid], words) for cid, words in kept.items()])


def forget(conn: Connection, ids: Sequence[str]) -> None:
    """Remove the entries of `ids` (records erased or purged), in the caller's transaction."""
    if not ids:
        return
    if conn.dialect.name != "postgresql":
        keys = sa.select(_entries.c.id).where(_among(ids)).scalar_subquery()
        conn.execute(sa.delete(_fts).where(_fts.c.rowid.in_(keys)))
    conn.execute(sa.delete(_entries).where(_among(ids)))


def _among(ids: Iterable[str]) -> sa.ColumnElement[bool]:
    return _entries.c.conversation_id.in_(list(ids))


def matching(conn: Connection, search: Search) -> sa.ColumnElement[bool]:
    """A condition on `conversation`: its entry holds every word of `search` (which must `can_match`).

    On PostgreSQL this reads first (see below): a sample of the entries, then, when the words look rare, at most
    FEW_MATCHES + 1 of them through the GIN index."""
    if conn.dialect.name != "postgresql":
        fts_match = sa.text(f"{FTS_TABLE} MATCH :search_match").bindparams(search_match=search.fts5())
        rowids = sa.select(_fts.c.rowid).where(fts_match)
        found = sa.select(_entries.c.conversation_id).where(_entries.c.id.in_(rowids))
        return conversations.c.conversation_id.in_(found)
    tsquery = search.tsquery()
    holds = _entries.c.document.bool_op("@@")(sa.cast(sa.bindparam("search_tsquery", tsquery), TSQUERY))
    # A page is newest first. For words in many conversations the fastest way to it is to walk the start-time
    # index and check each conversation's entry until the page is full; for words in few, to read them all from
    # the GIN index and sort them. Left to choose, PostgreSQL guesses how many hold a word from the tsvector
    # statistics, which know only the most common few hundred words: any other is guessed at 0.5% of the table,
    # so a rare word (or a misspelt one, in no conversation at all) walked the whole table (36 s at a million).
    # So postcall counts, cheaply, and chooses.
    if _estimated_matches(conn, tsquery) <= FEW_MATCHES:
        few = list(conn.execute(sa.select(_entries.c.conversation_id).where(holds).limit(FEW_MATCHES + 1)).scalars())
        if len(few) <= FEW_MATCHES:
            # All of them: the page is these conversations, looked up by key and sorted.
            ids = sa.bindparam("search_ids", few, type_=ARRAY(sa.String))
            return conversations.c.conversation_id == sa.any_(ids)
    # Many: a scalar subquery, evaluated per conversation in the page's order, is one PostgreSQL cannot turn into
    # a join (where it would be free to read every match first).
    entry = sa.select(holds).where(_entries.c.conversation_id == conversations.c.conversation_id)
    return entry.scalar_subquery().is_(True)


def _estimated_matches(conn: Connection, tsquery: str) -> float:
    """How many entries hold the words, judged from the first SAMPLE_ENTRIES entries of the table and its size.

    Counting the matches themselves would read a table page per match, a few thousand for a common word; the
    sample is a few hundred pages whatever the words, and exact on a table smaller than it."""
    read, matched, entries = (float(value) for value in conn.execute(_PG_SAMPLE, {"search_tsquery": tsquery}).one())
    if read < SAMPLE_ENTRIES:
        return matched
    return matched / read * max(entries, read)  # reltuples: -1 until the table is first analysed


def rebuild(conn: Connection, batch_size: int = REBUILD_BATCH, progress: Callable[[int], None] | None = None) -> int:
    """Write the entry of every stored record (migration 0008's backfill), in batches by id; returns how many
    records were read."""
    c = conversations.c
    columns = [c.conversation_id, *(c[name] for name in SOURCE_FIELDS)]
    after: str | None = None
    done = 0
    while True:
        query = sa.select(*columns).order_by(c.conversation_id).limit(batch_size)
        if after is not None:
            query = query.where(c.conversation_id > after)
        rows = list(conn.execute(query).mappings())
        if not rows:
            return done
        write(conn, {row["conversation_id"]: document(row) for row in rows})
        after = rows[-1]["conversation_id"]
        done += len(rows)
        if progress is not None:
            progress(done)
