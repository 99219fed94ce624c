"""Payloads to observations: what a column cannot hold reads as absent, and no NUL reaches the database."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.record import payloads
from service.record.merge import Source
from service.testing import samples

AT = datetime(2026, 1, 1, tzinfo=UTC)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def strings_of(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in (key, *strings_of(item))]
    if isinstance(value, list):
        return [s for item in value for s in strings_of(item)]
    return []


@given(JSON)
def test_no_nul_survives_and_nothing_else_changes(value: Any) -> None:
    cleaned = payloads.without_nul(value)
    assert all("\x00" not in s for s in strings_of(cleaned))
    if not any("\x00" in s for s in strings_of(value)):
        assert cleaned == value
    assert payloads.may_hold_nul(json.dumps(value).encode()) == any("\x00" in s for s in strings_of(value))


def test_an_id_that_held_a_nul_is_not_an_id() -> None:
    assert not payloads.valid_conversation_id(payloads.without_nul("conv_\x00"))
    assert payloads.valid_conversation_id("conv_01jx9q2m3n4p5r6s7t8v9w0xyz")


def test_values_a_column_cannot_hold_read_as_absent() -> None:
    data = {
        "conversation_id": "conv_1",
        "agent_id": "a" * 257,
        "user_id": "u" * 1024,
        "status": "done",
        "metadata": {"start_time_unix_secs": 2**63, "main_language": "l" * 65},
        "analysis": {"call_successful": "s" * 33},
    }
    fields = payloads.detail_observation(data, Source.DETAIL, AT).fields
    assert fields["agent_id"] is None
    assert fields["user_id"] == "u" * 1024  # exactly the column's length is kept
    assert fields["start_time_unix_secs"] is None
    assert fields["main_language"] is None
    assert fields["call_successful"] is None
    assert (
        payloads.detail_observation(
            {**data, "metadata": {"start_time_unix_secs": 2**63 - 1}}, Source.DETAIL, AT
        ).fields["start_time_unix_secs"]
        == 2**63 - 1
    )


def test_the_limits_are_the_models() -> None:
    assert payloads.LIMITS["agent_id"] == 256
    assert payloads.LIMITS["user_id"] == 1024
    assert payloads.LIMITS["status"] == 32


def test_another_type_with_an_unusable_id_is_kept_without_it() -> None:
    envelope = payloads.read_envelope({"type": "future_event", "data": {"conversation_id": "a\nb"}})
    assert (envelope.type, envelope.conversation_id) == ("future_event", None)


@given(JSON)
def test_any_otel_traces_read_as_some_agent_and_times_or_none_never_an_error(traces: Any) -> None:
    data = {"conversation_id": "conv_1", "otlp_traces": traces, "metadata": traces, "agent_id": traces}
    fields = payloads.otel_observation(data, AT).fields
    assert fields["start_time_unix_secs"] is None or type(fields["start_time_unix_secs"]) is int
    assert fields["call_duration_secs"] is None or isinstance(fields["call_duration_secs"], int | float)


def test_otel_times_come_from_the_root_span_unless_the_data_carries_them() -> None:
    event = samples.otel_event("conv_1", 1_760_000_100, start=1_760_000_000, duration_nanos=61_250_000_000)
    observation = payloads.otel_observation(event["data"], AT)
    assert observation.source is Source.OTEL_WEBHOOK and observation.status is None
    assert observation.fields == {
        "agent_id": samples.TEST_AGENT_ID,
        "agent_name": None,
        "start_time_unix_secs": 1_760_000_000,
        "call_duration_secs": 61.25,
    }
    spans = event["data"]["otlp_traces"]["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans.reverse()  # the root is found by name, not by position
    del event["data"]["agent_id"]  # and the agent from the trace's resource
    carried = {**event["data"], "status": "done", "metadata": {"start_time_unix_secs": 5, "call_duration_secs": 6}}
    observation = payloads.otel_observation(carried, AT)
    assert observation.status == "done"
    assert (observation.fields["agent_id"], observation.fields["start_time_unix_secs"]) == (samples.TEST_AGENT_ID, 5)
    assert type(observation.fields["call_duration_secs"]) is int


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"type": "sip", "body": {"to_number": "+1555"}}, ("+1555", "outbound")),
        (
            {"type": "twilio", "body": {"Direction": "outbound-api", "To": "+1555", "From": "+1666"}},
            ("+1555", "outbound"),
        ),
        ({"type": "twilio", "body": {"Direction": "outbound-dial", "To": "+1555"}}, ("+1555", "outbound")),
        ({"type": "twilio", "body": {"Direction": "inbound", "To": "+1555", "From": "+1666"}}, ("+1666", "inbound")),
        ({"type": "twilio", "body": {"To": "+1555"}}, (None, None)),  # no direction: no way to tell the other party
        ({"type": "exotel", "body": {"to": "+1555"}}, (None, None)),
        ({"type": "sip", "body": "not an object"}, (None, "outbound")),
    ],
)
def test_a_failures_other_party_comes_from_its_providers_report(
    metadata: dict[str, Any], expected: tuple[str | None, str | None]
) -> None:
    data = {"conversation_id": "conv_1", "failure_reason": "busy", "metadata": metadata}
    fields = payloads.failure_observation(data, AT, 1_760_000_000).fields
    assert (fields.get("phone_number"), fields.get("direction")) == expected
    assert fields["start_time_unix_secs"] == 1_760_000_000


def test_the_envelope_reads_the_event_time_and_the_otel_type_needs_an_id() -> None:
    assert payloads.read_envelope({"type": "x", "event_timestamp": 1_760_000_000.0, "data": {}}).event_timestamp == (
        1_760_000_000
    )
    assert payloads.read_envelope({"type": "x", "event_timestamp": "soon"}).event_timestamp is None
    with pytest.raises(payloads.PayloadError):
        payloads.read_envelope({"type": payloads.OTEL, "data": {"otlp_traces": {}}})


@pytest.mark.parametrize(
    ("sent", "kept"),
    [(22, 22), (22.0, 22.0), (0.5, 0.5), (True, None), ("22", None), (float("inf"), None), (2**63, None)],
)
def test_a_duration_keeps_its_json_type_and_anything_else_reads_as_absent(sent: Any, kept: Any) -> None:
    fields = payloads.detail_observation(
        {"conversation_id": "c", "metadata": {"call_duration_secs": sent}}, Source.DETAIL, AT
    ).fields
    assert fields["call_duration_secs"] == kept and type(fields["call_duration_secs"]) is type(kept)


def test_a_direction_elevenlabs_may_add_later_stays_in_metadata_only() -> None:
    data = {"conversation_id": "c", "metadata": {"phone_call": {"direction": "transfer", "external_number": "+1"}}}
    observation = payloads.detail_observation(data, Source.DETAIL, AT)
    assert observation.fields["direction"] is None and observation.fields["phone_number"] == "+1"
    assert observation.fields["metadata"] == data["metadata"]
