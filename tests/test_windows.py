"""Window arithmetic and `--since` parsing: pure, so checked over many inputs with hypothesis."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.reconcile.windows import (
    DEFAULT_OVERLAP_SECONDS,
    FIRST_RUN_LOOKBACK_SECONDS,
    PENDING_HORIZON_SECONDS,
    Window,
    WindowError,
    check_bounds,
    next_checkpoint,
    parse_duration,
    parse_instant,
    plan_window,
)

NOW = 1_780_000_000
unix = st.integers(min_value=10 * 86400, max_value=4_000_000_000)


def test_since_accepts_a_duration_back_from_now() -> None:
    assert parse_instant("7d", NOW) == NOW - 7 * 86400
    assert parse_instant("12h", NOW) == NOW - 12 * 3600
    assert parse_instant("2w", NOW) == NOW - 14 * 86400


def test_since_accepts_iso_8601_with_or_without_zone() -> None:
    assert parse_instant("2026-01-31T12:00:00Z", NOW) == int(datetime(2026, 1, 31, 12, tzinfo=UTC).timestamp())
    assert parse_instant("2026-01-31T14:00:00+02:00", NOW) == parse_instant("2026-01-31T12:00:00", NOW)
    assert parse_instant("2026-01-31", NOW) == int(datetime(2026, 1, 31, tzinfo=UTC).timestamp())


def test_since_accepts_unix_seconds() -> None:
    assert parse_instant("1767225600", NOW) == 1_767_225_600


@pytest.mark.parametrize("text", ["", "yesterday", "7 days", "-5", "7x", "2026-13-01", "1.5d", "d7"])
def test_malformed_times_say_which_forms_work(text: str) -> None:
    with pytest.raises(WindowError, match=r"7d|empty|duration"):
        parse_instant(text, NOW)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from("smhdw"))
def test_durations_scale_by_their_unit(n: int, unit: str) -> None:
    assert parse_duration(f"{n}{unit}") == n * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]


@given(unix)
def test_unix_seconds_and_their_iso_form_are_the_same_instant(t: int) -> None:
    iso = datetime.fromtimestamp(t, UTC).isoformat()
    assert parse_instant(str(t), NOW) == parse_instant(iso, NOW) == t


def test_first_run_looks_back_seven_days() -> None:
    assert plan_window(None, NOW) == Window(NOW - FIRST_RUN_LOOKBACK_SECONDS, NOW)


def test_later_runs_start_an_overlap_before_the_checkpoint() -> None:
    assert plan_window(NOW - 600, NOW) == Window(NOW - 600 - DEFAULT_OVERLAP_SECONDS, NOW)


@given(st.one_of(st.none(), unix), unix, unix)
def test_since_overrides_the_checkpoint_and_until_pins_the_end(checkpoint: int | None, since: int, until: int) -> None:
    if since >= until:
        with pytest.raises(WindowError, match="empty"):
            plan_window(checkpoint, NOW, since=since, until=until)
    else:
        assert plan_window(checkpoint, NOW, since=since, until=until) == Window(since, until)


@given(st.one_of(st.none(), st.integers(0, NOW)), st.integers(0, NOW), st.integers(NOW + 1, 4_000_000_000))
def test_a_window_that_ends_after_now_never_puts_the_checkpoint_after_now(
    previous: int | None, start: int, until: int
) -> None:
    """A `--until` in the future lists what exists; what starts later has not been listed yet."""
    moved = next_checkpoint(previous, Window(start, until), failed_starts=[], now=NOW)
    assert moved is not None and moved <= NOW
    assert moved == NOW or (previous is not None and start > previous)


@pytest.mark.parametrize(
    ("since", "until", "message"),
    [
        (NOW, None, "in the future"),
        (NOW + 86400, NOW + 2 * 86400, "in the future"),
        (NOW - 60, NOW - 120, "--since must be before --until"),
        (NOW - 60, NOW - 60, "--since must be before --until"),
    ],
)
def test_bounds_that_make_an_empty_window_are_usage_errors(since: int, until: int | None, message: str) -> None:
    with pytest.raises(WindowError, match=message):
        check_bounds(since, until, NOW)


def test_bounds_that_leave_a_window_are_fine() -> None:
    check_bounds(None, None, NOW)
    check_bounds(NOW - 60, None, NOW)
    check_bounds(NOW - 60, NOW + 86400, NOW)  # --until in the future: the window ends now
    check_bounds(None, NOW - 86400, NOW)


@given(st.one_of(st.none(), unix), unix, unix)
def test_checkpoint_advances_to_the_end_when_nothing_is_held(previous: int | None, start: int, length: int) -> None:
    window = Window(start, start + length)
    moved = next_checkpoint(previous, window, failed_starts=[])
    if previous is None:
        assert moved == window.end
    elif start > previous:
        assert moved == previous  # the gap before --since was never listed
    else:
        assert moved == max(previous, window.end)


@given(st.one_of(st.none(), unix), unix, st.lists(st.integers(0, 10**6), min_size=1))
def test_checkpoint_never_passes_a_failed_conversation(previous: int | None, start: int, offsets: list[int]) -> None:
    window = Window(start, start + 10**6 + 1)
    failed = [start + offset for offset in offsets]
    moved = next_checkpoint(previous, window, failed_starts=failed)
    assert moved is not None
    # A failure before the stored checkpoint (a --since run over older times) cannot move it back: see below.
    assert moved <= min(failed) or moved == previous


@given(
    unix,
    st.integers(0, 10**6),
    st.integers(1, 10**6),
    st.lists(st.one_of(st.none(), st.integers(-(10**10), 4_000_000_000))),
    st.lists(st.one_of(st.none(), st.integers(-(10**10), 4_000_000_000))),
)
def test_checkpoint_never_moves_backwards(
    previous: int, back: int, length: int, failed: list[int | None], pending: list[int | None]
) -> None:
    window = Window(max(previous - back, 0), previous + length)
    moved = next_checkpoint(previous, window, failed_starts=failed, pending_starts=pending)
    assert moved is not None and moved >= previous


def test_a_conversation_without_a_start_time_holds_the_checkpoint_at_the_window_start_not_at_zero() -> None:
    window = Window(NOW - 7 * 86400, NOW)
    assert next_checkpoint(None, window, failed_starts=[None]) == window.start
    assert next_checkpoint(None, window, failed_starts=[None, NOW - 60]) == window.start
    assert next_checkpoint(NOW - 86400, window, failed_starts=[None]) == NOW - 86400
    recent = Window(NOW - 3600, NOW)  # within the pending horizon: an unfinished one holds it too
    assert next_checkpoint(None, recent, [], pending_starts=[None]) == recent.start


def test_a_start_time_before_the_window_holds_at_the_window_start() -> None:
    """The API listed it in the window, whatever its summary says: holding at 0 would re-list all history."""
    window = Window(NOW - 7 * 86400, NOW)
    assert next_checkpoint(None, window, failed_starts=[0]) == window.start


def test_a_recent_unfinished_conversation_holds_the_checkpoint_but_a_stuck_one_does_not() -> None:
    window = Window(NOW - 7 * 86400, NOW)
    recent, stuck = NOW - 300, NOW - PENDING_HORIZON_SECONDS - 1
    assert next_checkpoint(None, window, [], pending_starts=[recent]) == recent
    assert next_checkpoint(None, window, [], pending_starts=[stuck]) == NOW
