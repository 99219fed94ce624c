"""GET /metrics: counters move when webhooks arrive; database figures are read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from service.config import Settings
from service.web.app import create_app
from tests.support import webhooks as wh

URL = "/webhooks/elevenlabs"


@pytest.fixture
def client(settings: Settings, engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def webhooks_total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], kind: str, outcome: str) -> float:
    return samples.get(("postcall_webhooks_total", (("outcome", outcome), ("type", kind))), 0.0)


def deliver(client: TestClient, body: bytes, headers: dict[str, str] | None = None) -> int:
    return client.post(URL, content=body, headers=headers or wh.signed_headers(body)).status_code


def test_webhook_counters_move_by_type_and_outcome(client: TestClient) -> None:
    before = scrape(client)
    assert webhooks_total(before, "post_call_transcription", "accepted") == 0
    body = wh.encode(wh.transcription("conv_m1"))
    assert deliver(client, body) == 200
    assert deliver(client, body) == 200  # a replay: duplicate
    assert deliver(client, wh.encode({"type": "something_new", "data": {}})) == 200
    assert deliver(client, wh.encode(wh.failure("conv_m2"))) == 200
    assert deliver(client, body, {"ElevenLabs-Signature": "t=1,v0=00"}) == 401
    assert deliver(client, b"not json") == 400
    after = scrape(client)
    assert webhooks_total(after, "post_call_transcription", "accepted") == 1
    assert webhooks_total(after, "post_call_transcription", "duplicate") == 1
    assert webhooks_total(after, "other", "ignored") == 1
    assert webhooks_total(after, "call_initiation_failure", "accepted") == 1
    assert webhooks_total(after, "unknown", "invalid_signature") == 1
    assert webhooks_total(after, "unknown", "bad_payload") == 1
    assert after[("postcall_conversations_stored", ())] == 2
    assert after[("postcall_database_up", ())] == 1


def test_request_latency_is_labelled_by_route_template(client: TestClient) -> None:
    client.get("/v1/conversations/conv_x", headers={"Authorization": "Bearer test-token"})
    client.get("/no/such/page")
    samples = scrape(client)
    detail = (("method", "GET"), ("route", "/v1/conversations/{conversation_id}"), ("status", "404"))
    assert samples[("postcall_http_request_duration_seconds_count", detail)] == 1
    unmatched = (("method", "GET"), ("route", "unmatched"), ("status", "404"))
    assert samples[("postcall_http_request_duration_seconds_count", unmatched)] == 1


def test_reconcile_figures_come_from_the_run_table(client: TestClient, engine: Engine) -> None:
    assert scrape(client)[("postcall_reconcile_last_success_timestamp_seconds", ())] == 0
    with engine.begin() as conn:
        for run_id, status, dry_run, new in (
            (1, "succeeded", False, 3),
            (2, "failed", False, 2),
            (3, "succeeded", True, 9),
        ):
            conn.exec_driver_sql(
                "INSERT INTO reconcile_run (id, started_at, finished_at, status, holder, dry_run, listed, new,"
                " updated, details_fetched, audio_fetched, failed) VALUES"
                f" ({run_id}, '2026-01-0{run_id} 00:00:00+00:00', '2026-01-0{run_id} 00:05:00+00:00', '{status}',"
                f" 'host:1', {str(dry_run).lower()}, 10, {new}, 0, 0, 0, 0)"
            )
    samples = scrape(client)
    assert samples[("postcall_reconcile_runs_total", (("status", "succeeded"),))] == 1  # the dry run is not counted
    assert samples[("postcall_reconcile_runs_total", (("status", "failed"),))] == 1
    assert samples[("postcall_reconcile_gaps_filled_total", ())] == 5
    assert samples[("postcall_reconcile_last_success_timestamp_seconds", ())] == 1_767_225_900  # 2026-01-01 00:05Z


def test_two_apps_in_one_process_keep_separate_registries(settings: Settings, engine: Engine) -> None:
    with TestClient(create_app(settings, engine=engine)) as one, TestClient(create_app(settings, engine=engine)) as two:
        body = wh.encode(wh.transcription("conv_m3"))
        assert deliver(one, body) == 200
        assert webhooks_total(scrape(one), "post_call_transcription", "accepted") == 1
        assert webhooks_total(scrape(two), "post_call_transcription", "accepted") == 0
