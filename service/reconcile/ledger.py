"""The reconciler's ledger: the database side of a run — the lease, each agent's checkpoint, the run record.

- The lease (`reconcile_lease`, one row) makes it one run at a time per database; a run renews it while it works
  and a crashed run's lease expires after LEASE_TTL_SECONDS.
- A checkpoint (`reconcile_checkpoint`) is where the next run's window starts (see windows.py): one for the whole
  workspace (the key WORKSPACE), or one per agent for runs that name agents.
- Each run is a row of `reconcile_run`: started `running`, finished `succeeded` or `failed` with its `Report`.
- A conversation whose detail answers 404 is counted in `reconcile_not_found`, once per run; after
  GIVE_UP_AFTER_RUNS runs it is given up (reported, and it no longer holds the checkpoint) instead of failing
  every run for ever.
- A conversation whose audio fetch failed is counted in `reconcile_audio_attempt`, once per run: later runs try it
  again, and after AUDIO_TRIES runs it is given up (`audio_failed`). It never holds a checkpoint.

A run's counts are listed once, in `RunCounts` (storage/tables.py): the run record's count columns, `Counts`, the
`--json` object, the summary and `tables.RUN_FIELDS` (what `GET /v1/reconcile/runs` serves) follow it. Every function
takes a Connection inside a transaction the caller owns (the reconciler runs them in a worker thread).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.reconcile.windows import Window
from service.storage.db import insert_ignoring_conflict
from service.storage.tables import (
    RUN_COUNTS,
    ReconcileAudioAttempt,
    ReconcileCheckpoint,
    ReconcileLease,
    ReconcileNotFound,
    ReconcileRun,
    RunCounts,
)

LEASE_NAME = "reconcile"
LEASE_TTL_SECONDS = 600
LEASE_RENEW_SECONDS = 60
# Five runs of an hourly cron: a detail that ElevenLabs lists but still cannot find by then is not coming back.
GIVE_UP_AFTER_RUNS = 5
# Five runs too for a recording: its failures are more often ElevenLabs refusing that one file (a 400, a 403) than
# an outage, and a conversation's record is whole without it.
AUDIO_TRIES = 5
# The checkpoint of a run that lists the whole workspace (no agent filter); no agent id is `*`.
WORKSPACE = "*"

checkpoints: sa.Table = ReconcileCheckpoint.__table__  # type: ignore[attr-defined]
runs: sa.Table = ReconcileRun.__table__  # type: ignore[attr-defined]
leases: sa.Table = ReconcileLease.__table__  # type: ignore[attr-defined]
not_found: sa.Table = ReconcileNotFound.__table__  # type: ignore[attr-defined]
audio_attempts: sa.Table = ReconcileAudioAttempt.__table__  # type: ignore[attr-defined]


class Counts(RunCounts):
    """A run's tally as it goes; RunCounts (storage/tables.py) is the list of its counts."""

    def as_dict(self) -> dict[str, int]:
        return self.model_dump()


COUNTS = RUN_COUNTS


@dataclass
class Report:
    """A run's outcome: its counts and errors, printed as the summary or the `--json` object, and recorded."""

    counts: Counts
    agents: list[str]
    dry_run: bool
    run_id: int | None = None
    details_needed: int = 0  # a dry run's count of the detail calls a real run would make
    errors: list[str] = field(default_factory=list)  # any error fails the run
    warnings: list[str] = field(default_factory=list)  # sentences for a person; the run may still succeed
    upstream_webhook_healthy: bool | None = None  # the post-call webhook as ElevenLabs reports it; None: unknown

    @property
    def ok(self) -> bool:
        return self.counts.failed == 0 and not self.errors

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.counts.as_dict(), "ok": self.ok, "dry_run": self.dry_run, "run_id": self.run_id}
        out["agents"] = self.agents
        if self.dry_run:
            out["details_needed"] = self.details_needed
        out["errors"] = self.errors
        out["warnings"] = self.warnings
        out["upstream_webhook_healthy"] = self.upstream_webhook_healthy
        return out


class LeaseHeld(Exception):
    """Another run holds the lease: the caller exits 3 naming `holder`."""

    def __init__(self, holder: str, expires_at: datetime) -> None:
        super().__init__(f"another reconcile run holds the lease: {holder} (until {expires_at.isoformat()})")
        self.holder = holder
        self.expires_at = expires_at


class LeaseLost(Exception):
    """Our lease expired and someone else took it: stop before writing further."""


def default_holder() -> str:
    return f"{socket.gethostname()} pid {os.getpid()} run {uuid.uuid4().hex[:8]}"


# --- the lease ---------------------------------------------------------------------------------------------------


def acquire_lease(conn: Connection, holder: str, now: datetime, ttl: int = LEASE_TTL_SECONDS) -> None:
    """Take the lease, or take over an expired one; LeaseHeld otherwise."""
    expires = now + timedelta(seconds=ttl)
    row = {"name": LEASE_NAME, "holder": holder, "acquired_at": now, "expires_at": expires}
    if insert_ignoring_conflict(conn, leases, row, "name"):
        return
    taken = conn.execute(
        sa.update(leases)
        .where(leases.c.name == LEASE_NAME, leases.c.expires_at < now)
        .values(holder=holder, acquired_at=now, expires_at=expires)
    )
    if taken.rowcount == 1:
        return
    current = conn.execute(sa.select(leases.c.holder, leases.c.expires_at).where(leases.c.name == LEASE_NAME)).one()
    raise LeaseHeld(current.holder, current.expires_at)


def renew_lease(conn: Connection, holder: str, now: datetime, ttl: int = LEASE_TTL_SECONDS) -> None:
    renewed = conn.execute(
        sa.update(leases)
        .where(leases.c.name == LEASE_NAME, leases.c.holder == holder)
        .values(expires_at=now + timedelta(seconds=ttl))
    )
    if renewed.rowcount != 1:
        raise LeaseLost(f"the reconcile lease of {holder} was taken over")


def release_lease(conn: Connection, holder: str) -> None:
    conn.execute(sa.delete(leases).where(leases.c.name == LEASE_NAME, leases.c.holder == holder))


# --- checkpoints -------------------------------------------------------------------------------------------------


def read_checkpoint(conn: Connection, agent_id: str) -> int | None:
    value = conn.execute(sa.select(checkpoints.c.checkpoint_unix).where(checkpoints.c.agent_id == agent_id)).scalar()
    return int(value) if value is not None else None


def read_workspace_checkpoint(conn: Connection) -> int | None:
    """The whole workspace's checkpoint. Before the first whole-workspace run, the oldest per-agent checkpoint
    (from runs that listed agent by agent) stands for it: every conversation of those agents before it is stored,
    and starting there re-lists nothing older than any of them needs."""
    value = read_checkpoint(conn, WORKSPACE)
    if value is not None:
        return value
    oldest = conn.execute(sa.select(sa.func.min(checkpoints.c.checkpoint_unix))).scalar()
    return int(oldest) if oldest is not None else None


def write_checkpoint(conn: Connection, agent_id: str, checkpoint: int, now: datetime) -> None:
    row = {"agent_id": agent_id, "checkpoint_unix": checkpoint, "updated_at": now}
    if not insert_ignoring_conflict(conn, checkpoints, row, "agent_id"):
        conn.execute(
            sa.update(checkpoints)
            .where(checkpoints.c.agent_id == agent_id)
            .values(checkpoint_unix=checkpoint, updated_at=now)
        )


# --- run records -------------------------------------------------------------------------------------------------


def start_run(conn: Connection, holder: str, now: datetime) -> int:
    values = {"started_at": now, "status": "running", "holder": holder, "dry_run": False, **Counts().as_dict()}
    run_id = conn.execute(sa.insert(runs).values(values).returning(runs.c.id)).scalar_one()
    return int(run_id)


def finish_run(conn: Connection, run_id: int, report: Report, windows: list[Window], now: datetime) -> None:
    conn.execute(
        sa.update(runs)
        .where(runs.c.id == run_id)
        .values(
            finished_at=now,
            status="succeeded" if report.ok else "failed",
            agents=report.agents,
            window_start_unix=min((w.start for w in windows), default=None),
            window_end_unix=max((w.end for w in windows), default=None),
            error="\n".join(report.errors) or None,
            warnings=report.warnings,
            upstream_webhook_healthy=report.upstream_webhook_healthy,
            **report.counts.as_dict(),
        )
    )


# --- details that answer 404 -------------------------------------------------------------------------------------


def count_not_found(conn: Connection, conversation_ids: Sequence[str], run_id: int, now: datetime) -> dict[str, int]:
    """One more run that met a 404 for each of `conversation_ids` (a run counts once, however often it asks);
    returns each one's number of such runs. One run at a time holds the lease, so nobody else writes these rows."""
    ids = sorted(set(conversation_ids))
    query = sa.select(not_found.c.conversation_id, not_found.c.runs, not_found.c.last_run_id)
    known = {row.conversation_id: row for row in conn.execute(query.where(not_found.c.conversation_id.in_(ids)))}
    runs: dict[str, int] = {}
    for conversation_id in ids:
        row = known.get(conversation_id)
        if row is None:
            values = {"runs": 1, "last_run_id": run_id, "first_at": now, "last_at": now}
            conn.execute(sa.insert(not_found).values(conversation_id=conversation_id, **values))
            runs[conversation_id] = 1
        elif row.last_run_id == run_id:
            runs[conversation_id] = row.runs
        else:
            counted = not_found.update().where(not_found.c.conversation_id == conversation_id)
            conn.execute(counted.values(runs=row.runs + 1, last_run_id=run_id, last_at=now))
            runs[conversation_id] = row.runs + 1
    return runs


def given_up_among(conn: Connection, conversation_ids: Sequence[str]) -> set[str]:
    """Those of `conversation_ids` whose detail answered 404 in GIVE_UP_AFTER_RUNS runs: not asked for again."""
    query = sa.select(not_found.c.conversation_id).where(
        not_found.c.conversation_id.in_(conversation_ids), not_found.c.runs >= GIVE_UP_AFTER_RUNS
    )
    return set(conn.execute(query).scalars())


def forget_not_found(conn: Connection, conversation_ids: Sequence[str]) -> None:
    """Their details were found after all: the count starts again should one go missing later."""
    conn.execute(sa.delete(not_found).where(not_found.c.conversation_id.in_(conversation_ids)))


# --- audio fetches that failed -------------------------------------------------------------------------------------


def count_audio_try(conn: Connection, conversation_id: str, run_id: int, error: str, now: datetime) -> int:
    """One more run that failed to fetch this conversation's audio (a run counts once); returns its tries so far."""
    row = conn.execute(
        sa.select(audio_attempts.c.tries, audio_attempts.c.last_run_id).where(
            audio_attempts.c.conversation_id == conversation_id
        )
    ).first()
    if row is None:
        values = {"tries": 1, "last_run_id": run_id, "last_error": error, "first_at": now, "last_at": now}
        conn.execute(sa.insert(audio_attempts).values(conversation_id=conversation_id, **values))
        return 1
    tries = row.tries if row.last_run_id == run_id else row.tries + 1
    tried = audio_attempts.update().where(audio_attempts.c.conversation_id == conversation_id)
    conn.execute(tried.values(tries=tries, last_run_id=run_id, last_error=error, last_at=now))
    return int(tries)


def audio_to_retry(conn: Connection, run_id: int, limit: int) -> list[str]:
    """Conversations whose audio failed in earlier runs and has tries left, oldest failure first; those this run
    already tried are not among them."""
    query = (
        sa.select(audio_attempts.c.conversation_id)
        .where(audio_attempts.c.tries < AUDIO_TRIES, audio_attempts.c.last_run_id != run_id)
        .order_by(audio_attempts.c.first_at, audio_attempts.c.conversation_id)
        .limit(limit)
    )
    return list(conn.execute(query).scalars())


def audio_given_up_among(conn: Connection, conversation_ids: Sequence[str]) -> set[str]:
    """Those of `conversation_ids` whose audio failed in AUDIO_TRIES runs: not asked for again."""
    query = sa.select(audio_attempts.c.conversation_id).where(
        audio_attempts.c.conversation_id.in_(conversation_ids), audio_attempts.c.tries >= AUDIO_TRIES
    )
    return set(conn.execute(query).scalars())


def forget_audio_tries(conn: Connection, conversation_ids: Sequence[str]) -> None:
    """Their audio is stored now: nothing left to try."""
    conn.execute(sa.delete(audio_attempts).where(audio_attempts.c.conversation_id.in_(conversation_ids)))
