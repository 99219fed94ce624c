"""Forwarding to webhook endpoints, end to end: real receivers verifying signatures with `standardwebhooks`, the
real dispatcher, SQLite and PostgreSQL."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from service.forward import deliveries
from service.forward.dispatcher import MARGIN, Dispatcher
from service.record.merge import Observation
from service.storage.db import transaction
from tests.support import records
from tests.support.forwarding import (
    FORWARD_SECRET,
    QUICK,
    Receiver,
    by_revision,
    dispatching,
    lease,
    quick_timing,
    receiving,
    table_rows,
    wait_until,
    webhook_sink,
)


def lifecycle(conversation_id: str, data_dir: Path, agent_id: str = "agent_1") -> list[list[Observation]]:
    """Three changes of one conversation, each its own commit: opened, transcribed, audio stored."""
    return [
        [records.session(conversation_id, agent_id=agent_id, user_id="u-1")],
        [records.detail(conversation_id, agent_id=agent_id)],
        [records.audio(conversation_id, data_dir, b"ID3 audio", agent_id=agent_id)],
    ]


def commit_all(engine: Engine, ids: list[str], data_dir: Path) -> None:
    """Every conversation's changes, interleaved across conversations, one commit each."""
    steps = [lifecycle(conversation_id, data_dir) for conversation_id in ids]
    for stage in range(3):
        for step in steps:
            records.store(engine, step[stage], now=datetime.now(UTC))


def event_count(engine: Engine) -> int:
    return len(table_rows(engine, "SELECT id FROM forward_event"))


def test_every_change_arrives_signed_in_revision_order_without_gaps(engine: Engine, tmp_path: Path) -> None:
    ids = [f"conv_order{n}" for n in range(12)]
    receiver = Receiver()
    with receiving(receiver) as url, dispatching(engine, [webhook_sink(url)]):
        commit_all(engine, ids[:6], tmp_path)  # some before the dispatcher has caught up…
        commit_all(engine, ids[6:], tmp_path)  # …and some while it sends
        wait_until(lambda: delivered(engine) == 36, what="36 events")
    assert receiver.unverified == 0
    order = by_revision(receiver.keys())
    assert set(order) == set(ids)
    for conversation_id in ids:
        assert order[conversation_id] == [1, 2, 3], conversation_id  # once each, in order, no gap
    first = next(item for item in receiver.received if item.key == (ids[0], 1))
    assert first.event["type"] == "conversation.created"
    assert first.event["data"]["conversation"]["user_id"] == "u-1"
    assert first.headers["webhook-id"] == first.event["id"]
    assert first.headers["webhook-signature"].startswith("v1,")
    third = next(item for item in receiver.received if item.key == (ids[0], 3))
    assert third.event["type"] == "conversation.updated" and "audio_stored" in third.event["data"]["changed"]
    # Each delivery was one attempt, recorded as such.
    attempts = table_rows(engine, "SELECT outcome, status_code FROM forward_attempt")
    assert len(attempts) == 36 and {tuple(row) for row in attempts} == {("delivered", 200)}


def test_a_sink_that_fails_then_times_out_then_recovers_gets_everything(engine: Engine, tmp_path: Path) -> None:
    script = [500, 500, "slow", 503]  # then 200 for ever

    def flaky(event: dict[str, Any]) -> int:
        step = script.pop(0) if script else 200
        if step == "slow":
            time.sleep(4.0)  # longer than the sink's deadline below: the attempt times out
            return 504  # (too late for anyone to hear it)
        assert isinstance(step, int)
        return step

    receiver = Receiver(answer=flaky)
    with receiving(receiver) as url, dispatching(engine, [webhook_sink(url, deadline=2.0)]):
        # The deadline leaves a loaded machine time to answer the other attempts: only "slow" may time out.
        commit_all(engine, ["conv_flaky"], tmp_path)
        wait_until(lambda: delivered(engine) == 3, what="recovery")
    assert receiver.keys() == [("conv_flaky", 1), ("conv_flaky", 2), ("conv_flaky", 3)]
    attempts = table_rows(
        engine,
        "SELECT a.outcome, a.status_code, a.error, a.next_attempt_at FROM forward_attempt a "
        "JOIN forward_delivery d ON d.id = a.delivery WHERE d.revision = 1 ORDER BY a.id",
    )
    outcomes = [(row[0], row[1]) for row in attempts]
    assert outcomes == [("failed", 500), ("failed", 500), ("failed", None), ("failed", 503), ("delivered", 200)]
    assert "no answer within 2 s" in attempts[2][2]
    assert all(row[3] is not None for row in attempts[:4]) and attempts[4][3] is None
    # Revisions 2 and 3 waited for revision 1 instead of overtaking it: one attempt each.
    assert len(table_rows(engine, "SELECT id FROM forward_attempt")) == 7


def test_a_dead_sink_holds_back_neither_another_sink_nor_other_conversations(engine: Engine, tmp_path: Path) -> None:
    dead = Receiver(answer=lambda event: 500)
    stuck_conversation = "conv_poison"
    picky = Receiver(answer=lambda event: 500 if event["data"]["conversation_id"] == stuck_conversation else 200)
    with (
        receiving(dead) as dead_url,
        receiving(picky) as picky_url,
        dispatching(engine, [webhook_sink(dead_url), webhook_sink(picky_url)]),
    ):
        commit_all(engine, [stuck_conversation, "conv_a", "conv_b"], tmp_path)
        wait_until(lambda: len(picky.keys()) >= 6, what="the healthy conversations")
        wait_until(lambda: len(dead.refused) >= 3, what="the dead sink being tried")
    order = by_revision(picky.keys())
    assert order == {"conv_a": [1, 2, 3], "conv_b": [1, 2, 3]}
    # The failing conversation's later revisions were never sent ahead of its first.
    assert {event["data"]["revision"] for event in picky.refused} == {1}
    assert {event["data"]["revision"] for event in dead.refused} == {1}


def test_a_dead_delivery_no_longer_holds_its_conversation(engine: Engine, tmp_path: Path) -> None:
    """After the last retry a delivery is dead; the conversation's next revisions then go out."""
    schedule = type(QUICK)(delays=(0.05,), then_every=0.05, give_up_after=0.3, jitter=0.0)
    receiver = Receiver(answer=lambda event: 500 if event["data"]["revision"] == 1 else 200)
    with receiving(receiver) as url, dispatching(engine, [webhook_sink(url)], quick_timing(schedule=schedule)):
        commit_all(engine, ["conv_dies"], tmp_path)
        wait_until(lambda: delivered(engine) == 2, what="revisions 2 and 3")
    assert receiver.keys() == [("conv_dies", 2), ("conv_dies", 3)]
    with engine.connect() as conn:
        (report,) = deliveries.status(conn, [webhook_sink(url).name])
    assert report.dead == 1 and report.pending == 0 and report.last_error == "HTTP 500"


def test_replay_sends_the_same_events_again_to_the_sink_named(engine: Engine, tmp_path: Path) -> None:
    first, second = Receiver(), Receiver()
    with receiving(first) as url_a, receiving(second) as url_b:
        sinks = [webhook_sink(url_a), webhook_sink(url_b)]
        with dispatching(engine, sinks):
            commit_all(engine, ["conv_replay"], tmp_path)
            wait_until(lambda: delivered(engine) == 6, what="first delivery")
            events_before = event_count(engine)
            since = datetime.now(UTC) - timedelta(hours=1)
            replayed = transaction(
                engine, lambda conn: deliveries.replay(conn, [sinks[0].name], since, datetime.now(UTC))
            )
            assert replayed == 3
            wait_until(lambda: len(first.keys()) == 6, what="the replay")
    assert first.ids()[3:] == first.ids()[:3]  # the same ids, in revision order again
    assert len(second.keys()) == 3  # the other sink was not named
    assert event_count(engine) == events_before  # nothing added to the feed


def test_retention_deletes_only_what_every_sink_delivered(engine: Engine, tmp_path: Path) -> None:
    healthy = Receiver()
    picky = Receiver(answer=lambda event: 500 if event["data"]["conversation_id"] == "conv_keep" else 200)
    with receiving(healthy) as url_a, receiving(picky) as url_b:
        sinks = [webhook_sink(url_a), webhook_sink(url_b)]
        with dispatching(engine, sinks) as dispatcher:
            commit_all(engine, ["conv_keep", "conv_go"], tmp_path)
            wait_until(lambda: len(picky.keys()) == 3 and len(healthy.keys()) == 6, what="deliveries")
            commit_all(engine, ["conv_late"], tmp_path)  # too new to be deleted
            wait_until(lambda: len(healthy.keys()) == 9, what="the late ones")
            names = [sink.name for sink in sinks]
            later = Dispatcher(engine, [], retention_seconds=600, timing=quick_timing(clock=lambda: _in(0.0)))
            assert later.prune_once(names) == 0  # nothing older than the retention yet
            pruned = Dispatcher(engine, [], retention_seconds=60, timing=quick_timing(clock=lambda: _in(3600)))
            cutoff_commit = table_rows(
                engine, "SELECT max(committed_at) FROM forward_event WHERE conversation_id = 'conv_go'"
            )
            assert cutoff_commit
            deleted = pruned.prune_once(names)
            assert dispatcher is not None
    kept = {row[0] for row in table_rows(engine, "SELECT DISTINCT conversation_id FROM forward_event")}
    assert "conv_keep" in kept  # undelivered to one sink: never deleted
    assert "conv_go" not in kept and deleted >= 3
    orphans = table_rows(
        engine,
        "SELECT count(*) FROM forward_delivery d WHERE NOT EXISTS (SELECT 1 FROM forward_event e WHERE e.id = d.event)",
    )
    assert orphans[0][0] == 0


def delivered(engine: Engine) -> int:
    return len(table_rows(engine, "SELECT id FROM forward_delivery WHERE status = 'delivered'"))


def _in(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_dispatchers_on_one_postgres_never_send_one_event_twice_at_once(engine: Engine, tmp_path: Path) -> None:
    receiver = Receiver(delay=0.05)
    ids = [f"conv_race{n}" for n in range(20)]
    with receiving(receiver) as url, dispatching(engine, [webhook_sink(url)]), dispatching(engine, [webhook_sink(url)]):
        commit_all(engine, ids, tmp_path)
        wait_until(lambda: delivered(engine) == 60, what="60 events")
    assert receiver.overlapping == []
    order = by_revision(receiver.keys())
    assert all(order[conversation_id] == [1, 2, 3] for conversation_id in ids)
    # Each delivery was claimed by one dispatcher and sent once.
    assert len(table_rows(engine, "SELECT id FROM forward_attempt")) == 60


def test_a_claim_that_waits_past_its_lease_for_a_connection_is_given_back_unsent(
    engine: Engine, tmp_path: Path
) -> None:
    # One connection each and a slow endpoint: a dispatcher claims more than it can send before the lease leaves
    # room (start_within = lease - MARGIN - deadline = 0.2 s). Sent anyway, a claim whose lease ran out would also
    # be taken and sent by the other dispatcher: the same event twice, at once.
    receiver = Receiver(delay=0.5)
    ids = [f"conv_wait{n}" for n in range(20)]
    for conversation_id in ids:
        records.store(engine, [records.session(conversation_id, agent_id="agent_1")], now=datetime.now(UTC))
    timing = quick_timing(lease=lease(MARGIN + 2.0 + 0.2))
    with (
        receiving(receiver) as url,
        dispatching(engine, [webhook_sink(url, concurrency=1, deadline=2.0)], timing),
        dispatching(engine, [webhook_sink(url, concurrency=1, deadline=2.0)], timing),
    ):
        wait_until(lambda: delivered(engine) == len(ids), timeout=60, what="every event")
    assert receiver.overlapping == []
    assert sorted(receiver.keys()) == sorted((conversation_id, 1) for conversation_id in ids)  # each once
    # What was given back unsent cost no attempt.
    assert len(table_rows(engine, "SELECT id FROM forward_attempt")) == len(ids)


def test_the_forward_secret_is_the_standard_webhooks_one() -> None:
    assert FORWARD_SECRET.startswith("whsec_")
    assert sa is not None
