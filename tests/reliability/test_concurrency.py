"""`postcall serve --workers 2` and `postcall reconcile`, real processes on one PostgreSQL, take the same
conversations at the same time — the webhooks duplicated and out of order, the reconciler listing and fetching
every one — and each conversation still ends as one record equal to what a single ordered delivery gives."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from service.config import Settings
from service.record import payloads
from service.record.merge import CONTENT_FIELDS, Source
from service.storage.db import create_engine
from service.testing import FakePlatform, Faults, WebhookSender, plan_deliveries, seed_conversations
from service.testing.webhooks import Delivered
from service.web.app import create_app
from tests.reliability.support import (
    Server,
    audio_mismatches,
    records,
    server_env,
    serving,
    settings_with_api_key,
    wait_for,
)
from tests.support.databases import migrated_sqlite
from tests.support.live import live_server
from tests.support.process import ROOT
from tests.support.reconcile import cli_env, reconcile
from tests.support.records import AT, store
from tests.support.webhooks import SECRET

KEY = "concurrency-key"
NOW = int(time.time())
SENDERS = 4  # webhook senders at once, spread by the kernel over the two workers
FAULTS = Faults(drop=0.1, duplicate=0.3, reorder=0.3, seed=23)
# What a user can see of a record; provenance times (and so first_seen_via) tell when, not what, and differ.
COMPARED = ("status", *CONTENT_FIELDS, "labels", "audio_stored", "audio_path", "audio_bytes", "complete")


pytestmark = pytest.mark.usefixtures("tiny_retry_waits")


@pytest.fixture
def platform() -> FakePlatform:
    # Failed conversations are left out: a dropped failure webhook takes its failure_reason and SIP metadata with
    # it (the detail does not carry them), so what they end as depends on what was dropped, not only on order.
    # The order part is pinned by the last test of this file.
    conversations = seed_conversations(60, ("agent_c1", "agent_c2"), now=NOW, processing_share=0.1, seed=31)
    return FakePlatform(api_key=KEY, conversations=conversations)


@pytest.fixture
def fake_url(platform: FakePlatform) -> Iterator[str]:
    with platform.serve() as url:
        yield url


def control(platform: FakePlatform, fake_url: str, tmp_path: Path) -> dict[str, dict[str, Any]]:
    """The records a single ordered delivery gives: every webhook once, in order, then one reconcile run."""
    settings = settings_with_api_key(migrated_sqlite(str(tmp_path / "control.db")), tmp_path / "control-data", KEY)
    with live_server(create_app(settings)) as url:
        _, answers = WebhookSender(f"{url}/webhooks/elevenlabs", SECRET).deliver(platform.events(audio=True))
    assert {answer.status for answer in answers} == {200}
    assert reconcile(settings, fake_url, KEY, "--audio").exit_code == 0
    engine = create_engine(settings.database_url)
    try:
        return records(engine)
    finally:
        engine.dispose()


def send_concurrently(server: Server, sends: list[dict[str, Any]]) -> list[Delivered]:
    """SENDERS threads, each posting every SENDERS-th delivery of the plan in order."""
    sender = WebhookSender(server.webhook_url, SECRET)
    slices = [sends[i::SENDERS] for i in range(SENDERS)]
    with ThreadPoolExecutor(SENDERS) as pool:
        answers = pool.map(lambda part: [sender.send(event) for event in part], slices)
    return [answer for part in answers for answer in part]


def start_reconcile(settings: Settings, fake_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, **cli_env(settings, fake_url, KEY)}
    command = [sys.executable, "-m", "service", "reconcile", "--audio", "--json"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def workers(server: Server) -> list[psutil.Process]:
    """uvicorn's worker processes (spawned by multiprocessing; its resource tracker is a child too)."""
    children = psutil.Process(server.proc.pid).children()
    return [child for child in children if any("spawn_main" in part for part in child.cmdline())]


def archived_events(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM webhook_event")).scalar_one())


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_workers_and_a_reconcile_racing_over_the_same_conversations_give_one_record_each_as_if_in_order(
    database_url: str, platform: FakePlatform, fake_url: str, tmp_path: Path
) -> None:
    expected = control(platform, fake_url, tmp_path)
    plan = plan_deliveries(platform.events(audio=True), FAULTS)
    settings = settings_with_api_key(database_url, tmp_path / "data", KEY)
    platform.latency = 0.1  # so the reconcile's fetches spread over the time the webhooks arrive
    platform.reset_calls()

    env = server_env(database_url, settings.data_dir)
    with serving(env, tmp_path / "serve.log", "--no-migrate", "--workers", "2") as server:
        assert len(workers(server)) == 2
        reconciling = start_reconcile(settings, fake_url)
        # Once it has listed (nothing is stored yet), it fetches every final conversation while the webhooks come.
        wait_for(lambda: bool(platform.calls_to("list")) or reconciling.poll() is not None, "the reconcile to list")
        started = time.monotonic()
        answers = send_concurrently(server, plan.sends)
        webhooks_done = time.monotonic()
        out, err = reconciling.communicate(timeout=120)

    assert reconciling.returncode == 0, err.decode()
    assert {answer.status for answer in answers} == {200}
    fetches = [call for call in platform.calls if call.kind in ("detail", "audio")]
    raced = [call for call in fetches if started <= call.at <= webhooks_done]
    print(
        f"\n{len(plan.sends)} webhooks ({len(plan.sends) - len(set(map(id, plan.sends)))} duplicates, "
        f"{len(plan.dropped)} dropped) to 2 workers in {webhooks_done - started:.1f} s; reconcile: "
        f"{out.decode().strip()}; {len(raced)}/{len(fetches)} of its detail/audio fetches came meanwhile"
    )
    assert raced, "the reconcile did not overlap the webhooks"

    engine = create_engine(database_url)
    try:
        stored = records(engine)
        assert archived_events(engine) == len(set(map(id, plan.sends)))  # a duplicate is archived once
    finally:
        engine.dispose()
    assert set(stored) == set(expected) == {c.conversation_id for c in platform.all()}
    differences = {
        (cid, name): (stored[cid][name], expected[cid][name])
        for cid in expected
        for name in COMPARED
        if stored[cid][name] != expected[cid][name]
    }
    assert differences == {}
    assert audio_mismatches(stored, settings.data_dir) == []


def test_a_failed_conversation_ends_the_same_whichever_of_its_failure_webhook_and_detail_is_stored_last(
    engine: Engine, platform: FakePlatform
) -> None:
    """The race the concurrency test above would hit: the reconciler decides to fetch a failed conversation's
    detail before its failure webhook is stored, and stores the detail after it."""
    failed = platform.all()[0]
    failed.status = "failed"
    webhook = platform.failure_event(failed.conversation_id)["data"]
    ordered, raced = failed.conversation_id, failed.conversation_id + "_raced"
    store(engine, [payloads.failure_observation(webhook, AT)])  # in order: the reconciler then skips it, complete
    store(
        engine,
        [
            payloads.failure_observation({**webhook, "conversation_id": raced}, AT),
            payloads.detail_observation({**failed.detail(), "conversation_id": raced}, Source.DETAIL, AT),
        ],
    )
    by_id = records(engine)
    assert by_id[raced]["metadata"] == by_id[ordered]["metadata"]
