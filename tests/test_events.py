"""Payloads to observations: what a column cannot hold reads as absent, and no NUL reaches the database."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from service.record import payloads
from service.record.merge import Source

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
