"""Keyset paging: every record exactly once, in order, while new conversations keep arriving."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from service.config import Settings
from service.record.merge import Observation
from service.web.app import create_app
from tests.support import records

AUTH = {"Authorization": "Bearer test-token"}
T0 = 1_760_000_000


@pytest.fixture
def client(settings: Settings, engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client


def sort_key(record: dict[str, object]) -> tuple[int, int, str]:
    """The documented order as an ascending key: dated before undated, newer first, then id descending."""
    start = record["start_time_unix_secs"]
    dated = 0 if start is not None else 1
    return (dated, -int(start) if isinstance(start, int) else 0, "")


def original_records() -> list[Observation]:
    observations: list[Observation] = []
    for i in range(980):
        # Three records share each start time, so ties are decided by conversation_id.
        observations.append(records.detail(f"conv_{i:04d}", start=T0 + i // 3))
    observations += [records.session(f"conv_s{i:02d}") for i in range(20)]  # no start time yet
    return observations


def test_pages_of_7_return_each_record_once_in_order_while_new_ones_arrive(client: TestClient, engine: Engine) -> None:
    records.store(engine, original_records())
    rng = random.Random(4)
    seen: list[dict[str, object]] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": "7", **({"cursor": cursor} if cursor else {})}
        answer = client.get("/v1/conversations", params=params, headers=AUTH).json()
        seen += answer["conversations"]
        pages += 1
        if not answer["has_more"]:
            assert answer["next_cursor"] is None
            break
        cursor = answer["next_cursor"]
        # Between pages: a newer call, one at a start time already listed, one in the past, one undated.
        n = pages
        records.store(
            engine,
            [
                records.detail(f"new_{n}_late", start=T0 + 10_000 + n),
                records.detail(f"new_{n}_tie", start=T0 + rng.randrange(0, 327)),
                records.detail(f"new_{n}_old", start=T0 - rng.randrange(1, 1000)),
                records.session(f"new_{n}_undated"),
            ],
        )
    ids = [record["conversation_id"] for record in seen]
    assert len(ids) == len(set(ids)), "a record was returned twice"
    originals = [str(i) for i in ids if str(i).startswith("conv_")]
    assert sorted(originals) == sorted(o.conversation_id for o in original_records())
    assert not any(str(i).endswith("_late") for i in ids), "a record newer than the cursor appeared"
    keys = [(sort_key(record), record["conversation_id"]) for record in seen]
    for (key, conversation_id), (next_key, next_id) in itertools.pairwise(keys):
        assert key < next_key or (key == next_key and str(conversation_id) > str(next_id)), (conversation_id, next_id)
    assert pages >= 1000 // 7


def test_a_cursor_keeps_its_filters_meaning(client: TestClient, engine: Engine) -> None:
    records.store(engine, [records.detail(f"conv_{i}", agent_id=f"agent_{i % 2}", start=T0 + i) for i in range(10)])
    first = client.get("/v1/conversations", params={"agent_id": "agent_1", "limit": "3"}, headers=AUTH).json()
    assert [r["conversation_id"] for r in first["conversations"]] == ["conv_9", "conv_7", "conv_5"]
    rest = client.get(
        "/v1/conversations", params={"agent_id": "agent_1", "cursor": first["next_cursor"]}, headers=AUTH
    ).json()
    assert [r["conversation_id"] for r in rest["conversations"]] == ["conv_3", "conv_1"]
    assert rest["has_more"] is False
