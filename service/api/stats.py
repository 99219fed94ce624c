"""`GET /v1/stats`: how conversations arrived, per agent and UTC day of their start time, in one GROUP BY.

What each count means, from the record's fields (record/fields.py, record/merge.py):

- `conversations`: records whose `start_time_unix_secs` falls on that day (a failed initiation's start is its
  failure event's time). A record without a start time — a session whose call never reported back — has no day
  and is not counted.
- `by_webhook`: a webhook of any kind (transcription, OTel, audio, failure) brought it: `webhook_received_at` is
  set. That is "the webhook did its job", whichever channel saw the conversation first (a session record that a
  webhook then completed counts here).
- `reconcile_only`: what the webhooks missed. No webhook ever brought it (`webhook_received_at` is null) and the
  reconciler listed or fetched it (`reconciled_at` is set). A session record neither has seen is in neither
  count, so `conversations >= by_webhook + reconcile_only`.
- `failed_initiations`: calls that never took place: `status` is `failed` (the failure webhook's, or ElevenLabs'
  own when only the reconciler saw it). A failure webhook for a call that did take place leaves the status `done`
  (merge.py), so it is not counted.
- `with_audio`: postcall holds the audio (`audio_stored`), not ElevenLabs' `has_audio` flag.

The window is the last `days` UTC days, today included: starts from midnight UTC `days - 1` days ago up to the
end of today. The day of a start time is its whole-day count since the epoch (integer division on both databases;
starts in the window are positive), turned into a date here, so no dialect's date functions are involved.

Every column the query reads is in one index, `ix_conversation_coverage` (migration 0011), start time first: the
window is one range of it and no table row is read (PostgreSQL: where the visibility map allows).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.api.query_params import only_parameters, whole_number
from service.storage.tables import Conversation

conversations: sa.Table = Conversation.__table__  # type: ignore[attr-defined]

DEFAULT_DAYS = 30
MAX_DAYS = 366
SECONDS_PER_DAY = 86_400
COUNTS = ("conversations", "by_webhook", "reconcile_only", "failed_initiations", "with_audio")


@dataclass(frozen=True)
class DayCounts:
    agent_id: str | None
    day: str  # YYYY-MM-DD, UTC
    conversations: int
    by_webhook: int
    reconcile_only: int
    failed_initiations: int
    with_audio: int


@dataclass(frozen=True)
class Stats:
    days: list[DayCounts]  # newest day first, then by agent_id (null last)

    @property
    def totals(self) -> dict[str, int]:
        return {name: sum(getattr(row, name) for row in self.days) for name in COUNTS}

    def as_json(self) -> dict[str, Any]:
        return {"days": [asdict(row) for row in self.days], "totals": self.totals}


def parse_days(params: Iterable[tuple[str, str]]) -> int:
    """`days` (default 30, 1 to 366); any other parameter, or a repeat, is a QueryError (422)."""
    given = only_parameters(params, ("days",))
    return whole_number("days", given["days"], MAX_DAYS) if "days" in given else DEFAULT_DAYS


def window(days: int, now: float) -> tuple[int, int]:
    """[first second, end) of the last `days` UTC days, today included."""
    today = int(now) // SECONDS_PER_DAY
    return (today - days + 1) * SECONDS_PER_DAY, (today + 1) * SECONDS_PER_DAY


def daily_stats(conn: Connection, days: int, now: float) -> Stats:
    start_from, end = window(days, now)
    c = conversations.c
    # A literal, not a bound value: the SELECT and the GROUP BY must hold the same expression for PostgreSQL.
    day = (c.start_time_unix_secs // sa.literal_column(str(SECONDS_PER_DAY), sa.BigInteger)).label("day")
    no_webhook = c.webhook_received_at.is_(None)
    conditions = {
        "by_webhook": c.webhook_received_at.is_not(None),
        "reconcile_only": sa.and_(no_webhook, c.reconciled_at.is_not(None)),
        "failed_initiations": c.status == "failed",
        "with_audio": c.audio_stored.is_(True),
    }
    query = (
        sa.select(
            c.agent_id,
            day,
            sa.func.count().label("conversations"),
            *(sa.func.sum(sa.case((condition, 1), else_=0)).label(name) for name, condition in conditions.items()),
        )
        .where(c.start_time_unix_secs >= start_from, c.start_time_unix_secs < end)
        .group_by(c.agent_id, day)
    )
    rows = [
        DayCounts(
            agent_id=row["agent_id"],
            day=_date(int(row["day"])).isoformat(),
            **{name: int(row[name] or 0) for name in COUNTS},
        )
        for row in conn.execute(query).mappings()
    ]
    rows.sort(key=lambda row: (row.agent_id is None, row.agent_id or ""))
    rows.sort(key=lambda row: row.day, reverse=True)
    return Stats(rows)


def _date(day_number: int) -> date:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(days=day_number)).date()
