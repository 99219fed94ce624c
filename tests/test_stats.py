"""GET /v1/stats against what was really delivered: signed webhooks (some dropped) to a real server, then a real
reconcile against the fake platform, on SQLite and PostgreSQL. The expected counts come from the delivery plan and
the platform's own conversations, never from the database."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from service.config import Settings
from service.testing import FakePlatform, Faults, WebhookSender, seed_conversations
from service.web.app import create_app
from tests.support import records
from tests.support.live import live_server
from tests.support.reconcile import reconcile
from tests.support.webhooks import SECRET

KEY = "stats-key"
AUTH = {"Authorization": "Bearer test-token"}
NOW = int(time.time())
AGENTS = ("agent_a", "agent_b")

pytestmark = pytest.mark.usefixtures("tiny_retry_waits")


@pytest.fixture
def platform() -> FakePlatform:
    conversations = seed_conversations(
        60, AGENTS, now=NOW, spread_seconds=3 * 86400, failed_share=0.15, audio_share=0.7, seed=23
    )
    return FakePlatform(api_key=KEY, conversations=conversations)


@pytest.fixture
def client(settings: Settings, engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client


def day_of(start: int) -> str:
    return datetime.fromtimestamp(start, UTC).date().isoformat()


def test_stats_equal_what_the_webhooks_and_the_reconciler_delivered(
    settings: Settings, engine: Engine, platform: FakePlatform
) -> None:
    with platform.serve() as fake_url:
        with live_server(create_app(settings)) as postcall:
            sender = WebhookSender(f"{postcall}/webhooks/elevenlabs", SECRET)
            plan, answers = sender.deliver(platform.events(audio=True), Faults(drop=0.3, duplicate=0.1, seed=3))
            assert {answer.status for answer in answers} == {200}
        run = reconcile(settings, fake_url, KEY, "--json")  # without --audio: audio only from webhooks
        assert run.exit_code == 0, run.stderr
        with live_server(create_app(settings)) as postcall:
            answer = httpx.get(f"{postcall}/v1/stats", params={"days": 30}, headers=AUTH)
    assert answer.status_code == 200, answer.text

    delivered = {event["data"]["conversation_id"] for event in plan.sends}
    audio_delivered = {event["data"]["conversation_id"] for event in plan.sends if event["type"] == "post_call_audio"}
    # A failure webhook carries no start time: its event_timestamp becomes the record's, and for a call that never
    # connected it outranks the listing's start time (README, "How sources merge").
    failure_time = {
        event["data"]["conversation_id"]: event["event_timestamp"]
        for event in plan.sends
        if event["type"] == "call_initiation_failure"
    }
    expected: dict[tuple[str, str], Counter[str]] = {}
    for conversation in platform.all():
        cid = conversation.conversation_id
        start = failure_time.get(cid, conversation.start_time_unix_secs)
        counts = expected.setdefault((conversation.agent_id, day_of(start)), Counter())
        counts["conversations"] += 1
        counts["by_webhook"] += cid in delivered
        counts["reconcile_only"] += cid not in delivered
        counts["failed_initiations"] += conversation.status == "failed"
        counts["with_audio"] += cid in audio_delivered
    # The drops left work for the reconciler, and some audio came by webhook: the counts are not trivial.
    assert 0 < len(delivered) < len(platform.all())
    assert audio_delivered

    body = answer.json()
    got = {
        (row["agent_id"], row["day"]): {k: v for k, v in row.items() if k not in ("agent_id", "day")}
        for row in body["days"]
    }
    assert got == {key: {name: counts[name] for name in body["totals"]} for key, counts in expected.items()}
    assert body["totals"] == {name: sum(counts[name] for counts in expected.values()) for name in body["totals"]}
    assert body["totals"]["conversations"] == len(platform.all())
    days = [row["day"] for row in body["days"]]
    assert days == sorted(days, reverse=True)


def test_window_undated_records_and_a_session_that_a_webhook_completed(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    today, yesterday, long_ago = NOW, NOW - 86400, NOW - 40 * 86400
    records.store(
        engine,
        [
            records.session("conv_session", agent_id="agent_1"),  # no start time: no day
            records.session("conv_completed", agent_id="agent_1"),
            records.detail("conv_completed", agent_id="agent_1", start=today),  # then its webhook: by webhook
            records.summary("conv_listed", agent_id="agent_1", start=yesterday),  # only the reconciler
            records.detail("conv_old", agent_id="agent_1", start=long_ago),  # outside 30 days
        ],
    )
    body = client.get("/v1/stats", headers=AUTH).json()
    zero = {"conversations": 0, "by_webhook": 0, "reconcile_only": 0, "failed_initiations": 0, "with_audio": 0}
    assert body["days"] == [
        {"agent_id": "agent_1", "day": day_of(today), **zero, "conversations": 1, "by_webhook": 1},
        {"agent_id": "agent_1", "day": day_of(yesterday), **zero, "conversations": 1, "reconcile_only": 1},
    ]
    one_day = client.get("/v1/stats", params={"days": 1}, headers=AUTH).json()
    assert [row["day"] for row in one_day["days"]] == [day_of(today)]
    assert client.get("/v1/stats", params={"days": 60}, headers=AUTH).json()["totals"]["conversations"] == 3


@pytest.mark.parametrize(
    "query",
    [
        {"days": "0"},
        {"days": "367"},
        {"days": "-1"},
        {"days": "ten"},
        {"days": "1e3"},
        {"agent": "x"},
        {"days": "\u0661"},
    ],
)
def test_unusable_parameters_are_422_naming_them(client: TestClient, query: dict[str, Any]) -> None:
    answer = client.get("/v1/stats", params=query, headers=AUTH)
    assert answer.status_code == 422
    assert answer.json()["parameter"] == next(iter(query))


def test_stats_need_a_token(client: TestClient) -> None:
    assert client.get("/v1/stats").status_code == 401
    assert client.get("/v1/stats", headers={"Authorization": "Bearer wrong"}).status_code == 401
