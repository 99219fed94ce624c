"""`postcall reconcile` end to end: the fake platform over HTTP, the real receiver, the CLI, SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine

from service.config import Settings
from service.testing import FakeConversation, FakePlatform, Faults, WebhookSender, seed_conversations
from service.web.app import create_app
from tests.support.live import live_server
from tests.support.reconcile import checkpoint, reconcile, rows
from tests.support.webhooks import SECRET

KEY = "reconcile-key"
AGENTS = ("agent_a", "agent_b")
NOW = int(time.time())


pytestmark = pytest.mark.usefixtures("tiny_retry_waits")


@pytest.fixture
def platform() -> FakePlatform:
    conversations = seed_conversations(40, AGENTS, now=NOW, spread_seconds=2 * 86400, failed_share=0.1, seed=11)
    return FakePlatform(api_key=KEY, conversations=conversations)


@pytest.fixture
def fake_url(platform: FakePlatform) -> Iterator[str]:
    with platform.serve() as url:
        yield url


def stored(engine: Engine) -> dict[str, dict[str, object]]:
    return {row["conversation_id"]: row for row in rows(engine, "conversation")}


def test_one_run_stores_exactly_the_platforms_conversations_though_30_percent_of_webhooks_were_dropped(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    with live_server(create_app(settings)) as postcall:
        sender = WebhookSender(f"{postcall}/webhooks/elevenlabs", SECRET)
        plan, answers = sender.deliver(platform.events(), Faults(drop=0.3, duplicate=0.1, reorder=0.2, seed=5))
    assert {answer.status for answer in answers} == {200}
    dropped = {event["data"]["conversation_id"] for event in plan.dropped}
    assert len(dropped) >= 8
    assert dropped.isdisjoint(stored(engine))

    run = reconcile(settings, fake_url, KEY, "--json")

    assert run.exit_code == 0, run.stderr
    records = stored(engine)
    assert set(records) == {c.conversation_id for c in platform.all()}
    for conversation in platform.all():
        record = records[conversation.conversation_id]
        assert record["status"] == conversation.status
        assert record["complete"]
        if conversation.status == "done":
            assert record["transcript"] == conversation.transcript()
    # Only what the webhooks missed needed a detail call.
    assert {call.path.rsplit("/", 1)[1] for call in platform.calls_to("detail")} == dropped
    assert run.json["details_fetched"] == len(dropped)
    assert run.json["listed"] == len(platform.all())
    assert run.json["failed"] == 0


def test_a_conversation_that_arrives_both_ways_is_one_record_with_both_provenances(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    by_webhook, by_reconcile_first = [c.conversation_id for c in platform.all() if c.status == "done"][:2]
    with live_server(create_app(settings)) as postcall:
        sender = WebhookSender(f"{postcall}/webhooks/elevenlabs", SECRET)
        assert sender.send(platform.transcription_event(by_webhook)).status == 200
        assert reconcile(settings, fake_url, KEY).exit_code == 0
        assert sender.send(platform.transcription_event(by_reconcile_first)).status == 200

    records = stored(engine)
    assert sum(1 for cid in records if cid in (by_webhook, by_reconcile_first)) == 2
    first, second = records[by_webhook], records[by_reconcile_first]
    assert first["first_seen_via"] == "webhook"
    assert second["first_seen_via"] == "reconcile"
    for record in (first, second):
        assert record["webhook_received_at"] is not None
        assert record["reconciled_at"] is not None
        assert record["complete"]


def test_a_second_run_over_the_same_window_makes_only_list_calls(
    settings: Settings, platform: FakePlatform, fake_url: str
) -> None:
    assert reconcile(settings, fake_url, KEY, "--since", "3d").exit_code == 0
    platform.reset_calls()

    again = reconcile(settings, fake_url, KEY, "--since", "3d", "--json")

    assert again.exit_code == 0
    assert {call.kind for call in platform.calls} == {"agents", "list"}  # no detail, no audio
    assert again.json["details_fetched"] == 0
    assert again.json["new"] == again.json["updated"] == 0


def test_a_processing_conversation_is_fetched_once_it_is_done(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    platform.add(FakeConversation("conv_slowpoke", "agent_a", NOW - 600, status="processing"))
    first = reconcile(settings, fake_url, KEY, "--json")
    assert first.exit_code == 0
    assert stored(engine)["conv_slowpoke"]["status"] == "processing"
    assert not stored(engine)["conv_slowpoke"]["complete"]
    assert all(not call.path.endswith("conv_slowpoke") for call in platform.calls_to("detail"))
    held = checkpoint(engine, "agent_a")
    assert held is not None and held <= NOW - 600  # the checkpoint waits for it

    platform.set_status("conv_slowpoke", "done")
    platform.reset_calls()
    second = reconcile(settings, fake_url, KEY, "--json")

    assert second.exit_code == 0
    assert [call.path for call in platform.calls_to("detail")] == ["/v1/convai/conversations/conv_slowpoke"]
    record = stored(engine)["conv_slowpoke"]
    assert record["status"] == "done" and record["complete"] and record["transcript"]


def test_429s_are_survived_and_retry_after_is_respected(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    platform.throttle(2, retry_after="1", kinds={"list", "detail"})

    run = reconcile(settings, fake_url, KEY, "--json")

    assert run.exit_code == 0, run.stderr
    assert set(stored(engine)) == {c.conversation_id for c in platform.all()}
    throttled = [call for call in platform.calls if call.status == 429]
    assert len(throttled) == 2
    for refused in throttled:
        assert refused.response_headers["retry-after"] == "1"
        later = [call for call in platform.calls if call.at > refused.at and call.status != 429]
        # Nothing was sent during the second the platform asked for, by the fake's own clock.
        assert all(call.at - refused.at >= 1.0 for call in later)


def test_a_permanent_500_exits_1_holds_the_checkpoint_and_the_next_run_fixes_it(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    victim = next(c for c in platform.all() if c.agent_id == "agent_a" and c.status == "done")
    platform.failing_ids.add(victim.conversation_id)

    failed = reconcile(settings, fake_url, KEY, "--json")

    assert failed.exit_code == 1
    assert failed.json["failed"] == 1
    assert victim.conversation_id in failed.stdout
    assert not stored(engine)[victim.conversation_id]["complete"]
    held = checkpoint(engine, "agent_a")
    assert held is not None and held <= victim.start_time_unix_secs
    assert checkpoint(engine, "agent_b") is not None and checkpoint(engine, "agent_b") > victim.start_time_unix_secs
    run_row = rows(engine, "reconcile_run")[-1]
    assert run_row["status"] == "failed" and run_row["failed"] == 1

    platform.failing_ids.clear()
    platform.reset_calls()
    fixed = reconcile(settings, fake_url, KEY, "--json")

    assert fixed.exit_code == 0
    assert [call.path.rsplit("/", 1)[1] for call in platform.calls_to("detail")] == [victim.conversation_id]
    assert stored(engine)[victim.conversation_id]["complete"]
    moved = checkpoint(engine, "agent_a")
    assert moved is not None and moved > victim.start_time_unix_secs


def test_a_dry_run_writes_nothing(settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str) -> None:
    run = reconcile(settings, fake_url, KEY, "--dry-run", "--json")

    assert run.exit_code == 0
    assert run.json["dry_run"] is True
    assert run.json["listed"] == run.json["new"] == len(platform.all())
    assert run.json["details_needed"] == len(platform.all())
    assert run.json["details_fetched"] == 0
    assert platform.calls_to("detail") == []
    for table in ("conversation", "reconcile_checkpoint", "reconcile_run", "reconcile_lease", "webhook_event"):
        assert rows(engine, table) == [], table


def test_audio_is_fetched_with_audio_and_stored_once(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    run = reconcile(settings, fake_url, KEY, "--audio", "--json")

    with_audio = {c.conversation_id for c in platform.all() if c.status == "done" and c.has_audio}
    assert run.exit_code == 0
    assert run.json["audio_fetched"] == len(with_audio)
    records = stored(engine)
    for cid in with_audio:
        path = settings.data_dir / str(records[cid]["audio_path"])
        assert records[cid]["audio_stored"] and path.read_bytes() == platform.get(cid).audio(platform.audio_bytes)
    platform.reset_calls()
    assert reconcile(settings, fake_url, KEY, "--audio").exit_code == 0
    assert platform.calls_to("audio") == []


def test_each_run_is_recorded_with_its_counts(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    run = reconcile(settings, fake_url, KEY, "--agent", "agent_b", "--json")

    assert run.exit_code == 0
    [recorded] = rows(engine, "reconcile_run")
    assert recorded["id"] == run.json["run_id"]
    assert recorded["status"] == "succeeded"
    assert recorded["finished_at"] is not None
    assert recorded["agents"] == ["agent_b"]
    for name in ("listed", "new", "updated", "details_fetched", "audio_fetched", "failed"):
        assert recorded[name] == run.json[name], name
    assert {c["agent_id"] for c in stored(engine).values()} == {"agent_b"}
    assert rows(engine, "reconcile_lease") == []  # released
