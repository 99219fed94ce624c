"""The merge rules as pure functions: order of arrival never changes the record a conversation converges to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.record.fields import FIELDS
from service.record.merge import Audio, Observation, Source, merge, revised

T0 = datetime(2026, 1, 1, tzinfo=UTC)
# What merge keeps on a record besides its fields: audio bookkeeping and the merge state.
BOOKKEEPING = {"audio_path", "audio_bytes", "first_seen_at", "data_rank"}


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def fold(observations: list[Observation]) -> dict[str, Any]:
    record: dict[str, Any] | None = None
    for obs in observations:
        record = merge(record, obs)
    assert record is not None
    return record


FINAL = {
    "agent_id": "agent_1",
    "user_id": "user-7",
    "start_time_unix_secs": 1_760_000_000,
    "call_duration_secs": 61.0,
    "call_successful": "success",
    "transcript_summary": "Booked a table for two.",
    "transcript": [{"role": "agent", "message": "Hi"}, {"role": "user", "message": "A table for two"}],
    "analysis": {"call_successful": "success", "transcript_summary": "Booked a table for two."},
    "metadata": {"start_time_unix_secs": 1_760_000_000, "call_duration_secs": 61},
    "dynamic_variables": {"order_id": "o-9"},
}


def lifecycle() -> list[Observation]:
    """Everything one conversation's sources can say, each with its own arrival time."""
    summary_fields = {k: FINAL[k] for k in ("agent_id", "start_time_unix_secs", "call_successful")}
    return [
        Observation(
            "c1",
            Source.SESSION,
            at(0),
            "initiated",
            {"agent_id": "agent_1", "user_id": "user-7"},
            labels={"campaign": "spring"},
        ),
        Observation("c1", Source.LIST_SUMMARY, at(30), "in-progress", {**summary_fields, "call_duration_secs": 5.0}),
        Observation(
            "c1",
            Source.DETAIL,
            at(60),
            "processing",
            {**FINAL, "transcript": FINAL["transcript"][:1], "transcript_summary": None},
        ),
        Observation("c1", Source.LIST_SUMMARY, at(90), "done", {**summary_fields, "call_duration_secs": 61.0}),
        Observation("c1", Source.TRANSCRIPTION_WEBHOOK, at(100), "done", FINAL),
        Observation("c1", Source.AUDIO_WEBHOOK, at(110), None, {"agent_id": "agent_1"}, audio=Audio("audio/c1.mp3", 9)),
        Observation("c1", Source.DETAIL, at(120), "done", FINAL),
    ]


@given(st.permutations(lifecycle()), st.lists(st.integers(0, 6), max_size=4))
def test_any_order_with_repeats_converges_to_the_ordered_result(
    shuffled: list[Observation], repeats: list[int]
) -> None:
    ordered = fold(lifecycle())
    replayed = shuffled + [lifecycle()[i] for i in repeats]
    assert fold(replayed) == ordered


def test_the_converged_record() -> None:
    record = fold(lifecycle())
    assert record["status"] == "done"
    assert record["transcript"] == FINAL["transcript"]
    assert record["transcript_summary"] == FINAL["transcript_summary"]
    assert record["call_duration_secs"] == 61.0
    assert record["labels"] == {"campaign": "spring"}
    assert record["audio_stored"] is True and record["audio_path"] == "audio/c1.mp3"
    assert record["complete"] is True
    assert record["first_seen_via"] == "session"
    assert record["webhook_received_at"] == at(100)
    assert record["audio_received_at"] == at(110)
    assert record["reconciled_at"] == at(120)


STATUSES = ["initiated", "in-progress", "processing", "done", "failed"]
SOURCES = [
    Source.SESSION,
    Source.LIST_SUMMARY,
    Source.DETAIL,
    Source.TRANSCRIPTION_WEBHOOK,
    Source.OTEL_WEBHOOK,
    Source.FAILURE_WEBHOOK,
]


@given(st.lists(st.tuples(st.sampled_from(STATUSES), st.sampled_from(SOURCES)), min_size=1, max_size=8))
def test_a_final_status_never_goes_back(steps: list[tuple[str, Source]]) -> None:
    record: dict[str, Any] | None = None
    seen_final = None
    for i, (status, source) in enumerate(steps):
        record = merge(record, Observation("c", source, at(i), status, {"agent_id": "a"}))
        if seen_final is not None:
            assert record["status"] in {"done", "failed"}
        if record["status"] in {"done", "failed"}:
            seen_final = record["status"]


def test_a_field_a_source_does_not_carry_is_left_as_it_is() -> None:
    record = merge(None, Observation("c", Source.DETAIL, at(0), "done", {"user_id": "u1", "main_language": "en"}))
    record = merge(record, Observation("c", Source.DETAIL, at(1), "done", {"user_id": None, "agent_id": "a"}))
    assert record["user_id"] == "u1"
    assert record["main_language"] == "en"
    assert record["agent_id"] == "a"


def test_a_poorer_source_only_fills_empty_fields() -> None:
    record = merge(None, Observation("c", Source.TRANSCRIPTION_WEBHOOK, at(0), "done", {"call_duration_secs": 61.0}))
    record = merge(
        record,
        Observation("c", Source.LIST_SUMMARY, at(1), "done", {"call_duration_secs": 60.0, "main_language": "de"}),
    )
    assert record["call_duration_secs"] == 61.0
    assert record["main_language"] == "de"
    assert record["first_seen_via"] == "webhook"
    assert record["reconciled_at"] == at(1)


def test_a_richer_source_replaces_a_poorer_one() -> None:
    record = merge(None, Observation("c", Source.LIST_SUMMARY, at(0), "done", {"call_duration_secs": 60.0}))
    assert record["complete"] is False
    record = merge(record, Observation("c", Source.DETAIL, at(1), "done", {"call_duration_secs": 61.0}))
    assert record["call_duration_secs"] == 61.0
    assert record["complete"] is True


@pytest.mark.parametrize("source", [Source.DETAIL, Source.TRANSCRIPTION_WEBHOOK])
def test_a_failure_webhook_never_erases_what_a_detail_or_transcription_brought_whatever_the_order(
    source: Source,
) -> None:
    done = Observation("c", source, at(0), "done", {**FINAL, "start_time_unix_secs": 1_760_000_000})
    failed = Observation(
        "c",
        Source.FAILURE_WEBHOOK,
        at(1),
        "failed",
        {
            "agent_id": "agent_other",
            "failure_reason": "busy",
            "start_time_unix_secs": 1_760_000_500,
            "metadata": {"type": "sip", "body": {"sip_status_code": 486}},
        },
    )
    first, second = fold([done, failed]), fold([failed, done])
    provenance = {"first_seen_at", "first_seen_via", "webhook_received_at", "reconciled_at"}
    assert {k: v for k, v in first.items() if k not in provenance} == {
        k: v for k, v in second.items() if k not in provenance
    }
    assert first["status"] == "done" and first["complete"] is True
    assert {name: first[name] for name in FINAL} == FINAL  # everything the detail or transcription brought
    assert first["failure_reason"] == "busy"  # and what only the failure carries


def failed_lifecycle() -> list[Observation]:
    """A call that never connected: its failure webhook and its detail disagree on `metadata`."""
    return [
        Observation("c2", Source.LIST_SUMMARY, at(10), "failed", {"agent_id": "agent_1", "call_duration_secs": 0.0}),
        Observation(
            "c2",
            Source.FAILURE_WEBHOOK,
            at(20),
            "failed",
            {"agent_id": "agent_1", "failure_reason": "busy", "metadata": {"type": "sip", "sip_status_code": 486}},
        ),
        Observation(
            "c2", Source.DETAIL, at(30), "failed", {"agent_id": "agent_1", "metadata": {"call_duration_secs": 0}}
        ),
    ]


@given(st.permutations(failed_lifecycle()))
def test_a_failed_call_converges_whichever_of_its_webhook_and_detail_comes_last(shuffled: list[Observation]) -> None:
    record = fold(shuffled)
    assert record == fold(failed_lifecycle())
    assert record["metadata"] == {"type": "sip", "sip_status_code": 486}  # the webhook's, as in an ordered delivery
    assert record["failure_reason"] == "busy"  # which only the webhook carries
    assert record["complete"] is True


def test_a_failure_webhook_alone_is_complete_and_outranks_its_calls_summary() -> None:
    """A call that never connected has nothing more to fetch; its own account beats the list's."""
    summary = Observation("c", Source.LIST_SUMMARY, at(0), "failed", {"agent_id": "a", "start_time_unix_secs": 10})
    failed = Observation("c", Source.FAILURE_WEBHOOK, at(1), "failed", {"start_time_unix_secs": 12})
    assert merge(None, summary)["complete"] is False  # a summary is not the detail, failed or not
    for order in ([summary, failed], [failed, summary]):
        record = fold(order)
        assert (record["complete"], record["start_time_unix_secs"], record["agent_id"]) == (True, 12, "a")


@given(st.permutations([obs for obs in lifecycle() if obs.status == "done" and obs.source != Source.LIST_SUMMARY]))
def test_a_webhook_and_a_detail_that_differ_converge_to_the_webhook(shuffled: list[Observation]) -> None:
    """In an ordered delivery the webhook completes the record and the detail is never fetched: a race that
    brings both must end the same way."""
    other = {**FINAL, "analysis": {**FINAL["analysis"], "evaluation_criteria_results": {}}}
    detail = Observation("c1", Source.DETAIL, at(120), "done", other)
    record = fold([detail if obs.source == Source.DETAIL else obs for obs in shuffled])
    assert record["analysis"] == FINAL["analysis"]


@pytest.mark.parametrize("source", list(Source))
def test_a_new_record_holds_every_field_with_a_value_wherever_one_is_required(source: Source) -> None:
    record = merge(None, Observation("c", source, at(0), None, {}))
    assert set(record) == {entry.name for entry in FIELDS} | BOOKKEEPING
    for entry in FIELDS:
        assert entry.nullable or record[entry.name] is not None, entry.name
        value = record[entry.name]
        assert not entry.choices or value in entry.choices or (entry.nullable and value is None), entry.name
    assert record["audio_stored"] is False and record["complete"] is False


@pytest.mark.parametrize("name", [entry.name for entry in FIELDS if not entry.content])
def test_a_source_cannot_set_what_is_not_content(name: str) -> None:
    """Status, labels, audio and provenance have their own rules above; a source's fields never overwrite them."""
    with pytest.raises(ValueError, match=name):
        merge(None, Observation("c", Source.DETAIL, at(0), "done", {name: "x"}))


@pytest.mark.parametrize("status", [None, "done"])
def test_an_otel_transcription_updates_agent_status_and_times_but_never_completes(status: str | None) -> None:
    fields = {"agent_id": "agent_1", "start_time_unix_secs": 1_760_000_000, "call_duration_secs": 41}
    record = merge(None, Observation("c", Source.OTEL_WEBHOOK, at(0), status, fields))
    assert {name: record[name] for name in fields} == fields
    assert (record["status"], record["complete"], record["first_seen_via"]) == (status, False, "webhook")
    record = merge(record, Observation("c", Source.DETAIL, at(1), "done", {"call_duration_secs": 42}))
    assert (record["call_duration_secs"], record["complete"]) == (42, True)
    assert merge(record, Observation("c", Source.OTEL_WEBHOOK, at(2), status, fields)) == {
        **record,
        "webhook_received_at": at(0),
    }


def test_revision_is_one_for_a_new_record_and_one_more_per_content_change() -> None:
    record = merge(None, Observation("c", Source.SESSION, at(0), "initiated", {"agent_id": "a"}))
    assert revised(None, record) == 1
    record["revision"] = 1
    listed = merge(record, Observation("c", Source.LIST_SUMMARY, at(1), "initiated", {"agent_id": "a"}))
    assert listed["reconciled_at"] == at(1)
    assert revised(record, listed) == 1  # only a provenance time moved
    done = merge(listed, Observation("c", Source.DETAIL, at(2), "done", {"agent_id": "a"}))
    assert revised(record, done) == 2
    stored = merge(done, Observation("c", Source.AUDIO_FETCH, at(3), None, {}, audio=Audio("audio/c.mp3", 3)))
    assert revised({**done, "revision": 2}, stored) == 3  # audio becoming stored is a change


@given(st.permutations(lifecycle()))
def test_merging_the_same_observation_again_changes_nothing(shuffled: list[Observation]) -> None:
    record = fold(shuffled)
    record["revision"] = 7
    for obs in shuffled:
        assert revised(record, merge(record, obs)) == 7
