"""The record keeps everything ElevenLabs sends (issue 13): its payload shapes, signed and posted to the real app over
a real socket, then read back field by field through the read API, on SQLite and PostgreSQL.

The bodies come from service/testing/samples.py, written from ElevenLabs' SDK models (GetConversationResponseModel and
its metadata's phone_call / batch_call, ConversationInitiationClientDataRequestOutput), its failure webhooks and its
OpenTelemetry transcription webhook.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine

from service.config import Settings
from service.record import payloads
from service.record import store as record_store
from service.record.merge import Source
from service.record.purge import Cutoff, purge
from service.storage.audio import BlobStore
from service.storage.db import transaction
from service.testing import samples
from service.web.app import create_app
from tests.support.live import live_server
from tests.support.webhooks import encode, signed_headers

AUTH = {"Authorization": "Bearer test-token"}
NOW = int(datetime.now(UTC).timestamp())  # inside the signature window
# Provenance: when a record was first seen and how, which differs between two deliveries of the same content.
PROVENANCE = ("first_seen_via", "webhook_received_at", "audio_received_at", "reconciled_at")


@pytest.fixture
def api(settings: Settings, engine: Engine) -> Iterator[httpx.Client]:
    with live_server(create_app(settings, engine=engine)) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client


def deliver(api: httpx.Client, event: dict[str, Any]) -> dict[str, Any]:
    body = encode(event)
    answer = api.post("/webhooks/elevenlabs", content=body, headers=signed_headers(body))
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def served(api: httpx.Client, conversation_id: str) -> dict[str, Any]:
    answer = api.get(f"/v1/conversations/{conversation_id}", headers=AUTH)
    assert answer.status_code == 200, answer.text
    record: dict[str, Any] = answer.json()
    return record


def listed(api: httpx.Client, **params: str) -> list[str]:
    answer = api.get("/v1/conversations", params=params, headers=AUTH)
    assert answer.status_code == 200, answer.text
    return [record["conversation_id"] for record in answer.json()["conversations"]]


def typed(value: Any) -> Any:
    """`value` with every number tagged by its JSON type, so 22 and 22.0 compare unequal."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (type(value).__name__, value)
    return value


# --- a transcription: every field of ElevenLabs' detail ----------------------------------------------------------


def test_a_twilio_phone_call_is_served_field_by_field_as_elevenlabs_sent_it(api: httpx.Client) -> None:
    event = samples.transcription_event("conv_phone", NOW, phone_call=samples.twilio_call("inbound"))
    data = event["data"]
    assert deliver(api, event) == {"status": "accepted", "conversation_id": "conv_phone"}
    record = served(api, "conv_phone")
    expected = {
        "conversation_id": "conv_phone",
        "agent_id": data["agent_id"],
        "agent_name": "Front desk",
        "status": "done",
        "user_id": samples.TEST_USER_ID,
        "branch_id": "agtbrch_main",
        "version_id": "agtvrsn_7",
        "environment": "production",
        "start_time_unix_secs": data["metadata"]["start_time_unix_secs"],
        "call_duration_secs": 41,
        "call_successful": "success",
        "call_summary_title": "Appointment rescheduled",
        "transcript_summary": data["analysis"]["transcript_summary"],
        "termination_reason": "Call ended by remote party",
        "main_language": "en",
        "initiation_source": "js_sdk",
        "failure_reason": None,
        "phone_number": samples.CALLER_NUMBER,
        "direction": "inbound",
        "batch_call_id": None,
        "dynamic_variables": samples.DYNAMIC_VARIABLES,
        "labels": None,
        "has_audio": True,
        "has_user_audio": True,
        "has_response_audio": False,
        "audio_stored": False,
        "first_seen_via": "webhook",
        "audio_received_at": None,
        "reconciled_at": None,
        "complete": True,
        "revision": 1,
        "transcript": data["transcript"],
        "analysis": data["analysis"],
        "metadata": data["metadata"],
        "conversation_initiation_client_data": data["conversation_initiation_client_data"],
    }
    assert typed({name: record[name] for name in expected}) == typed(expected)
    assert set(record) - set(expected) == {"webhook_received_at"}
    assert type(record["call_duration_secs"]) is int  # 41, not 41.0
    assert type(record["dynamic_variables"]["order_count"]) is int and record["dynamic_variables"]["balance"] == 12.5
    listed_record = api.get("/v1/conversations", headers=AUTH).json()["conversations"][0]
    assert typed(listed_record) == typed({name: record[name] for name in listed_record})
    assert "conversation_initiation_client_data" not in listed_record


def test_a_batch_call_over_a_sip_trunk_keeps_its_batch_number_and_direction(api: httpx.Client) -> None:
    event = samples.transcription_event(
        "conv_batch",
        NOW,
        phone_call=samples.sip_trunk_call("outbound", "+447700900123"),
        batch_call=samples.batch_call("btcal_spring"),
        source="sip_trunk",
    )
    deliver(api, event)
    record = served(api, "conv_batch")
    assert (record["batch_call_id"], record["phone_number"], record["direction"]) == (
        "btcal_spring",
        "+447700900123",
        "outbound",
    )
    assert record["metadata"]["phone_call"]["sip_header_dynamic_variables"] == {"X-Campaign": "spring"}


@pytest.mark.parametrize("duration", [22, 22.0, 12.5, 0])
def test_a_duration_keeps_the_json_type_it_was_sent_in(api: httpx.Client, duration: float) -> None:
    deliver(api, samples.transcription_event("conv_duration", NOW, duration=duration))
    record = served(api, "conv_duration")
    assert typed(record["call_duration_secs"]) == typed(duration)
    assert typed(record["metadata"]["call_duration_secs"]) == typed(duration)


def test_a_transcription_without_the_new_fields_serves_them_as_null(api: httpx.Client) -> None:
    event = samples.transcription_event("conv_plain", NOW)
    for name in ("agent_name", "version_id", "environment", "has_audio", "has_user_audio", "has_response_audio"):
        del event["data"][name]
    del event["data"]["conversation_initiation_client_data"]["environment"]
    deliver(api, event)
    record = served(api, "conv_plain")
    assert record["agent_name"] is record["version_id"] is record["environment"] is None
    assert record["has_audio"] is record["has_user_audio"] is record["has_response_audio"] is None
    assert record["phone_number"] is record["direction"] is record["batch_call_id"] is None


# --- failures ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["sip", "twilio"])
@pytest.mark.parametrize("reason", samples.FAILURE_REASONS)
def test_a_failed_initiation_is_dated_by_its_event_and_keeps_its_number_and_client_data(
    api: httpx.Client, reason: str, provider: str
) -> None:
    variables = {"customer.name": "Ada", "attempt": 2}
    event = samples.failure_event("conv_failed", NOW - 100, reason, provider, dynamic_variables=variables)
    deliver(api, event)
    record = served(api, "conv_failed")
    # Complete: a call that never connected has no detail to fetch beyond this.
    assert (record["status"], record["failure_reason"], record["complete"]) == ("failed", reason, True)
    assert record["start_time_unix_secs"] == NOW - 100  # the event's time: it carries no start of its own
    assert (record["phone_number"], record["direction"]) == (samples.CALLER_NUMBER, "outbound")
    assert record["metadata"] == event["data"]["metadata"]
    assert record["conversation_initiation_client_data"] == event["data"]["conversation_initiation_client_data"]
    assert typed(record["dynamic_variables"]) == typed(variables)
    # Dated, it matches time filters and sorts among the others by that time.
    deliver(api, samples.transcription_event("conv_older", NOW - 200))
    deliver(api, samples.transcription_event("conv_newer", NOW, duration=1))
    assert listed(api) == ["conv_newer", "conv_failed", "conv_older"]
    assert listed(api, started_after=str(NOW - 100), started_before=str(NOW - 99)) == ["conv_failed"]


@pytest.mark.parametrize("kind", ["transcription", "detail"])
def test_a_failure_never_erases_what_a_transcription_or_detail_brought_in_either_order(
    api: httpx.Client, engine: Engine, kind: str
) -> None:
    def done(conversation_id: str) -> None:
        event = samples.transcription_event(conversation_id, NOW, phone_call=samples.twilio_call("outbound"))
        if kind == "transcription":
            deliver(api, event)
            return
        at = datetime.now(UTC)  # the reconciler's detail fetch, through the one write path it uses
        observation = payloads.detail_observation(event["data"], Source.DETAIL, at)
        transaction(engine, lambda conn: record_store.apply(conn, observation, at))

    def failure(conversation_id: str) -> None:
        deliver(api, samples.failure_event(conversation_id, NOW - 30, "no-answer", "twilio", to_number="+15559990000"))

    done("conv_done_first")
    failure("conv_done_first")
    failure("conv_failure_first")
    done("conv_failure_first")
    done("conv_done_only")
    first, second, alone = (served(api, cid) for cid in ("conv_done_first", "conv_failure_first", "conv_done_only"))

    def content(record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if k not in (*PROVENANCE, "conversation_id", "revision")}

    assert typed(content(first)) == typed(content(second))
    assert first["revision"] == second["revision"] == 2
    assert first["status"] == "done" and first["failure_reason"] == "no-answer"
    # Everything but the failure's own reason is what the transcription or detail brought.
    assert typed({**content(first), "failure_reason": None}) == typed(content(alone))


# --- revision ----------------------------------------------------------------------------------------------------


def test_revision_counts_content_changes_only(api: httpx.Client, engine: Engine, settings: Settings) -> None:
    event = samples.transcription_event("conv_rev", NOW)
    deliver(api, event)
    assert served(api, "conv_rev")["revision"] == 1
    assert deliver(api, event)["status"] == "duplicate"
    resent = json.loads(json.dumps(event))
    resent["event_timestamp"] = NOW + 1  # other bytes, the same conversation: accepted, but nothing new in it
    assert deliver(api, resent)["status"] == "accepted"
    assert served(api, "conv_rev")["revision"] == 1
    # A list summary that says nothing new (a reconcile finding the record complete) moves only reconciled_at.
    summary = {key: event["data"][key] for key in ("conversation_id", "agent_id", "status", "agent_name")}
    summary["start_time_unix_secs"] = event["data"]["metadata"]["start_time_unix_secs"]
    at = datetime.now(UTC)
    observation = payloads.summary_observation(summary, at)
    transaction(engine, lambda conn: record_store.apply(conn, observation, at))
    after_reconcile = served(api, "conv_rev")
    assert (after_reconcile["revision"], after_reconcile["reconciled_at"] is not None) == (1, True)
    changed = json.loads(json.dumps(event))
    changed["data"]["analysis"]["call_summary_title"] = "Appointment moved to Thursday"
    deliver(api, changed)
    assert served(api, "conv_rev")["revision"] == 2
    deliver(api, samples.audio_event("conv_rev", NOW, samples.silent_mp3()))
    record = served(api, "conv_rev")
    assert (record["revision"], record["audio_stored"], record["has_audio"]) == (3, True, True)


def test_audio_purged_is_a_content_change_too(api: httpx.Client, engine: Engine, settings: Settings) -> None:
    deliver(api, samples.transcription_event("conv_purged", NOW - 10))
    deliver(api, samples.audio_event("conv_purged", NOW, samples.silent_mp3()))
    assert served(api, "conv_purged")["revision"] == 2
    purge(engine, BlobStore(settings.data_dir), Cutoff(NOW), audio_only=True)
    record = served(api, "conv_purged")
    assert (record["audio_stored"], record["has_audio"], record["revision"]) == (False, True, 3)


# --- filters -----------------------------------------------------------------------------------------------------


@pytest.fixture
def filterable(api: httpx.Client) -> httpx.Client:
    deliver(api, samples.transcription_event("conv_twilio", NOW - 10, phone_call=samples.twilio_call("inbound")))
    batch = samples.batch_call("btcal_1")
    deliver(
        api, samples.transcription_event("conv_batch", NOW - 20, phone_call=samples.sip_trunk_call(), batch_call=batch)
    )
    staging = samples.transcription_event("conv_staging", NOW - 30, dynamic_variables={"customer.name": "Bob"})
    staging["data"]["environment"] = "staging"
    staging["data"]["has_audio"] = False
    deliver(api, staging)
    deliver(api, samples.failure_event("conv_busy", NOW - 40, "busy", "sip", to_number="+15550100999"))
    deliver(api, samples.audio_event("conv_staging", NOW, samples.silent_mp3()))
    return api


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"environment": "production"}, ["conv_twilio", "conv_batch"]),
        ({"environment": "staging"}, ["conv_staging"]),
        ({"phone_number": samples.CALLER_NUMBER}, ["conv_twilio", "conv_batch"]),
        ({"phone_number": "+15550100999"}, ["conv_busy"]),
        ({"batch_call_id": "btcal_1"}, ["conv_batch"]),
        ({"has_audio": "true"}, ["conv_twilio", "conv_batch"]),  # ElevenLabs' flag; the failure said nothing
        ({"has_audio": "false"}, ["conv_staging"]),
        ({"audio_stored": "true"}, ["conv_staging"]),  # postcall holds its audio, whatever ElevenLabs said
        ({"audio_stored": "false"}, ["conv_busy", "conv_twilio", "conv_batch"]),  # the failure is dated NOW - 40
        ({"var.customer.name": "Ada Lovelace"}, ["conv_twilio", "conv_batch"]),
        ({"var.customer.name": "Bob"}, ["conv_staging"]),
        ({"var.order_count": "3"}, ["conv_twilio", "conv_batch"]),  # an integer matches its digits
        ({"var.system__caller_id": samples.CALLER_NUMBER}, ["conv_twilio", "conv_batch"]),
        ({"environment": "production", "batch_call_id": "btcal_1", "has_audio": "1"}, ["conv_batch"]),
    ],
)
def test_the_new_filters(filterable: httpx.Client, params: dict[str, str], expected: list[str]) -> None:
    assert listed(filterable, **params) == expected


def test_a_dotted_variable_name_is_one_key_not_a_path(api: httpx.Client) -> None:
    deliver(api, samples.transcription_event("conv_flat", NOW, dynamic_variables={"x.y": "1"}))
    deliver(api, samples.transcription_event("conv_nested", NOW - 1, dynamic_variables={"x": {"y": "1"}}))
    assert listed(api, **{"var.x.y": "1"}) == ["conv_flat"]


def test_a_plus_sent_unencoded_is_refused_with_the_fix(api: httpx.Client) -> None:
    answer = api.get("/v1/conversations?phone_number=+15550100002", headers=AUTH)
    assert answer.status_code == 422
    assert answer.json()["parameter"] == "phone_number" and "%2B" in answer.json()["error"]


# --- OpenTelemetry transcriptions --------------------------------------------------------------------------------


def test_an_otel_transcription_creates_an_incomplete_record_from_its_agent_and_times(
    api: httpx.Client, engine: Engine
) -> None:
    event = samples.otel_event("conv_otel", NOW, start=NOW - 60, duration_nanos=41_000_000_000)
    assert deliver(api, event) == {"status": "accepted", "conversation_id": "conv_otel"}
    record = served(api, "conv_otel")
    assert record["agent_id"] == samples.TEST_AGENT_ID
    assert (record["start_time_unix_secs"], record["call_duration_secs"]) == (NOW - 60, 41)
    assert type(record["call_duration_secs"]) is int
    assert (record["status"], record["complete"], record["first_seen_via"]) == (None, False, "webhook")
    assert record["transcript"] is None and record["metadata"] is None  # the traces are not the JSON transcript
    with engine.connect() as conn:
        (body,) = conn.exec_driver_sql("SELECT body FROM webhook_event WHERE conversation_id = 'conv_otel'").one()
    assert json.loads(bytes(body))["data"]["otlp_traces"] == event["data"]["otlp_traces"]  # kept, archived
    assert listed(api, started_after=str(NOW - 60)) == ["conv_otel"]
    # The JSON detail completes it; the traces sent again afterwards change nothing.
    detail = samples.transcription_event("conv_otel", NOW)
    deliver(api, detail)
    completed = served(api, "conv_otel")
    assert (completed["complete"], completed["status"], completed["revision"]) == (True, "done", 2)
    assert completed["start_time_unix_secs"] == detail["data"]["metadata"]["start_time_unix_secs"]
    event["event_timestamp"] = NOW + 1
    deliver(api, event)
    assert served(api, "conv_otel") == completed


def test_an_otel_transcription_takes_the_status_and_times_it_carries(api: httpx.Client) -> None:
    event = samples.otel_event(
        "conv_otel_done",
        NOW,
        start=NOW - 30,
        duration_nanos=12_500_000_000,
        status="done",
        agent_name="Front desk",
    )
    deliver(api, event)
    record = served(api, "conv_otel_done")
    assert (record["status"], record["complete"], record["agent_name"]) == ("done", False, "Front desk")
    assert typed(record["call_duration_secs"]) == typed(12.5)


def test_an_otel_transcription_updates_a_session_record(api: httpx.Client, engine: Engine) -> None:
    at = datetime.now(UTC)
    session = payloads.session_observation("conv_session", "agent_web", "u-1", None, {"room": "r1"}, at)
    transaction(engine, lambda conn: record_store.apply(conn, session, at))
    deliver(api, samples.otel_event("conv_session", NOW, agent_id="agent_web", start=NOW - 50))
    record = served(api, "conv_session")
    assert (record["status"], record["start_time_unix_secs"], record["labels"]) == (
        "initiated",
        NOW - 50,
        {"room": "r1"},
    )
    assert (record["first_seen_via"], record["revision"], record["complete"]) == ("session", 2, False)
