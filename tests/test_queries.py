"""The list filters' parser: pure, every bad value a QueryError naming its parameter."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.api.query_params import (
    DEFAULT_LIMIT,
    MAX_JSON_FILTERS,
    ConversationFilter,
    Cursor,
    JsonMatch,
    QueryError,
    decode_cursor,
    encode_cursor,
    parse_filter,
    parse_time,
)
from service.record.payloads import valid_conversation_id


def test_no_parameters_is_the_first_page_of_everything() -> None:
    assert parse_filter([]) == ConversationFilter(limit=DEFAULT_LIMIT)


def test_every_parameter_lands_in_its_field() -> None:
    cursor = encode_cursor(Cursor(1_760_000_000, "conv_9"))
    wanted = parse_filter(
        [
            ("agent_id", "agent_1"),
            ("status", "done"),
            ("user_id", "u-1"),
            ("call_successful", "success"),
            ("started_after", "1760000000"),
            ("started_before", "2025-10-10T00:00:00Z"),
            ("source", "session"),
            ("has_audio", "false"),
            ("audio_stored", "true"),
            ("environment", "production"),
            ("phone_number", "+15550100002"),
            ("batch_call_id", "btcal_1"),
            ("var.order_id", "o-1"),
            ("var.customer.name", "Ada"),
            ("label.room", "r-9"),
            ("limit", "500"),
            ("cursor", cursor),
        ]
    )
    assert wanted == ConversationFilter(
        equal={
            "agent_id": "agent_1",
            "status": "done",
            "user_id": "u-1",
            "call_successful": "success",
            "has_audio": False,
            "audio_stored": True,
            "environment": "production",
            "phone_number": "+15550100002",
            "batch_call_id": "btcal_1",
        },
        started_after=1_760_000_000,
        started_before=1_760_054_400,
        first_seen_via="session",
        variables=(JsonMatch("order_id", "o-1"), JsonMatch("customer.name", "Ada")),
        labels=(JsonMatch("room", "r-9"),),
        limit=500,
        after=Cursor(1_760_000_000, "conv_9"),
    )


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("0", 0),
        ("1760000000", 1_760_000_000),
        ("1760000000.2", 1_760_000_001),  # rounded up: exact for whole-second start times
        ("2025-10-09T08:53:20Z", 1_760_000_000),
        ("2025-10-09T10:53:20+02:00", 1_760_000_000),
        ("2025-10-09T08:53:20", 1_760_000_000),  # no zone: UTC
        ("2025-10-09", 1_759_968_000),
        ("1969-12-31T23:59:59Z", -1),
    ],
)
def test_times_are_unix_seconds_or_iso_8601(raw: str, seconds: int) -> None:
    assert parse_time("started_after", raw) == seconds


@pytest.mark.parametrize("raw", ["", "soon", "-1", "1e9", "10000-01-01", "99999999999999"])
def test_bad_times_name_the_parameter(raw: str) -> None:
    with pytest.raises(QueryError) as caught:
        parse_time("started_before", raw)
    assert caught.value.parameter == "started_before"


def test_json_matches_read_numbers_and_booleans_too() -> None:
    assert JsonMatch("n", "7").number == 7
    assert JsonMatch("n", "7.5").number == 7.5
    assert JsonMatch("n", "007").number is None  # not how JSON writes a number: only the string matches
    assert JsonMatch("b", "true").boolean is True
    assert JsonMatch("b", "True").boolean is None


@given(st.integers(-(10**16) + 1, 10**16 - 1))
def test_an_integer_filter_value_is_read_exactly(value: int) -> None:
    number = JsonMatch("n", str(value)).number
    assert type(number) is int and number == value  # 2**53 + 1 would not survive a float


@pytest.mark.parametrize("name", ["var.customer.name", "var.a.b.c", "label.team.lead", "var.system__caller_id"])
def test_a_variable_or_label_name_may_hold_dots(name: str) -> None:
    wanted = parse_filter([(name, "x")])
    assert (*wanted.variables, *wanted.labels) == (JsonMatch(name.split(".", 1)[1], "x"),)


@pytest.mark.parametrize("name", ['var.a"b', "var.a b", "var.a\\b", "var.", "label.$.x"])
def test_a_name_that_could_leave_the_json_path_is_refused(name: str) -> None:
    with pytest.raises(QueryError) as refused:
        parse_filter([(name, "x")])
    assert refused.value.parameter == name


def test_dotted_names_count_toward_the_cap_too() -> None:
    with pytest.raises(QueryError):
        parse_filter([(f"var.v.{i}", "x") for i in range(MAX_JSON_FILTERS + 1)])


@pytest.mark.parametrize(("name", "raw"), [("has_audio", "yes"), ("audio_stored", "maybe"), ("environment", "")])
def test_new_filters_refuse_unusable_values(name: str, raw: str) -> None:
    with pytest.raises(QueryError) as refused:
        parse_filter([(name, raw)])
    assert refused.value.parameter == name


def test_a_phone_number_whose_plus_became_a_space_is_refused_with_the_fix() -> None:
    with pytest.raises(QueryError) as refused:
        parse_filter([("phone_number", " 15550100002")])
    assert "%2B" in refused.value.message


def test_var_and_label_filters_are_capped_together() -> None:
    allowed = [(f"var.v{i}", "x") for i in range(MAX_JSON_FILTERS // 2)]
    allowed += [(f"label.l{i}", "x") for i in range(MAX_JSON_FILTERS - len(allowed))]
    assert len(parse_filter(allowed).variables) + len(parse_filter(allowed).labels) == MAX_JSON_FILTERS
    with pytest.raises(QueryError) as refused:
        parse_filter([*allowed, ("var.one_more", "x")])
    assert refused.value.parameter == "var.one_more"


@given(st.one_of(st.none(), st.integers(0, 2**40)), st.text(min_size=1, max_size=256).filter(valid_conversation_id))
def test_cursors_round_trip(start: int | None, conversation_id: str) -> None:
    cursor = Cursor(start, conversation_id)
    assert decode_cursor(encode_cursor(cursor)) == cursor


@given(st.text(max_size=80))
def test_anything_else_as_a_cursor_is_a_query_error_never_a_crash(raw: str) -> None:
    try:
        decode_cursor(raw)
    except QueryError as exc:
        assert exc.parameter == "cursor"


@given(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=20)), max_size=6))
def test_any_query_string_parses_or_names_a_parameter(params: list[tuple[str, str]]) -> None:
    try:
        parse_filter(params)
    except QueryError as exc:
        assert exc.parameter in {name for name, _ in params}
