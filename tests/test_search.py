"""`q=` on GET /v1/conversations: results equal a ground truth computed here, the snippet, hostile queries, and the
index kept in step by the write path, erasure, purge and migration 0008 — on SQLite and PostgreSQL.

The ground truth is written independently of service/search: a conversation matches when every word of the query,
decomposed, stripped of its combining marks and case-folded, is among the words of its title, summary or messages
folded the same way. The generated data set uses words on which that simple rule and postcall's agree (accented
Latin letters, `ß`, upper case), stored through the one write path.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from alembic import command
from service.api.query_params import Cursor, QueryError, parse_filter
from service.api.reads import list_conversations
from service.config import Settings
from service.erase import erasure
from service.record import payloads, purge
from service.record import store as record_store
from service.record.merge import Observation, Source
from service.search import index as search_index
from service.search.document import snippet
from service.search.query import MAX_QUERY_LENGTH, MAX_QUERY_WORDS, parse
from service.storage.audio import BlobStore
from service.storage.db import create_engine, transaction
from service.storage.migrations import alembic_config, upgrade
from service.web.app import create_app
from tests.support.databases import postgres_database

AT = datetime(2026, 3, 1, tzinfo=UTC)
AUTH = {"Authorization": "Bearer test-token"}
AGENTS = ("agent_a", "agent_b", "agent_c")
# Words that need folding to match (accents, case, ß), words most conversations hold, and words few do.
VOCABULARY = (
    "Café",
    "cafe",
    "CAFÉ",
    "crème",
    "Brûlée",
    "Zürich",
    "zurich",
    "señor",
    "Straße",
    "STRASSE",
    "refund",
    "Refund",
    "invoice",
    "delivery",
    "order",
    "address",
    "password",
    "thanks",
    "hello",
    "please",
    "the",
    "my",
    "is",
    "late",
    "naïve",
    "Ångström",
)
QUERIES = (
    "refund",  # one word
    "REFUND",
    "invoice",
    "refund invoice",  # two words
    "invoice refund",
    "cafe",  # accents and case
    "CAFÉ",
    "Café crème",
    "creme brulee",
    "zurich",
    "ZÜRICH",
    "senor",
    "strasse",
    "Straße",
    "naive",
    "angstrom",
    "late password address",
    "refund, invoice!",  # punctuation between words
    "nowhere",  # no conversation
)


def truth_words(text: str) -> set[str]:
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return set(re.findall(r"[^\W_]+", stripped.casefold()))


@dataclass
class Generated:
    conversation_id: str
    agent_id: str
    status: str
    start: int | None
    texts: list[str]

    def words(self) -> set[str]:
        return set().union(*(truth_words(text) for text in self.texts)) if self.texts else set()

    def sort_key(self) -> tuple[int, int, str]:
        # Newest start first, ties by id descending, undated last (README "Order").
        return (
            (0, -self.start, _desc(self.conversation_id))
            if self.start is not None
            else (1, 0, _desc(self.conversation_id))
        )


def _desc(text: str) -> str:
    return "".join(chr(0x10FFFF - ord(ch)) for ch in text)


def generate(count: int, seed: int = 15) -> list[Generated]:
    rng = random.Random(seed)

    def sentence() -> str:
        return " ".join(rng.choice(VOCABULARY) for _ in range(rng.randrange(2, 7))) + rng.choice(("", ".", "?", "!"))

    made = []
    for i in range(count):
        has_text = rng.random() > 0.1
        texts = [sentence() for _ in range(rng.randrange(1, 6))] if has_text else []
        start = None if rng.random() < 0.1 else 1_760_000_000 + rng.randrange(40) * 60  # ties on purpose
        made.append(Generated(f"conv_{i:04d}", AGENTS[i % 3], rng.choice(("done", "done", "failed")), start, texts))
    return made


def observation(item: Generated) -> Observation:
    title, summary, *messages = [*item.texts, None, None] if len(item.texts) < 2 else item.texts
    metadata: dict[str, Any] = {"call_duration_secs": 30}
    if item.start is not None:
        metadata["start_time_unix_secs"] = item.start
    data = {
        "conversation_id": item.conversation_id,
        "agent_id": item.agent_id,
        "status": item.status,
        "transcript": [
            {"role": "user", "message": text, "time_in_call_secs": n}
            for n, text in enumerate(messages)
            if text is not None
        ],
        "metadata": metadata,
        "analysis": {"call_summary_title": title, "transcript_summary": summary},
    }
    return payloads.detail_observation(data, Source.TRANSCRIPTION_WEBHOOK, AT)


def store(engine: Engine, observations: list[Observation]) -> None:
    transaction(engine, lambda conn: record_store.apply_many(conn, observations, AT))


def walk(engine: Engine, params: list[tuple[str, str]], limit: int = 7) -> list[dict[str, Any]]:
    """Every page of a search, following the cursor."""
    found: list[dict[str, Any]] = []
    after: Cursor | None = None
    while True:
        wanted = parse_filter([*params, ("limit", str(limit))])
        wanted = type(wanted)(**{**wanted.__dict__, "after": after})
        with engine.connect() as conn:
            page = list_conversations(conn, wanted)
        found += page.records
        if page.next_cursor is None:
            return found
        after = page.next_cursor


@pytest.fixture
def dataset(engine: Engine) -> list[Generated]:
    made = generate(150)
    store(engine, [observation(item) for item in made])
    return made


def expected(made: list[Generated], query: str, keep: Any = lambda item: True) -> list[str]:
    words = truth_words(query)
    hits = [item for item in made if words and words <= item.words() and keep(item)]
    return [item.conversation_id for item in sorted(hits, key=Generated.sort_key)]


def test_every_query_finds_exactly_the_ground_truth_across_pages(engine: Engine, dataset: list[Generated]) -> None:
    for query in QUERIES:
        found = walk(engine, [("q", query)])
        assert [record["conversation_id"] for record in found] == expected(dataset, query), query
        for record in found:
            assert record["snippet"] is not None and "«" in record["snippet"], (query, record["snippet"])
    assert expected(dataset, "refund") and expected(dataset, "cafe") and not expected(dataset, "nowhere")


def test_search_combines_with_every_other_filter(engine: Engine, dataset: list[Generated]) -> None:
    cases: list[tuple[list[tuple[str, str]], Any]] = [
        ([("agent_id", "agent_b")], lambda item: item.agent_id == "agent_b"),
        ([("status", "failed")], lambda item: item.status == "failed"),
        ([("started_after", "1760000600")], lambda item: item.start is not None and item.start >= 1_760_000_600),
        ([("started_before", "1760001200")], lambda item: item.start is not None and item.start < 1_760_001_200),
        (
            [("agent_id", "agent_a"), ("status", "done"), ("started_after", "1760000300")],
            lambda item: item.agent_id == "agent_a" and item.status == "done" and (item.start or 0) >= 1_760_000_300,
        ),
    ]
    for filters, keep in cases:
        for query in ("refund", "cafe crème", "zurich invoice"):
            found = walk(engine, [*filters, ("q", query)], limit=3)
            assert [record["conversation_id"] for record in found] == expected(dataset, query, keep), (filters, query)


def test_a_page_without_q_has_no_snippet_and_a_searched_page_has_exactly_one_more_field(
    engine: Engine, dataset: list[Generated]
) -> None:
    plain = walk(engine, [("agent_id", "agent_a")], limit=500)[0]
    searched = walk(engine, [("q", "refund")], limit=500)[0]
    assert "snippet" not in plain
    assert list(searched) == [*plain, "snippet"]


def test_the_snippet_is_the_best_passage_cut_around_its_matches() -> None:
    long_message = (
        "At the start of the call the customer explained at some length that the parcel had not arrived and that "
        "they had waited all week. They asked for a REFUND of the order and a copy of the invoice for their "
        "records, then said goodbye and thanked the agent for being so patient with them throughout the call."
    )
    record = {
        "call_summary_title": "Refund request",
        "transcript_summary": "The caller wants a refund.",
        "transcript": [
            {"role": "user", "message": "Hello, I want a refund"},
            {"role": "agent", "message": long_message},
            {"role": "tool", "tool_calls": [{"refund": "invoice"}]},  # not a message: never a passage
        ],
    }
    # Both words are only in the long message: it wins, cut at words, with an ellipsis where it is cut.
    got = snippet(record, parse("refund invoice").terms)
    assert got == (
        "…that they had waited all week. They asked for a «REFUND» of the order and a copy of the «invoice» for their "
        "records, then said goodbye and thanked the agent for being so patient with them throughout…"
    )
    # One word everywhere: the first transcript message wins over the summary and the title.
    assert snippet(record, parse("refund").terms) == "Hello, I want a «refund»"
    # Only in the title: the title.
    assert snippet(record, parse("request").terms) == "Refund «request»"
    assert snippet(record, parse("Crème").terms) is None
    accented = {"transcript": [{"message": "Un café CRÈME, s'il vous plaît"}]}
    assert snippet(accented, parse("cafe creme").terms) == "Un «café» «CRÈME», s'il vous plaît"


def test_the_snippet_over_http_marks_the_match(settings: Settings, engine: Engine) -> None:
    store(engine, [observation(Generated("conv_x", "agent_a", "done", 1_760_000_000, ["Title", "Sum", "Mon Café?"]))])
    with TestClient(create_app(settings, engine=engine)) as client:
        answer = client.get("/v1/conversations", params={"q": "CAFE"}, headers=AUTH)
    assert answer.status_code == 200
    [record] = answer.json()["conversations"]
    assert record["conversation_id"] == "conv_x"
    assert record["snippet"] == "Mon «Café»?"


HOSTILE = [
    '"',
    "'",
    "''",
    "\\",
    "a & b",
    "a | b",
    "!refund",
    "refund:*",
    "(refund",
    "refund)",
    "-refund",
    "refund -invoice",
    "%",
    "_",
    "%refund%",
    "ref_nd",
    "refund NEAR invoice",
    "NEAR(refund invoice)",
    "refund AND invoice OR x",
    "NOT refund",
    "refund*",
    "^refund",
    "col:refund",
    '"refund" "invoice"',
    "'refund' & 'invoice'",
    "'; DROP TABLE conversation; --",
    "?!.,;:",
    "   ",
    "«»",
    "\u0301",
    "x" * 101,  # a word longer than any indexed word
    "é" * 60,
    "ﷺ ½ ㎏ ﬁ",
    "北京 हिन्दी ελληνικά",
]


def test_hostile_queries_answer_200_or_a_clear_422_never_500(
    settings: Settings, engine: Engine, dataset: list[Generated]
) -> None:
    with TestClient(create_app(settings, engine=engine)) as client:
        for query in HOSTILE:
            answer = client.get("/v1/conversations", params={"q": query}, headers=AUTH)
            assert answer.status_code == 200, (query, answer.text)
            ids = [record["conversation_id"] for record in answer.json()["conversations"]]
            assert ids == expected(dataset, query)[:50], query
        refused = {
            "x" * 2000: f"longer than {MAX_QUERY_LENGTH} characters",
            "y" * (MAX_QUERY_LENGTH + 1): f"longer than {MAX_QUERY_LENGTH} characters",
            " ".join(f"w{n}" for n in range(MAX_QUERY_WORDS + 1)): f"more than {MAX_QUERY_WORDS} different words",
            "": "must not be empty",
            "refund\x00": "contains a NUL character",
        }
        for query, reason in refused.items():
            answer = client.get("/v1/conversations", params={"q": query}, headers=AUTH)
            assert answer.status_code == 422, query
            assert answer.json() == {"error": f"q: {reason}", "parameter": "q"}
        at_the_limit = " ".join(["refund"] * (MAX_QUERY_LENGTH // 7)) + " invoice"
        answer = client.get("/v1/conversations", params={"q": at_the_limit[:MAX_QUERY_LENGTH]}, headers=AUTH)
        assert answer.status_code == 200


def test_q_given_twice_is_refused() -> None:
    with pytest.raises(QueryError, match="given more than once"):
        parse_filter([("q", "a"), ("q", "b")])


def entries(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT conversation_id FROM conversation_search")).scalars())


def ids(engine: Engine, query: str) -> list[str]:
    return [record["conversation_id"] for record in walk(engine, [("q", query)], limit=500)]


def test_the_index_follows_each_write_of_the_text_and_a_record_without_text_has_no_entry(engine: Engine) -> None:
    session = Observation("conv_s", Source.SESSION, AT, status="initiated", fields={"agent_id": "agent_a"})
    listed = {
        "conversation_id": "conv_1",
        "status": "done",
        "transcript_summary": "Parcel late",
        "start_time_unix_secs": 1,
    }
    store(engine, [session, payloads.summary_observation(listed, AT)])
    assert entries(engine) == {"conv_1"}
    assert ids(engine, "parcel") == ["conv_1"]
    # The transcription webhook is richer than the list summary: its summary and transcript replace the words.
    store(engine, [observation(Generated("conv_1", "agent_a", "done", 1, ["Title", "Wrong invoice", "hello"]))])
    assert ids(engine, "parcel") == []
    assert ids(engine, "invoice hello") == ["conv_1"]
    # The session's call happens: its transcript gives it an entry.
    store(engine, [observation(Generated("conv_s", "agent_a", "done", 2, ["Title", "Summary", "hello again"]))])
    assert ids(engine, "hello") == ["conv_s", "conv_1"]
    assert _fts_rows(engine) in (None, 2)


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "data")


def test_erasing_a_conversation_removes_its_search_entry(engine: Engine, blobs: BlobStore) -> None:
    made = [
        Generated("conv_keep", "agent_a", "done", 1_760_000_000, ["Title", "Summary", "secret refund code"]),
        Generated("conv_gone", "agent_a", "done", 1_760_000_060, ["Title", "Summary", "secret refund code"]),
    ]
    store(engine, [observation(item) for item in made])
    assert ids(engine, "secret") == ["conv_gone", "conv_keep"]
    anyio.run(erasure.erase, engine, blobs, erasure.named(["conv_gone"], tombstone_unstored=False), "test")
    assert entries(engine) == {"conv_keep"}
    assert ids(engine, "secret") == ["conv_keep"]
    assert _fts_rows(engine) in (None, 1)


def test_purging_conversations_removes_their_search_entries(engine: Engine, blobs: BlobStore) -> None:
    made = [
        Generated("conv_old", "agent_a", "done", 1_000_000_000, ["Title", "Summary", "old words"]),
        Generated("conv_new", "agent_a", "done", 1_760_000_000, ["Title", "Summary", "new words"]),
    ]
    store(engine, [observation(item) for item in made])
    purge.purge(engine, blobs, purge.Cutoff(1_500_000_000))
    assert entries(engine) == {"conv_new"}
    assert ids(engine, "words") == ["conv_new"]
    assert _fts_rows(engine) in (None, 1)


def _fts_rows(engine: Engine) -> int | None:
    """Rows of SQLite's FTS5 table (None on PostgreSQL, which has none)."""
    if engine.dialect.name != "sqlite":
        return None
    with engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {search_index.FTS_TABLE}")).scalar_one())


@pytest.fixture(params=["sqlite", "postgresql"])
def unmigrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    with postgres_database(migrated=False) as url:
        yield url


def test_migration_0009_indexes_the_records_stored_before_it_and_its_downgrade_removes_the_index(
    unmigrated_url: str,
) -> None:
    engine = create_engine(unmigrated_url)
    try:
        upgrade(engine, "0008")
        made = generate(40, seed=8)
        rows = []
        for item in made:
            record = record_store._fold({}, [observation(item)])[item.conversation_id]
            rows.append({**record, "updated_at": AT})
        transaction(engine, lambda conn: conn.execute(sa.insert(record_store.conversations), rows))
        upgrade(engine, "head")
        for query in ("refund", "cafe crème", "strasse"):
            assert ids(engine, query) == expected(made, query), query
        assert entries(engine) == {item.conversation_id for item in made if item.words()}
        config = alembic_config()
        with engine.connect() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "0008")
            conn.commit()
        assert not {name for name in sa.inspect(engine).get_table_names() if search_index.owns_table(name)}
    finally:
        engine.dispose()
