"""GET /v1/conversations and /v1/conversations/{id} through the real app, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from service.api.reads import RECORD_FIELDS
from service.config import Settings
from service.record.merge import Source
from service.web.app import create_app
from tests.support import records

AUTH = {"Authorization": "Bearer test-token"}
T0 = 1_760_000_000


@pytest.fixture
def client(settings: Settings, engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client


def ids(client: TestClient, query: str = "", **params: Any) -> list[str]:
    answer = client.get(f"/v1/conversations{query}", params=params, headers=AUTH)
    assert answer.status_code == 200, answer.text
    return [record["conversation_id"] for record in answer.json()["conversations"]]


@pytest.fixture
def stored(engine: Engine, settings: Settings) -> None:
    """Six conversations that differ in every filterable way."""
    records.store(
        engine,
        [
            records.detail(
                "conv_a", agent_id="agent_1", start=T0 + 50, user_id="alice", dynamic_variables={"order": "o-1"}
            ),
            records.detail("conv_b", agent_id="agent_2", start=T0 + 40, call_successful="failure"),
            records.detail("conv_c", agent_id="agent_1", start=T0 + 30, status="failed", dynamic_variables={"n": 7}),
            records.summary("conv_d", agent_id="agent_2", start=T0 + 20),
            records.session("conv_e", user_id="bob", labels={"room": "r-9"}, dynamic_variables={"vip": True}),
            records.detail("conv_f", agent_id="agent_1", start=T0 + 10, source=Source.DETAIL),
            records.audio("conv_f", settings.data_dir, b"ID3 mp3 bytes"),
        ],
    )


@pytest.mark.usefixtures("stored")
def test_lists_newest_start_first_and_undated_records_last(client: TestClient) -> None:
    assert ids(client) == ["conv_a", "conv_b", "conv_c", "conv_d", "conv_f", "conv_e"]


@pytest.mark.usefixtures("stored")
def test_a_list_item_has_exactly_the_documented_fields(client: TestClient) -> None:
    answer = client.get("/v1/conversations", params={"user_id": "alice"}, headers=AUTH).json()
    assert answer["has_more"] is False
    assert answer["next_cursor"] is None
    (item,) = answer["conversations"]
    assert list(item) == list(RECORD_FIELDS)
    assert item["agent_id"] == "agent_1"
    assert item["start_time_unix_secs"] == T0 + 50
    assert item["dynamic_variables"] == {"order": "o-1"}
    assert item["labels"] is None
    assert item["first_seen_via"] == "webhook"
    assert item["webhook_received_at"] == "2026-01-01T00:00:00Z"
    assert item["reconciled_at"] is None
    assert item["complete"] is True
    assert "transcript" not in item


@pytest.mark.usefixtures("stored")
@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"agent_id": "agent_1"}, ["conv_a", "conv_c", "conv_f", "conv_e"]),
        ({"status": "failed"}, ["conv_c"]),
        ({"status": "initiated"}, ["conv_e"]),
        ({"user_id": "bob"}, ["conv_e"]),
        ({"call_successful": "failure"}, ["conv_b"]),
        ({"started_after": str(T0 + 30)}, ["conv_a", "conv_b", "conv_c"]),  # inclusive
        ({"started_before": str(T0 + 30)}, ["conv_d", "conv_f"]),  # exclusive
        ({"started_after": "2025-10-09T08:53:50Z"}, ["conv_a", "conv_b", "conv_c"]),  # = T0 + 30
        ({"started_before": "2025-10-09T10:53:50+02:00"}, ["conv_d", "conv_f"]),
        ({"started_before": "2025-10-09T08:53:50"}, ["conv_d", "conv_f"]),  # no zone: UTC
        ({"started_after": str(T0 + 29.5)}, ["conv_a", "conv_b", "conv_c"]),
        ({"source": "reconcile"}, ["conv_d", "conv_f"]),
        ({"source": "session"}, ["conv_e"]),
        ({"source": "webhook"}, ["conv_a", "conv_b", "conv_c"]),
        ({"audio_stored": "true"}, ["conv_f"]),
        ({"audio_stored": "false"}, ["conv_a", "conv_b", "conv_c", "conv_d", "conv_e"]),
        ({"var.order": "o-1"}, ["conv_a"]),
        ({"var.order": "o-2"}, []),
        ({"var.n": "7"}, ["conv_c"]),  # a JSON number matches its digits
        ({"var.vip": "true"}, ["conv_e"]),  # and a JSON boolean its name
        ({"label.room": "r-9"}, ["conv_e"]),
        ({"limit": "2"}, ["conv_a", "conv_b"]),
    ],
)
def test_each_filter_alone(client: TestClient, params: dict[str, str], expected: list[str]) -> None:
    assert ids(client, **params) == expected


@pytest.mark.usefixtures("stored")
@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"agent_id": "agent_1", "status": "done"}, ["conv_a", "conv_f"]),
        ({"agent_id": "agent_2", "call_successful": "failure"}, ["conv_b"]),
        ({"agent_id": "agent_1", "started_after": str(T0), "started_before": str(T0 + 50)}, ["conv_c", "conv_f"]),
        ({"agent_id": "agent_1", "audio_stored": "1", "source": "reconcile"}, ["conv_f"]),
        ({"user_id": "alice", "var.order": "o-1", "agent_id": "agent_1"}, ["conv_a"]),
        ({"user_id": "alice", "var.order": "o-1", "agent_id": "agent_2"}, []),
        ({"label.room": "r-9", "var.vip": "true", "user_id": "bob", "status": "initiated"}, ["conv_e"]),
        ({"agent_id": "agent_1", "source": "session", "started_after": "0"}, []),  # undated never match a time
    ],
)
def test_filters_combined(client: TestClient, params: dict[str, str], expected: list[str]) -> None:
    assert ids(client, **params) == expected


@pytest.mark.usefixtures("stored")
def test_a_string_value_does_not_match_a_number_of_other_spelling(client: TestClient, engine: Engine) -> None:
    records.store(engine, [records.detail("conv_s", start=T0 - 1, dynamic_variables={"n": "7"})])
    assert ids(client, **{"var.n": "7"}) == ["conv_c", "conv_s"]
    assert ids(client, **{"var.n": "7.0"}) == ["conv_c"]


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("?limit=0", "limit"),
        ("?limit=501", "limit"),
        ("?limit=ten", "limit"),
        ("?started_after=yesterday", "started_after"),
        ("?started_before=-5", "started_before"),
        ("?started_after=99999999999999", "started_after"),
        ("?source=api", "source"),
        ("?has_audio=maybe", "has_audio"),
        ("?audio_stored=maybe", "audio_stored"),
        ("?phone_number=%2015550100002", "phone_number"),
        ("?cursor=not-a-cursor", "cursor"),
        ("?agent_id=", "agent_id"),
        ("?agent_id=a%00b", "agent_id"),
        ("?agent_id=a&agent_id=b", "agent_id"),
        ("?var.=x", "var."),
        ("?var.a%20b=x", "var.a b"),
        ("?agentid=a", "agentid"),
    ],
)
def test_bad_parameters_are_422_naming_the_parameter(client: TestClient, query: str, parameter: str) -> None:
    answer = client.get(f"/v1/conversations{query}", headers=AUTH)
    assert answer.status_code == 422
    assert answer.json()["parameter"] == parameter
    assert parameter in answer.json()["error"]


@pytest.mark.usefixtures("stored")
def test_the_single_record_adds_transcript_analysis_and_metadata(client: TestClient) -> None:
    answer = client.get("/v1/conversations/conv_a", headers=AUTH)
    assert answer.status_code == 200
    record = answer.json()
    assert list(record) == [*RECORD_FIELDS, "transcript", "analysis", "metadata", "conversation_initiation_client_data"]
    assert record["transcript"] == [{"role": "agent", "message": "Hello!", "time_in_call_secs": 0}]
    assert record["analysis"]["call_successful"] == "success"
    assert record["metadata"]["start_time_unix_secs"] == T0 + 50
    assert record["first_seen_via"] == "webhook"


@pytest.mark.usefixtures("stored")
def test_a_session_record_has_labels_and_nulls_for_what_is_not_known(client: TestClient) -> None:
    record = client.get("/v1/conversations/conv_e", headers=AUTH).json()
    assert record["labels"] == {"room": "r-9"}
    assert record["first_seen_via"] == "session"
    assert record["start_time_unix_secs"] is None
    assert record["transcript"] is None
    assert record["analysis"] is None
    assert record["complete"] is False


@pytest.mark.parametrize("conversation_id", ["conv_unknown", "a%00b", "x" * 300])
def test_unknown_ids_are_404(client: TestClient, conversation_id: str) -> None:
    answer = client.get(f"/v1/conversations/{conversation_id}", headers=AUTH)
    assert answer.status_code == 404
    assert answer.json() == {"error": "conversation not found"}


def test_reconcile_runs_are_listed_newest_first(client: TestClient, engine: Engine) -> None:
    with engine.begin() as conn:
        for run_id, status in ((1, "succeeded"), (2, "failed")):
            conn.exec_driver_sql(
                "INSERT INTO reconcile_run (id, started_at, finished_at, status, holder, dry_run, listed, new,"
                " updated, details_fetched, audio_fetched, failed) VALUES"
                f" ({run_id}, '2026-01-0{run_id} 00:00:00+00:00', '2026-01-0{run_id} 00:05:00+00:00', '{status}',"
                " 'host:1', false, 10, 3, 1, 4, 0, 0)"
            )
    runs = client.get("/v1/reconcile/runs", headers=AUTH).json()["runs"]
    assert [run["id"] for run in runs] == [2, 1]
    assert runs[0]["status"] == "failed"
    assert runs[1]["new"] == 3
    assert runs[1]["finished_at"] == "2026-01-01T00:05:00Z"
    assert client.get("/v1/reconcile/runs?limit=1", headers=AUTH).json()["runs"][0]["id"] == 2
    assert client.get("/v1/reconcile/runs?limit=0", headers=AUTH).status_code == 422


def test_a_webrtc_session_is_found_by_user_id_or_dynamic_variable(client: TestClient, engine: Engine) -> None:
    records.store(engine, [records.session("conv_rtc", user_id="u-77", dynamic_variables={"ticket": "T-5"})])
    assert ids(client, user_id="u-77") == ["conv_rtc"]
    assert ids(client, **{"var.ticket": "T-5"}) == ["conv_rtc"]
