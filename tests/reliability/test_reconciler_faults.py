"""The reconciler against an API that misbehaves: 429s, 500s, truncated JSON, dropped connections, answers slower
than the client's timeout, a cursor that repeats or never ends, an agent list it cannot use (and no longer needs),
recordings it refuses, and any exception at all.

Whatever the fault, a run ends — within a generous bound — with a clear status (exit 1, a failed run record and a
message naming the fault), never moves a checkpoint past a conversation it did not store, and a clean run
afterwards stores everything. A recording that cannot be fetched is the exception: it never holds the checkpoint,
and is tried again by later runs until it is given up. Each scenario runs on SQLite and PostgreSQL.

The scenario: a first clean run over a window that ends half an hour ago stores what started before then and sets
the workspace's checkpoint there (or each agent's, for runs that name them); new conversations start after it; the
faulty run meets them (and the older ones the first window did not reach); the fault is lifted and the next run
must store them all.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import orjson
import pytest
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from service import elevenlabs
from service.config import Settings
from service.elevenlabs import ElevenLabsClient
from service.reconcile.ledger import AUDIO_TRIES, WORKSPACE, Report
from service.reconcile.reconciler import Options, Reconciler
from service.storage.audio import BlobStore
from service.testing import FakeConversation, FakePlatform, seed_conversations
from service.web.app import create_app
from tests.support.reconcile import Run, checkpoint, reconcile, rows

KEY = "faults-key"
AGENTS = ("agent_a", "agent_b")
NOW = int(time.time())
# Far above a healthy run (about a second) and far below "forever": a run still going after this loops or hangs.
RUN_BOUND_SECONDS = 60
# Small pages, so that a dozen conversations span several pages and faults strike in the middle of paging.
PAGE_SIZE = 5
# The client's timeout while an answer is stalled for longer than it; the stall outlasts every retry's timeout.
CLIENT_TIMEOUT_SECONDS = 0.5
STALL_SECONDS = 2.0
NEW_PER_AGENT = 3
# The first run's window ends here, so that its checkpoint lies well before the faulty run's end: a checkpoint
# wrongly moved to the end of a failed run shows (two runs inside one second would share their end).
FIRST_RUN_UNTIL = NOW - 1800
# Runs that name the agents list each on its own, with a checkpoint each.
EACH_AGENT = ("--agent", "agent_a", "--agent", "agent_b")


@pytest.fixture(autouse=True)
def small_pages(monkeypatch: pytest.MonkeyPatch, tiny_retry_waits: None) -> None:
    """Pages of a few conversations; every retry still happens, with millisecond waits."""
    monkeypatch.setattr(elevenlabs, "PAGE_SIZE", PAGE_SIZE)


@pytest.fixture
def platform() -> FakePlatform:
    conversations = seed_conversations(16, AGENTS, now=NOW, spread_seconds=2 * 86400, failed_share=0.1, seed=23)
    return FakePlatform(api_key=KEY, conversations=conversations)


@pytest.fixture
def fake_url(platform: FakePlatform) -> Iterator[str]:
    with platform.serve() as url:
        yield url


@dataclass(frozen=True)
class Fault:
    """A fault the fake platform injects into the next `times` answers of some kinds (None: until cleared),
    the words the run's message must name it by, and whether the client retries it."""

    name: str
    inject: Callable[[FakePlatform, int | None, frozenset[str]], None]
    names: str
    retried: bool = True
    stalls: bool = False


FAULTS = [
    Fault("429", lambda p, times, kinds: p.throttle(times or 1_000_000, retry_after="0", kinds=kinds), "HTTP 429"),
    Fault("500", lambda p, times, kinds: p.fail(times, 500, kinds), "HTTP 500"),
    # A 200 whose JSON ends mid-way is not retried (only 429, 5xx and transport errors are): that run fails.
    Fault("truncated-json", lambda p, times, kinds: p.truncate(times, kinds), "not JSON", retried=False),
    Fault(
        "cut-off-connection",
        lambda p, times, kinds: p.truncate(times, kinds, abort=True),
        "RemoteProtocolError",
    ),
    Fault("timeout", lambda p, times, kinds: p.stall(STALL_SECONDS, times, kinds), "ReadTimeout", stalls=True),
]
RETRIED = [fault for fault in FAULTS if fault.retried]


def bounded_reconcile(settings: Settings, url: str, *args: str) -> Run:
    """`postcall reconcile --json` in-process; the test fails if the run has not ended within the bound."""
    outcome: list[Run | BaseException] = []

    def go() -> None:
        try:
            outcome.append(reconcile(settings, url, KEY, "--json", *args))
        except BaseException as exc:
            outcome.append(exc)

    # A daemon thread: should the run never end, the test fails now and the thread dies with the process.
    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    thread.join(RUN_BOUND_SECONDS)
    if thread.is_alive():
        pytest.fail(f"postcall reconcile was still running after {RUN_BOUND_SECONDS} s: it loops or hangs")
    [result] = outcome
    if isinstance(result, BaseException):
        raise result
    return result


def add_new_conversations(platform: FakePlatform, per_agent: int = NEW_PER_AGENT) -> list[FakeConversation]:
    """Conversations that started after the first run's window: the faulty run is the first to list them."""
    for agent_id in AGENTS:
        for i in range(per_agent):
            platform.add(FakeConversation(f"conv_new_{agent_id}_{i}", agent_id, NOW - 60 - 90 * i, status="done"))
    return not_reached_by_the_first_run(platform)


def not_reached_by_the_first_run(platform: FakePlatform) -> list[FakeConversation]:
    return [c for c in platform.all() if c.start_time_unix_secs >= FIRST_RUN_UNTIL]


def stored(engine: Engine) -> dict[str, dict[str, object]]:
    return {row["conversation_id"]: row for row in rows(engine, "conversation")}


def checkpoints(engine: Engine, keys: tuple[str, ...] = (WORKSPACE,)) -> dict[str, int | None]:
    """The workspace's checkpoint, or each agent's (`keys=AGENTS`)."""
    return {key: checkpoint(engine, key) for key in keys}


def in_scope(conversation: FakeConversation, key: str) -> bool:
    return key == WORKSPACE or conversation.agent_id == key


def last_run_record(engine: Engine) -> dict[str, object]:
    return max(rows(engine, "reconcile_run"), key=lambda row: int(row["id"]))


def assert_checkpoints_are_honest(engine: Engine, platform: FakePlatform, keys: tuple[str, ...] = (WORKSPACE,)) -> None:
    """A checkpoint says: every conversation of its scope that started before it is stored in full."""
    records = stored(engine)
    for key, held in checkpoints(engine, keys).items():
        assert held is not None
        for conversation in platform.all():
            if in_scope(conversation, key) and conversation.start_time_unix_secs < held:
                record = records.get(conversation.conversation_id)
                assert record is not None and record["complete"], (
                    f"{key}'s checkpoint {held} passed {conversation.conversation_id} "
                    f"(started {conversation.start_time_unix_secs}), which is not stored in full"
                )


def assert_a_clear_failure(run: Run, engine: Engine, names: str) -> None:
    assert run.exit_code == 1, run.stderr
    assert run.json["ok"] is False
    assert any(names in error for error in run.json["errors"]), run.json["errors"]
    record = last_run_record(engine)
    assert record["id"] == run.json["run_id"]
    assert record["status"] == "failed"
    assert record["finished_at"] is not None
    assert names in str(record["error"])
    assert rows(engine, "reconcile_lease") == []  # released: the next run is not locked out
    for line in run.stderr.splitlines():  # the logs are JSON lines: a raw traceback would not be
        json.loads(line)


def assert_everything_stored(engine: Engine, platform: FakePlatform) -> None:
    records = stored(engine)
    assert set(records) == {c.conversation_id for c in platform.all()}
    assert all(record["complete"] for record in records.values())


def first_clean_run(
    settings: Settings, engine: Engine, platform: FakePlatform, url: str, *, each_agent: bool = False
) -> dict[str, int | None]:
    keys = AGENTS if each_agent else (WORKSPACE,)
    run = bounded_reconcile(settings, url, "--until", str(FIRST_RUN_UNTIL), *(EACH_AGENT if each_agent else ()))
    assert run.exit_code == 0, run.stderr
    reached = {c.conversation_id for c in platform.all()} - {
        c.conversation_id for c in not_reached_by_the_first_run(platform)
    }
    assert set(stored(engine)) == reached
    assert checkpoints(engine, keys) == dict.fromkeys(keys, FIRST_RUN_UNTIL)
    assert_checkpoints_are_honest(engine, platform, keys)
    return checkpoints(engine, keys)


def client_timeout_for(fault: Fault, monkeypatch: pytest.MonkeyPatch) -> None:
    if fault.stalls:  # how `ElevenLabsClient.open` builds its httpx client: the module's TIMEOUT
        monkeypatch.setattr(elevenlabs, "TIMEOUT", httpx.Timeout(CLIENT_TIMEOUT_SECONDS))


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.name)
def test_a_listing_that_keeps_failing_ends_the_run_as_failed_and_leaves_every_checkpoint_where_it_was(
    settings: Settings,
    engine: Engine,
    platform: FakePlatform,
    fake_url: str,
    fault: Fault,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client_timeout_for(fault, monkeypatch)
    before = first_clean_run(settings, engine, platform, fake_url)
    missing = add_new_conversations(platform)
    fault.inject(platform, None, frozenset({"list"}))

    failed = bounded_reconcile(settings, fake_url)

    assert_a_clear_failure(failed, engine, fault.names)
    assert failed.json["failed"] == 1  # one failed listing: the workspace's
    assert checkpoints(engine) == before
    assert not {c.conversation_id for c in missing} & set(stored(engine))
    assert_checkpoints_are_honest(engine, platform)

    platform.clear_faults()
    fixed = bounded_reconcile(settings, fake_url)

    assert fixed.exit_code == 0, fixed.stderr
    assert_everything_stored(engine, platform)
    assert_checkpoints_are_honest(engine, platform)


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.name)
def test_details_that_keep_failing_end_the_run_as_failed_and_hold_the_checkpoint_before_them(
    settings: Settings,
    engine: Engine,
    platform: FakePlatform,
    fake_url: str,
    fault: Fault,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client_timeout_for(fault, monkeypatch)
    first_clean_run(settings, engine, platform, fake_url)
    missing = add_new_conversations(platform)
    fault.inject(platform, None, frozenset({"detail"}))

    failed = bounded_reconcile(settings, fake_url)

    assert_a_clear_failure(failed, engine, fault.names)
    assert failed.json["failed"] == len(missing)
    records = stored(engine)
    assert all(not records[c.conversation_id]["complete"] for c in missing)  # stored from the summary only
    assert_checkpoints_are_honest(engine, platform)
    for key, held in checkpoints(engine).items():
        oldest_missing = min(c.start_time_unix_secs for c in missing if in_scope(c, key))
        assert held is not None and held <= oldest_missing

    platform.clear_faults()
    fixed = bounded_reconcile(settings, fake_url)

    assert fixed.exit_code == 0, fixed.stderr
    assert fixed.json["details_fetched"] == len(missing)
    assert_everything_stored(engine, platform)
    assert_checkpoints_are_honest(engine, platform)


def test_an_agent_listing_that_keeps_failing_does_not_matter_the_workspace_is_listed_without_it(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    platform.fail(None, 503, kinds={"agents"})

    run = bounded_reconcile(settings, fake_url)

    assert run.exit_code == 0, run.stderr
    assert platform.calls_to("agents") == []
    assert_everything_stored(engine, platform)
    assert_checkpoints_are_honest(engine, platform)


def test_a_cursor_that_repeats_stops_the_paging_with_a_failed_run_instead_of_looping(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    before = first_clean_run(settings, engine, platform, fake_url)
    missing = add_new_conversations(platform, per_agent=2 * PAGE_SIZE + 1)  # three pages each, at least
    platform.repeat_cursors = True
    platform.reset_calls()

    failed = bounded_reconcile(settings, fake_url)

    assert_a_clear_failure(failed, engine, "repeated cursor")
    # The first page, then the page whose cursor points back at itself, and no more.
    assert len(platform.calls_to("list")) == 2
    assert checkpoints(engine) == before
    assert_checkpoints_are_honest(engine, platform)

    platform.clear_faults()
    fixed = bounded_reconcile(settings, fake_url)

    assert fixed.exit_code == 0, fixed.stderr
    assert {c.conversation_id for c in missing} <= set(stored(engine))
    assert_everything_stored(engine, platform)


@pytest.mark.parametrize("fault", RETRIED, ids=lambda fault: fault.name)
def test_a_passing_fault_is_retried_and_the_run_stores_everything(
    settings: Settings,
    engine: Engine,
    platform: FakePlatform,
    fake_url: str,
    fault: Fault,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client_timeout_for(fault, monkeypatch)
    # Two faulty answers, fewer than the retry policy's attempts (the first list requests, then details).
    fault.inject(platform, 2, frozenset({"list"}))
    fault.inject(platform, 2, frozenset({"detail"}))

    run = bounded_reconcile(settings, fake_url)

    assert run.exit_code == 0, run.stderr
    assert run.json["failed"] == 0
    assert_everything_stored(engine, platform)
    assert_checkpoints_are_honest(engine, platform)
    assert last_run_record(engine)["status"] == "succeeded"
    faulty = [call for call in platform.calls if call.kind in ("list", "detail") and call.status != 200]
    assert len(faulty) == (4 if fault.name in ("429", "500") else 0)  # stalls and cut-offs are logged as 200


# --- a run is recorded as it ended (issue 18, item 8) ---------------------------------------------------------


def agent_list(*entries: Any) -> bytes:
    return orjson.dumps({"agents": list(entries), "next_cursor": None, "has_more": False})


@pytest.mark.parametrize(
    "answer",
    [
        agent_list({"agent_id": 5}, {"agent_id": None}, {"agent_id": ["agent_b"]}, {"name": "no id"}),
        agent_list(*AGENTS),  # plain strings
        b'{"agents": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["entries-without-a-usable-id", "plain-strings", "deeply-nested"],
)
def test_an_agent_list_it_cannot_use_does_not_matter_the_workspace_is_listed_without_it(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str, answer: bytes
) -> None:
    """Agents are no longer listed to find conversations: an archived or deleted agent's would be missed."""
    platform.answer_with(answer, None, kinds={"agents"})

    run = reconcile(settings, fake_url, KEY, "--json")

    assert run.exit_code == 0, run.stderr
    assert run.json["agents"] == [] and run.json["warnings"] == []
    assert platform.calls_to("agents") == []
    assert_everything_stored(engine, platform)
    assert last_run_record(engine)["status"] == "succeeded"


def test_a_deeply_nested_answer_is_a_failed_run_not_a_traceback(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    depth = 100_000
    platform.answer_with(b'{"conversations": ' + b"[" * depth + b"]" * depth + b"}", None, kinds={"list"})

    run = reconcile(settings, fake_url, KEY, "--json")

    # Today's client fails on the JSON itself (RecursionError); one that refuses the nesting says so in its words.
    assert_a_clear_failure(run, engine, "")
    assert run.json["errors"] == str(last_run_record(engine)["error"]).split("\n")
    platform.clear_faults()
    assert reconcile(settings, fake_url, KEY).exit_code == 0  # the next run is not locked out


class BrokenClient:
    """The real client, except that listing conversations (`on="list"`) or fetching a detail (`on="detail"`, in
    the reconciler's task group) raises `error`: a bug, or an answer nothing expected."""

    def __init__(self, client: ElevenLabsClient, error: BaseException, on: str = "list") -> None:
        self._client = client
        self._error = error
        self._on = on

    async def convai_settings(self) -> dict[str, Any]:
        return await self._client.convai_settings()

    async def workspace_webhooks(self) -> list[Any]:
        return await self._client.workspace_webhooks()

    async def conversation_pages(
        self, agent_id: str | None, after: int, before: int
    ) -> AsyncIterator[list[dict[str, Any]]]:
        if self._on == "list":
            raise self._error
        async for page in self._client.conversation_pages(agent_id, after, before):
            yield page

    async def conversation(self, conversation_id: str) -> dict[str, Any]:
        raise self._error


def run_with(settings: Settings, engine: Engine, url: str, error: BaseException, on: str = "list") -> Report:
    async def go() -> Report:
        async with ElevenLabsClient.open(url, KEY) as client:
            broken: Any = BrokenClient(client, error, on)
            return await Reconciler(engine, broken, BlobStore(settings.data_dir)).run(Options())

    return anyio.run(go)


@pytest.mark.parametrize("on", ["list", "detail"])
def test_an_unexpected_exception_is_a_failed_run_with_its_reason_and_the_lease_released(
    settings: Settings, engine: Engine, fake_url: str, on: str
) -> None:
    report = run_with(settings, engine, fake_url, RuntimeError("an answer nothing expected"), on)

    assert not report.ok
    assert report.errors == ["unexpected error: RuntimeError: an answer nothing expected"]
    record = last_run_record(engine)
    assert record["id"] == report.run_id
    assert record["status"] == "failed"
    assert record["error"] == "unexpected error: RuntimeError: an answer nothing expected"
    assert rows(engine, "reconcile_lease") == []
    assert rows(engine, "reconcile_checkpoint") == []


def test_an_interrupted_run_is_recorded_failed_and_releases_the_lease(
    settings: Settings, engine: Engine, fake_url: str
) -> None:
    with pytest.raises(KeyboardInterrupt):
        run_with(settings, engine, fake_url, KeyboardInterrupt())

    record = last_run_record(engine)
    assert record["status"] == "failed"
    assert record["finished_at"] is not None
    assert "interrupted" in record["error"]
    assert rows(engine, "reconcile_lease") == []


# --- a run is bounded (issue 18, item 9) ------------------------------------------------------------------------


def reconcile_directly(settings: Settings, engine: Engine, url: str, options: Options) -> Report:
    """One run through the Reconciler itself (for what the command does not expose); failed if it outlasts the
    bound rather than left to hang."""

    async def go() -> Report:
        with anyio.fail_after(RUN_BOUND_SECONDS):
            async with ElevenLabsClient.open(url, KEY) as client:
                return await Reconciler(engine, client, BlobStore(settings.data_dir)).run(options)

    return anyio.run(go)


def test_a_listing_that_never_ends_fails_the_run_after_its_page_bound_and_holds_the_checkpoint(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    before = first_clean_run(settings, engine, platform, fake_url)
    add_new_conversations(platform)
    platform.endless_cursors = True  # every page says there is more, under a cursor never seen before
    platform.reset_calls()

    report = reconcile_directly(settings, engine, fake_url, Options(max_pages=20))

    assert not report.ok
    assert report.counts.failed == 1
    assert report.errors == [
        "the workspace: listing conversations failed: more than 20 pages: the API keeps saying there is more"
    ]
    assert len(platform.calls_to("list")) == 21
    assert all("agent_id" not in call.query for call in platform.calls_to("list"))
    record = last_run_record(engine)
    assert record["id"] == report.run_id and record["status"] == "failed"
    assert "more than 20 pages" in str(record["error"])
    assert rows(engine, "reconcile_lease") == []
    assert checkpoints(engine) == before
    assert_checkpoints_are_honest(engine, platform)

    platform.clear_faults()
    assert reconcile_directly(settings, engine, fake_url, Options(max_pages=20)).ok
    assert_everything_stored(engine, platform)


def test_a_listing_that_never_ends_fails_the_run_at_its_time_bound_when_the_page_bound_is_far(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    before = first_clean_run(settings, engine, platform, fake_url)
    platform.endless_cursors = True

    # Only the time bound can end this run: the page bound is out of reach and the listing never ends.
    report = reconcile_directly(settings, engine, fake_url, Options(max_pages=10**9, max_seconds=0.5))

    assert not report.ok
    assert report.errors == ["the workspace: listing conversations failed: still listing after 0.5 s, the run's bound"]
    assert last_run_record(engine)["status"] == "failed"
    assert rows(engine, "reconcile_lease") == []
    assert checkpoints(engine) == before


# --- the checkpoint never moves backwards; a detail gone for good is given up (issue 18, item 11) ------------------


@pytest.mark.parametrize("each_agent", [False, True], ids=["workspace", "each-agent"])
def test_a_failed_conversation_without_a_start_time_never_moves_the_checkpoint_back(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str, each_agent: bool
) -> None:
    scope = EACH_AGENT if each_agent else ()
    before = first_clean_run(settings, engine, platform, fake_url, each_agent=each_agent)
    platform.add(FakeConversation("conv_no_start", "agent_a", NOW - 60, status="done"))
    platform.summaries_without_start.add("conv_no_start")
    platform.failing_ids.add("conv_no_start")

    failed = bounded_reconcile(settings, fake_url, *scope)

    assert_a_clear_failure(failed, engine, "conv_no_start")
    held_key = "agent_a" if each_agent else WORKSPACE
    assert checkpoint(engine, held_key) == before[held_key]  # not 0: the next run does not list all history
    if each_agent:
        moved = checkpoint(engine, "agent_b")
        assert moved is not None and moved > FIRST_RUN_UNTIL

    platform.failing_ids.clear()
    platform.reset_calls()
    fixed = bounded_reconcile(settings, fake_url, *(("--agent", "agent_a") if each_agent else ()))

    assert fixed.exit_code == 0, fixed.stderr
    assert int(platform.calls_to("list")[0].query["call_start_after_unix"]) == FIRST_RUN_UNTIL - 3600 - 1
    assert stored(engine)["conv_no_start"]["complete"]
    assert_everything_stored(engine, platform)


def not_found_runs(engine: Engine, conversation_id: str) -> int | None:
    found = [row["runs"] for row in rows(engine, "reconcile_not_found") if row["conversation_id"] == conversation_id]
    return found[0] if found else None


def test_a_detail_that_answers_404_in_five_runs_is_given_up_reported_and_no_longer_holds_the_checkpoint(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    first_clean_run(settings, engine, platform, fake_url)
    ghost = FakeConversation("conv_ghost", "agent_a", NOW - 120, status="done")
    platform.add(ghost)
    platform.fail(None, 404, kinds={"detail"})  # listed, but its detail is not found, run after run

    for run_number in range(1, 5):
        failed = bounded_reconcile(settings, fake_url)
        assert_a_clear_failure(failed, engine, "conv_ghost: detail: HTTP 404")
        assert f"404 in {run_number} of the 5 runs" in "\n".join(failed.json["errors"])
        assert failed.json["given_up"] == 0
        assert not_found_runs(engine, "conv_ghost") == run_number
        held = checkpoint(engine, WORKSPACE)
        assert held is not None and held <= ghost.start_time_unix_secs

    fifth = bounded_reconcile(settings, fake_url)

    assert fifth.exit_code == 0, fifth.stderr
    assert fifth.json["failed"] == 0 and fifth.json["given_up"] == 1
    assert fifth.json["warnings"] == ["conv_ghost: detail: 404 in 5 runs; given up, stored from its summary only"]
    record = last_run_record(engine)
    assert record["status"] == "succeeded"
    assert record["given_up"] == 1 and record["warnings"] == fifth.json["warnings"]
    moved = checkpoint(engine, WORKSPACE)
    assert moved is not None and moved > ghost.start_time_unix_secs
    assert not stored(engine)["conv_ghost"]["complete"]  # kept as listed
    assert reconcile(settings, fake_url, KEY, "--dry-run", "--json").json["details_needed"] == 0

    platform.reset_calls()
    later = bounded_reconcile(settings, fake_url, "--since", "1d")

    assert later.exit_code == 0, later.stderr
    assert platform.calls_to("detail") == []  # given up: not asked for again
    assert later.json["given_up"] == 0 and later.json["warnings"] == []


def test_a_detail_found_after_some_404s_is_stored_and_its_count_forgotten(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    first_clean_run(settings, engine, platform, fake_url)
    platform.add(FakeConversation("conv_late", "agent_a", NOW - 120, status="done"))
    platform.fail(None, 404, kinds={"detail"})
    for _ in range(2):
        assert bounded_reconcile(settings, fake_url).exit_code == 1
    assert not_found_runs(engine, "conv_late") == 2

    platform.clear_faults()
    fixed = bounded_reconcile(settings, fake_url)

    assert fixed.exit_code == 0, fixed.stderr
    assert stored(engine)["conv_late"]["complete"]
    assert not_found_runs(engine, "conv_late") is None
    assert_everything_stored(engine, platform)


# --- a recording that cannot be fetched never holds the checkpoint (issue 13) ---------------------------------------


def audio_tries(engine: Engine, conversation_id: str) -> int | None:
    found = [
        row["tries"] for row in rows(engine, "reconcile_audio_attempt") if row["conversation_id"] == conversation_id
    ]
    return found[0] if found else None


def audio_calls_for(platform: FakePlatform, conversation_id: str) -> int:
    return sum(1 for call in platform.calls_to("audio") if call.path.split("/")[-2] == conversation_id)


def test_a_recording_refused_with_400_is_tried_in_5_runs_then_given_up_and_never_holds_the_checkpoint(
    settings: Settings, engine: Engine, platform: FakePlatform
) -> None:
    victim = FakeConversation("conv_refused_audio", "agent_a", NOW - 86400, status="done")
    platform.add(victim)
    platform.audio_faults[victim.conversation_id] = 400
    runs = []
    with platform.serve() as url:
        for _ in range(7):
            runs.append(bounded_reconcile(settings, url, "--audio"))
            if len(runs) == 1:  # every later run's window starts after the victim: only the ledger recalls it
                held = checkpoint(engine, WORKSPACE)
                assert held is not None and held > victim.start_time_unix_secs

    for number, run in enumerate(runs[:AUDIO_TRIES], start=1):
        assert run.exit_code == 0, run.stderr
        assert run.json["failed"] == 0 and run.json["errors"] == []
        [warning] = run.json["warnings"]
        assert warning.startswith(f"{victim.conversation_id}: audio: HTTP 400: Injected HTTP 400")
        if number < AUDIO_TRIES:
            assert run.json["audio_failed"] == 0
            assert warning.endswith(f"(try {number} of {AUDIO_TRIES}; tried again next run)")
        else:
            assert run.json["audio_failed"] == 1
            assert warning.endswith(f"; failed in {AUDIO_TRIES} runs, given up (kept without it)")
    for run in runs[AUDIO_TRIES:]:  # left alone
        assert run.exit_code == 0, run.stderr
        assert run.json["audio_failed"] == 0 and run.json["warnings"] == []
    assert audio_calls_for(platform, victim.conversation_id) == AUDIO_TRIES  # one a run: a 400 is not retried
    assert audio_tries(engine, victim.conversation_id) == AUDIO_TRIES
    fifth = next(row for row in rows(engine, "reconcile_run") if row["id"] == runs[AUDIO_TRIES - 1].json["run_id"])
    assert fifth["status"] == "succeeded" and fifth["audio_failed"] == 1
    assert fifth["warnings"] == runs[AUDIO_TRIES - 1].json["warnings"]
    with TestClient(create_app(settings, engine=engine)) as client:
        served = client.get("/v1/reconcile/runs", headers={"Authorization": "Bearer test-token"}).json()["runs"]
    assert [run["audio_failed"] for run in served] == [0, 0, 1, 0, 0, 0, 0]  # newest first
    assert served[2]["warnings"] == fifth["warnings"]
    records = stored(engine)
    assert records[victim.conversation_id]["complete"] and not records[victim.conversation_id]["audio_stored"]
    others = [c for c in platform.all() if c.status == "done" and c is not victim]
    assert all(records[c.conversation_id]["audio_stored"] for c in others)  # the rest of the audio is stored
    moved = checkpoint(engine, WORKSPACE)
    assert moved is not None and moved > NOW


def test_a_recording_that_fails_twice_then_answers_is_stored_by_a_later_run_and_its_tries_forgotten(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    victim = FakeConversation("conv_late_audio", "agent_a", NOW - 86400, status="done")
    platform.add(victim)
    platform.audio_faults[victim.conversation_id] = 503  # retried within each run, then a try of the ledger's
    for _ in range(2):
        run = bounded_reconcile(settings, fake_url, "--audio")
        assert run.exit_code == 0, run.stderr
    assert audio_tries(engine, victim.conversation_id) == 2

    del platform.audio_faults[victim.conversation_id]
    fixed = bounded_reconcile(settings, fake_url, "--audio")

    assert fixed.exit_code == 0, fixed.stderr
    assert fixed.json["audio_fetched"] == 1 and fixed.json["updated"] == 1 and fixed.json["warnings"] == []
    record = stored(engine)[victim.conversation_id]
    assert record["audio_stored"]
    assert (settings.data_dir / str(record["audio_path"])).read_bytes() == victim.audio(platform.audio_bytes)
    assert audio_tries(engine, victim.conversation_id) is None
    platform.reset_calls()
    assert bounded_reconcile(settings, fake_url, "--audio").json["audio_fetched"] == 0
    assert platform.calls_to("audio") == []


def test_a_recording_it_cannot_write_fails_the_run_loudly_but_still_never_holds_the_checkpoint(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    first_clean_run(settings, engine, platform, fake_url)
    platform.add(FakeConversation("conv_unwritable_audio", "agent_a", NOW - 60, status="done"))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "tmp").write_text("a file where the temp dir should be")  # every temp file fails

    failed = bounded_reconcile(settings, fake_url, "--audio")

    assert failed.exit_code == 1, failed.stderr
    assert failed.json["audio_fetched"] == 0 and failed.json["failed"] >= 1
    assert any(
        e.startswith("conv_unwritable_audio: audio: cannot write it to the data dir:") for e in failed.json["errors"]
    )
    assert audio_tries(engine, "conv_unwritable_audio") == 1
    assert_checkpoints_are_honest(engine, platform)
    moved = checkpoint(engine, WORKSPACE)
    assert moved is not None and moved > NOW  # the recording does not hold it; the ledger remembers it

    (settings.data_dir / "tmp").unlink()
    fixed = bounded_reconcile(settings, fake_url, "--audio")

    assert fixed.exit_code == 0, fixed.stderr
    assert stored(engine)["conv_unwritable_audio"]["audio_stored"]
    assert audio_tries(engine, "conv_unwritable_audio") is None
