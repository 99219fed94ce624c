"""A search page on PostgreSQL is read one of two ways (search/index.py `matching`): every match from the GIN index
when few conversations hold the words, a walk of the start-time order when many do. Which one is chosen must
never change a page: both give test_search's ground truth, alone and with the other filters, across pages.
SQLite has one way; it runs here too, as the reference."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine

from service.search import index as search_index
from service.search.query import parse
from tests.test_search import QUERIES, Generated, dataset, expected, walk

__all__ = ["dataset"]  # test_search's fixture, used here

WAYS = {"walk the start order": 0, "read every match": 1_000_000}


@pytest.mark.parametrize("few_matches", WAYS.values(), ids=WAYS.keys())
def test_either_way_finds_exactly_the_ground_truth(
    engine: Engine, dataset: list[Generated], monkeypatch: pytest.MonkeyPatch, few_matches: int
) -> None:
    monkeypatch.setattr(search_index, "FEW_MATCHES", few_matches)
    for query in QUERIES:
        found = walk(engine, [("q", query)], limit=4)
        assert [record["conversation_id"] for record in found] == expected(dataset, query), query
    for query in ("refund", "cafe crème"):
        found = walk(engine, [("agent_id", "agent_b"), ("status", "done"), ("q", query)], limit=2)
        keep = lambda item: item.agent_id == "agent_b" and item.status == "done"  # noqa: E731
        assert [record["conversation_id"] for record in found] == expected(dataset, query, keep), query


def test_the_estimate_is_exact_on_a_table_smaller_than_the_sample_and_scaled_from_it_otherwise(
    engine: Engine, dataset: list[Generated], monkeypatch: pytest.MonkeyPatch
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite's FTS5 has one way to a page")
    holding = {word: len(expected(dataset, word)) for word in ("refund", "zurich", "nowhere")}
    with engine.connect() as conn:
        for word, count in holding.items():
            assert search_index._estimated_matches(conn, parse(word).tsquery()) == count, word
        # A sample of half the entries, scaled by the table's size as ANALYZE counted it: at most twice the truth.
        conn.exec_driver_sql(f"ANALYZE {search_index.KEY_TABLE}")
        entries = sum(1 for item in dataset if item.words())
        monkeypatch.setattr(search_index, "SAMPLE_ENTRIES", entries // 2)
        estimate = search_index._estimated_matches(conn, parse("refund").tsquery())
        assert 0 < estimate <= holding["refund"] * entries / (entries // 2)
