"""Reconcile windows: parsing `--since`/`--until`, choosing a run's window, and where its checkpoint may move. Pure.

A checkpoint `c` for an agent means: every conversation of that agent that started before `c` is stored (final and
complete, or known to be unrecoverable). A run lists `[start, end)`; `end` is pinned at the run's start so that
paging sees a stable set, and the next run re-lists an overlap before the checkpoint to catch conversations
that ElevenLabs lists late.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

DEFAULT_OVERLAP_SECONDS = 3600
FIRST_RUN_LOOKBACK_SECONDS = 7 * 86400
# A conversation still not final this long after it started is taken as stuck: it stops holding the checkpoint back
# (it stays stored from its summary; a wider `--since` run re-checks it).
PENDING_HORIZON_SECONDS = 86400

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d{1,9})([smhdw])")
_UNIX = re.compile(r"\d{1,12}")


class WindowError(ValueError):
    """A `--since`/`--until` value or window that cannot be used; `str()` says why, for the user."""


def parse_duration(text: str) -> int:
    """`90s`, `15m`, `12h`, `7d`, `2w` → seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise WindowError(f"{text!r} is not a duration like 7d, 12h, 30m, 90s or 2w")
    return int(match.group(1)) * _UNITS[match.group(2)]


def parse_instant(text: str, now: int) -> int:
    """A point in time as unix seconds: a duration back from `now` (`7d`), unix seconds, or ISO-8601.

    ISO-8601 without a zone is taken as UTC; a date alone is its midnight UTC.
    """
    value = text.strip()
    if not value:
        raise WindowError("empty time; use e.g. 7d, 2026-01-31T12:00:00Z or 1767225600")
    if _DURATION.fullmatch(value):
        return now - parse_duration(value)
    if _UNIX.fullmatch(value):
        return int(value)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise WindowError(
            f"{text!r} is not a time; use a duration back from now (7d, 12h), ISO-8601 "
            "(2026-01-31T12:00:00Z) or unix seconds (1767225600)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


def check_bounds(since: int | None, until: int | None, now: int) -> None:
    """WindowError, for the user, when `--since`/`--until` make a window that can hold nothing."""
    if since is not None and since >= now:
        raise WindowError(f"--since {_iso(since)} is in the future: there is nothing to reconcile yet")
    if since is not None and until is not None and since >= until:
        raise WindowError("--since must be before --until")


@dataclass(frozen=True)
class Window:
    """Conversations whose start time is in `[start, end)`, unix seconds."""

    start: int
    end: int


def plan_window(
    checkpoint: int | None,
    now: int,
    since: int | None = None,
    until: int | None = None,
    overlap: int = DEFAULT_OVERLAP_SECONDS,
    lookback: int = FIRST_RUN_LOOKBACK_SECONDS,
) -> Window:
    """The window of one agent's run: `--since` wins, else checkpoint minus overlap, else `lookback` back."""
    if since is not None:
        start = since
    elif checkpoint is not None:
        start = checkpoint - overlap
    else:
        start = now - lookback
    end = until if until is not None else now
    if start >= end:
        raise WindowError(f"the window is empty: it starts at {_iso(start)} and ends at {_iso(end)}")
    return Window(max(start, 0), end)


def next_checkpoint(
    previous: int | None,
    window: Window,
    failed_starts: Iterable[int | None],
    pending_starts: Iterable[int | None] = (),
    *,
    now: int | None = None,
) -> int | None:
    """Where the checkpoint goes after a run over `window`.

    - It never moves past a conversation that failed, nor past one that is not final yet (unless stuck for
      longer than PENDING_HORIZON_SECONDS): the next run lists from there again.
    - A conversation held back without a start time (None), or with one before the window, holds at the window's
      start: the API listed it inside the window, and reading it as 0 would make every later run list all history.
    - It never moves backwards: a failure before the stored checkpoint (a `--since` run over older times) leaves
      it where it is. With nothing held back it moves to the window's end, but never across a gap between the old
      checkpoint and a `--since` that starts after it (that gap was not listed), nor past `now` (the run's start):
      a `--until` in the future lists what exists, and what starts later has not been listed yet.
    """
    end = window.end if now is None else min(window.end, now)
    horizon = end - PENDING_HORIZON_SECONDS
    pending = [_within(window, start) for start in pending_starts]
    holds = [*(_within(window, start) for start in failed_starts), *(start for start in pending if start >= horizon)]
    if previous is not None and window.start > previous:
        return previous  # everything held back lies after the unlisted gap, hence after `previous` too
    moved = min(holds) if holds else end
    return moved if previous is None else max(previous, moved)


def _within(window: Window, start: int | None) -> int:
    return window.start if start is None else max(start, window.start)


def _iso(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat().replace("+00:00", "Z")
