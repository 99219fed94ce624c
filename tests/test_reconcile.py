"""`postcall reconcile` end to end: the fake platform over HTTP, the real receiver, the CLI, SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from service.config import Settings
from service.reconcile.ledger import WORKSPACE
from service.reconcile.upstream import iso
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
    # The webhook's health, then the listing: no detail, no audio.
    assert {call.kind for call in platform.calls} == {"settings", "webhooks", "list"}
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
    held = checkpoint(engine, WORKSPACE)
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
    each_agent = ("--agent", "agent_a", "--agent", "agent_b")  # each agent's checkpoint moves on its own

    failed = reconcile(settings, fake_url, KEY, "--json", *each_agent)

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
    fixed = reconcile(settings, fake_url, KEY, "--json", *each_agent)

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


# --- the API as it really behaves (issue 13) -------------------------------------------------------------------------


def test_without_agents_the_whole_workspace_is_listed_so_a_deleted_agents_conversations_are_stored(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    gone = [FakeConversation(f"conv_of_a_deleted_agent_{i}", "agent_gone", NOW - 3600 * (i + 1)) for i in range(3)]
    for conversation in gone:
        platform.add(conversation)
    platform.delete_agent("agent_gone")  # no longer in GET /v1/convai/agents, still in the conversation list

    run = reconcile(settings, fake_url, KEY, "--json")

    assert run.exit_code == 0, run.stderr
    records = stored(engine)
    assert set(records) == {c.conversation_id for c in platform.all()}
    for conversation in gone:
        assert records[conversation.conversation_id]["agent_id"] == "agent_gone"
        assert records[conversation.conversation_id]["complete"]
    assert platform.calls_to("agents") == []
    assert all("agent_id" not in call.query for call in platform.calls_to("list"))
    assert {call.query["page_size"] for call in platform.calls_to("list")} == {"100"}
    assert run.json["agents"] == []
    assert "the whole workspace" in reconcile(settings, fake_url, KEY).stdout
    assert checkpoint(engine, WORKSPACE) is not None
    assert checkpoint(engine, "agent_a") is None  # one checkpoint for the workspace, none per agent


def test_the_summary_is_stored_from_the_list_because_the_reconciler_asks_for_it(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    run = reconcile(settings, fake_url, KEY, "--no-details", "--json")  # summaries only: no detail brings it

    assert run.exit_code == 0, run.stderr
    assert {call.query["summary_mode"] for call in platform.calls_to("list")} == {"include"}
    records = stored(engine)
    for conversation in platform.all():
        expected = conversation.summary()["transcript_summary"]
        assert records[conversation.conversation_id]["transcript_summary"] == expected
    assert any(record["transcript_summary"] for record in records.values())


def test_audio_is_not_asked_for_when_elevenlabs_says_there_is_none(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    said_in_detail = FakeConversation("conv_text_only_new", "agent_a", NOW - 900, has_audio=False)
    said_in_summary = FakeConversation("conv_text_only_old", "agent_a", NOW - 800, summary_extra={"has_audio": False})
    for conversation in (said_in_detail, said_in_summary):
        platform.add(conversation)
    with live_server(create_app(settings)) as postcall:  # one arrives complete by webhook: no detail is fetched
        sender = WebhookSender(f"{postcall}/webhooks/elevenlabs", SECRET)
        assert sender.send(platform.transcription_event(said_in_summary.conversation_id)).status == 200

    run = reconcile(settings, fake_url, KEY, "--audio", "--json")

    assert run.exit_code == 0, run.stderr
    asked = {call.path.split("/")[-2] for call in platform.calls_to("audio")}
    assert said_in_detail.conversation_id not in asked
    assert said_in_summary.conversation_id not in asked
    with_audio = {
        c.conversation_id for c in platform.all() if c.status == "done" and c.has_audio and c is not said_in_summary
    }
    assert asked == with_audio  # every request made found audio: none was a 404
    assert all(call.status == 200 for call in platform.calls_to("audio"))
    assert run.json["audio_fetched"] == len(with_audio)


def test_a_first_workspace_run_starts_from_the_oldest_per_agent_checkpoint(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    assert reconcile(settings, fake_url, KEY, "--agent", "agent_a", "--until", str(NOW - 7200)).exit_code == 0
    assert reconcile(settings, fake_url, KEY, "--agent", "agent_b", "--until", str(NOW - 3 * 3600)).exit_code == 0
    platform.reset_calls()

    run = reconcile(settings, fake_url, KEY, "--json")

    assert run.exit_code == 0, run.stderr
    [listing] = platform.calls_to("list")
    assert int(listing.query["call_start_after_unix"]) == NOW - 3 * 3600 - 3600 - 1  # the oldest, minus the overlap
    assert set(stored(engine)) == {c.conversation_id for c in platform.all()}
    moved = checkpoint(engine, WORKSPACE)
    assert moved is not None and moved >= NOW


def metric(settings: Settings, engine: Engine, name: str) -> float | None:
    with TestClient(create_app(settings, engine=engine)) as client:
        answer = client.get("/metrics")
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return None


def served_runs(settings: Settings, engine: Engine) -> list[dict[str, object]]:
    """GET /v1/reconcile/runs, newest first."""
    with TestClient(create_app(settings, engine=engine)) as client:
        answer = client.get("/v1/reconcile/runs", headers={"Authorization": "Bearer test-token"})
    assert answer.status_code == 200
    runs: list[dict[str, object]] = answer.json()["runs"]
    return runs


def test_an_auto_disabled_webhook_is_a_warning_in_the_summary_the_run_record_and_the_gauge(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    assert reconcile(settings, fake_url, KEY).exit_code == 0
    assert metric(settings, engine, "postcall_upstream_webhook_healthy") == 1
    failed_at = NOW - 600
    platform.set_webhook(
        is_auto_disabled=True, most_recent_failure_error_code=503, most_recent_failure_timestamp=failed_at
    )

    summary = reconcile(settings, fake_url, KEY)
    run = reconcile(settings, fake_url, KEY, "--json")

    assert summary.exit_code == run.exit_code == 0  # a warning, not a failure
    [warning] = run.json["warnings"]
    assert warning.startswith("the post-call webhook 'postcall' (https://postcall.example.com/webhooks/elevenlabs)")
    assert "auto-disabled by ElevenLabs after repeated failures" in warning
    assert f"(last failure: HTTP 503 at {iso(failed_at)})" in warning
    assert "re-enable it" in warning
    assert f"  warning: {warning}" in summary.stdout
    assert run.json["upstream_webhook_healthy"] is False
    record = max(rows(engine, "reconcile_run"), key=lambda row: int(row["id"]))
    assert record["status"] == "succeeded"
    assert record["warnings"] == [warning] and record["upstream_webhook_healthy"] is False
    assert metric(settings, engine, "postcall_upstream_webhook_healthy") == 0
    served = served_runs(settings, engine)[0]
    assert served["id"] == run.json["run_id"]
    assert served["warnings"] == [warning] and served["upstream_webhook_healthy"] is False

    platform.set_webhook(is_auto_disabled=False, most_recent_failure_timestamp=NOW - 3 * 86400)
    healed = reconcile(settings, fake_url, KEY, "--json")
    assert healed.json["warnings"] == [] and healed.json["upstream_webhook_healthy"] is True
    assert metric(settings, engine, "postcall_upstream_webhook_healthy") == 1


@pytest.mark.parametrize(
    ("state", "says"),
    [
        ({"is_disabled": True}, "is disabled: ElevenLabs sends it nothing"),
        (
            {"most_recent_failure_error_code": 500, "most_recent_failure_timestamp": NOW - 3600},
            "failed recently (last failure: HTTP 500 at",
        ),
    ],
    ids=["disabled", "failed-recently"],
)
def test_a_disabled_or_recently_failing_webhook_is_a_warning(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str, state: dict[str, object], says: str
) -> None:
    platform.set_webhook(**state)

    run = reconcile(settings, fake_url, KEY, "--json")

    assert run.exit_code == 0, run.stderr
    [warning] = run.json["warnings"]
    assert says in warning
    assert run.json["upstream_webhook_healthy"] is False
    assert metric(settings, engine, "postcall_upstream_webhook_healthy") == 0


def test_no_post_call_webhook_at_all_is_a_warning(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    platform.post_call_webhook_id = None

    run = reconcile(settings, fake_url, KEY, "--json")

    assert run.exit_code == 0, run.stderr
    assert run.json["warnings"] == [
        "the workspace has no post-call webhook (ConvAI settings name none): ElevenLabs sends no webhooks, and only "
        "the reconciler stores conversations"
    ]
    assert run.json["upstream_webhook_healthy"] is False


@pytest.mark.parametrize("kind", ["settings", "webhooks"])
def test_a_webhook_health_that_cannot_be_read_is_a_warning_never_a_failed_run(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str, kind: str
) -> None:
    platform.fail(None, 403, kinds={kind})  # a key without the workspace permission

    run = reconcile(settings, fake_url, KEY, "--json")

    assert run.exit_code == 0, run.stderr
    [warning] = run.json["warnings"]
    assert warning.startswith("could not read the workspace's post-call webhook from ElevenLabs: HTTP 403")
    assert run.json["upstream_webhook_healthy"] is None
    assert set(stored(engine)) == {c.conversation_id for c in platform.all()}
    assert metric(settings, engine, "postcall_upstream_webhook_healthy") is None  # unknown: no sample
