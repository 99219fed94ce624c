"""The reconciler against an API that misbehaves: 429s, 500s, truncated JSON, dropped connections, answers slower
than the client's timeout, a cursor that repeats or never ends, an agent list it cannot use, and any exception at all.

Whatever the fault, a run ends — within a generous bound — with a clear status (exit 1, a failed run record and a
message naming the fault), never moves a checkpoint past a conversation it did not store, and a clean run
afterwards stores everything. Each scenario runs on SQLite and PostgreSQL.

The scenario: a first clean run over a window that ends half an hour ago stores what started before then and sets
each agent's checkpoint there; new conversations start after it; the faulty run meets them (and the older ones
the first window did not reach); the fault is lifted and the next run must store them all.
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

from service import elevenlabs
from service.config import Settings
from service.elevenlabs import ElevenLabsClient
from service.reconcile.ledger import Report
from service.reconcile.reconciler import Options, Reconciler
from service.storage.audio import BlobStore
from service.testing import FakeConversation, FakePlatform, seed_conversations
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


def checkpoints(engine: Engine) -> dict[str, int | None]:
    return {agent_id: checkpoint(engine, agent_id) for agent_id in AGENTS}


def last_run_record(engine: Engine) -> dict[str, object]:
    return max(rows(engine, "reconcile_run"), key=lambda row: int(row["id"]))


def assert_checkpoints_are_honest(engine: Engine, platform: FakePlatform) -> None:
    """A checkpoint says: every conversation of the agent that started before it is stored in full."""
    records = stored(engine)
    for agent_id, held in checkpoints(engine).items():
        assert held is not None
        for conversation in platform.all():
            if conversation.agent_id == agent_id and conversation.start_time_unix_secs < held:
                record = records.get(conversation.conversation_id)
                assert record is not None and record["complete"], (
                    f"{agent_id}'s checkpoint {held} passed {conversation.conversation_id} "
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


def first_clean_run(settings: Settings, engine: Engine, platform: FakePlatform, url: str) -> dict[str, int | None]:
    run = bounded_reconcile(settings, url, "--until", str(FIRST_RUN_UNTIL))
    assert run.exit_code == 0, run.stderr
    reached = {c.conversation_id for c in platform.all()} - {
        c.conversation_id for c in not_reached_by_the_first_run(platform)
    }
    assert set(stored(engine)) == reached
    assert checkpoints(engine) == dict.fromkeys(AGENTS, FIRST_RUN_UNTIL)
    assert_checkpoints_are_honest(engine, platform)
    return checkpoints(engine)


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
    assert failed.json["failed"] == len(AGENTS)  # one failed listing per agent
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
    for agent_id, held in checkpoints(engine).items():
        oldest_missing = min(c.start_time_unix_secs for c in missing if c.agent_id == agent_id)
        assert held is not None and held <= oldest_missing

    platform.clear_faults()
    fixed = bounded_reconcile(settings, fake_url)

    assert fixed.exit_code == 0, fixed.stderr
    assert fixed.json["details_fetched"] == len(missing)
    assert_everything_stored(engine, platform)
    assert_checkpoints_are_honest(engine, platform)


def test_an_agent_listing_that_keeps_failing_ends_the_run_as_failed_and_writes_no_checkpoint(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    platform.fail(None, 503, kinds={"agents"})

    failed = bounded_reconcile(settings, fake_url)

    assert_a_clear_failure(failed, engine, "HTTP 503")
    assert checkpoints(engine) == dict.fromkeys(AGENTS)
    assert stored(engine) == {}

    platform.clear_faults()
    assert bounded_reconcile(settings, fake_url).exit_code == 0
    assert_everything_stored(engine, platform)


def test_a_cursor_that_repeats_stops_the_paging_with_a_failed_run_instead_of_looping(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    before = first_clean_run(settings, engine, platform, fake_url)
    missing = add_new_conversations(platform, per_agent=2 * PAGE_SIZE + 1)  # three pages each, at least
    platform.repeat_cursors = True
    platform.reset_calls()

    failed = bounded_reconcile(settings, fake_url)

    assert_a_clear_failure(failed, engine, "repeated cursor")
    # Per agent: the first page, then the page whose cursor points back at itself, and no more.
    assert len(platform.calls_to("list")) == 2 * len(AGENTS)
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


def test_agent_entries_without_a_usable_id_are_skipped_with_a_warning(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    unusable = ({"agent_id": 5}, {"agent_id": None}, {"agent_id": ["agent_b"]}, {"name": "no id"})
    platform.answer_with(agent_list(*unusable, {"agent_id": "agent_a"}), None, kinds={"agents"})

    run = reconcile(settings, fake_url, KEY, "--json")

    assert run.exit_code == 0, run.stderr
    assert run.json["agents"] == ["agent_a"]
    assert run.json["warnings"] == ["skipped 4 agent(s) listed without a usable agent_id"]
    assert set(stored(engine)) == {c.conversation_id for c in platform.all() if c.agent_id == "agent_a"} != set()
    assert last_run_record(engine)["status"] == "succeeded"
    assert "skipped 4 agent(s)" in run.stderr  # logged as a warning too


def test_an_agent_list_of_plain_strings_is_a_failed_run_not_a_crash(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    platform.answer_with(agent_list(*AGENTS), None, kinds={"agents"})

    run = reconcile(settings, fake_url, KEY, "--json")

    assert_a_clear_failure(run, engine, "no usable agent_id")
    assert stored(engine) == {}
    assert checkpoint(engine, "agent_a") is None


def test_a_deeply_nested_answer_is_a_failed_run_not_a_traceback(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    depth = 100_000
    platform.answer_with(b'{"agents": ' + b"[" * depth + b"]" * depth + b"}", None, kinds={"agents"})

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

    def agents(self) -> AsyncIterator[dict[str, Any]]:
        return self._client.agents()

    async def conversation_pages(self, agent_id: str, after: int, before: int) -> AsyncIterator[list[dict[str, Any]]]:
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
    assert report.counts.failed == len(AGENTS)
    for agent_id in AGENTS:
        assert f"agent {agent_id}: listing conversations failed: more than 20 pages" in "\n".join(report.errors)
        assert len([call for call in platform.calls_to("list") if call.query["agent_id"] == agent_id]) == 21
    record = last_run_record(engine)
    assert record["id"] == report.run_id and record["status"] == "failed"
    assert "more than 20 pages" in str(record["error"])
    assert rows(engine, "reconcile_lease") == []
    assert checkpoints(engine) == before
    assert_checkpoints_are_honest(engine, platform)

    platform.clear_faults()
    assert reconcile_directly(settings, engine, fake_url, Options(max_pages=20)).ok
    assert_everything_stored(engine, platform)


# --- the checkpoint never moves backwards; a detail gone for good is given up (issue 18, item 11) ------------------


def test_a_failed_conversation_without_a_start_time_never_moves_the_checkpoint_back(
    settings: Settings, engine: Engine, platform: FakePlatform, fake_url: str
) -> None:
    before = first_clean_run(settings, engine, platform, fake_url)
    platform.add(FakeConversation("conv_no_start", "agent_a", NOW - 60, status="done"))
    platform.summaries_without_start.add("conv_no_start")
    platform.failing_ids.add("conv_no_start")

    failed = bounded_reconcile(settings, fake_url)

    assert_a_clear_failure(failed, engine, "conv_no_start")
    assert checkpoint(engine, "agent_a") == before["agent_a"]  # not 0: the next run does not list all history
    moved = checkpoint(engine, "agent_b")
    assert moved is not None and moved > FIRST_RUN_UNTIL

    platform.failing_ids.clear()
    platform.reset_calls()
    fixed = bounded_reconcile(settings, fake_url, "--agent", "agent_a")

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
        held = checkpoint(engine, "agent_a")
        assert held is not None and held <= ghost.start_time_unix_secs

    fifth = bounded_reconcile(settings, fake_url)

    assert fifth.exit_code == 0, fifth.stderr
    assert fifth.json["failed"] == 0 and fifth.json["given_up"] == 1
    assert fifth.json["warnings"] == ["conv_ghost: detail: 404 in 5 runs; given up, stored from its summary only"]
    record = last_run_record(engine)
    assert record["status"] == "succeeded"
    assert record["given_up"] == 1 and record["warnings"] == fifth.json["warnings"]
    moved = checkpoint(engine, "agent_a")
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
