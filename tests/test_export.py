"""`postcall export`: each format holds what the read API serves, in start order, filtered; standard output holds
only the data; a bad value writes nothing; memory stays flat as the record count grows. SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from service.api.reads import conversations
from service.api.routes import json_bytes
from service.config import Settings
from service.export import parquet, query
from service.export.command import Destination, ExportUsageError, export, parse_selection
from service.export.formats import Format, FormatError, choose_format
from service.export.query import Selection
from service.record import fields, payloads
from service.record.fields import FIELDS, Kind
from service.record.merge import Observation, Source
from service.record.public import DETAIL_FIELDS, RECORD_FIELDS, iso
from service.storage import db
from service.storage.db import StoreUnavailable
from service.testing.samples import SampleType, sample_event
from service.web.app import create_app
from tests.support import records
from tests.support.databases import migrated_sqlite
from tests.support.live import live_server

T0 = 1_760_000_000
AUTH = {"Authorization": "Bearer test-token"}
# When postcall received the webhooks: microseconds, so a timestamp that lost them would show.
RECEIVED = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
# Every stored record, in the order the export writes them: oldest start first (ties by id), undated last by id.
ORDER = ["conv_old", "conv_tie_a", "conv_tie_b", "conv_sample", "conv_new", "conv_failed", "conv_session"]


def sample(conversation_id: str, start: int, *, agent_id: str = "agent_1") -> Observation:
    """ElevenLabs' transcription webhook as the sample builder makes it, with this id, agent and start."""
    data = sample_event(SampleType.TRANSCRIPTION, conversation_id, T0)["data"]
    data["agent_id"] = agent_id
    data["metadata"]["start_time_unix_secs"] = start
    return payloads.detail_observation(data, Source.TRANSCRIPTION_WEBHOOK, RECEIVED)


@pytest.fixture
def stored(engine: Engine, settings: Settings) -> None:
    """Records from every source, with text that CSV must quote and values of every kind."""
    awkward = sample("conv_sample", T0 + 20)
    awkward.fields["transcript_summary"] = 'Said "no", then:\nyes — ça va, 👍'
    failure = sample_event(SampleType.FAILURE, "conv_failed", T0)["data"]
    records.store(
        engine,
        [
            records.detail("conv_old", agent_id="agent_2", start=T0, dynamic_variables={"tier": "gold", "n": 7}),
            records.detail("conv_tie_b", start=T0 + 10, user_id="bob", at=RECEIVED),
            records.detail("conv_tie_a", agent_id="agent_2", start=T0 + 10, call_successful="failure"),
            awkward,
            records.summary("conv_new", agent_id="agent_3", start=T0 + 30),
            payloads.failure_observation(failure, RECEIVED),
            records.session("conv_session", labels={"room": "r-9"}, dynamic_variables={"vip": True}),
            records.audio("conv_sample", settings.data_dir, b"ID3 mp3 bytes"),
        ],
    )


@pytest.fixture
def read_api(settings: Settings, engine: Engine) -> Iterator[Callable[[str], dict[str, Any]]]:
    """GET /v1/conversations/{id} from the real app over HTTP."""
    with live_server(create_app(settings, engine=engine)) as base, httpx.Client(base_url=base, headers=AUTH) as http:

        def get(conversation_id: str) -> dict[str, Any]:
            answer = http.get(f"/v1/conversations/{conversation_id}")
            assert answer.status_code == 200, answer.text
            record: dict[str, Any] = answer.json()
            return record

        yield get


def run_cli(
    settings: Settings, cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "service", "export", *args]
    return subprocess.run(command, cwd=cwd, env=cli_env(settings, env), capture_output=True, timeout=120)


def cli_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    own = {"POSTCALL_DATABASE_URL": settings.database_url, "POSTCALL_DATA_DIR": str(settings.data_dir)}
    return {**os.environ, **own, **(extra or {})}


def exported(engine: Engine, selection: Selection) -> list[str]:
    """The ids a JSON lines export of `selection` writes, in its order."""
    out = io.BytesIO()
    export(engine, selection, Format.JSONL, out)
    return [json.loads(line)["conversation_id"] for line in out.getvalue().splitlines()]


# Reading each format back into the read API's values.


def from_jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines()]


def _csv_value(kind: Kind, text: str) -> Any:
    if text == "":
        return None
    if kind is Kind.INTEGER:
        return int(text)
    if kind is Kind.NUMBER:
        return float(text)
    if kind is Kind.BOOLEAN:
        assert text in ("true", "false")
        return text == "true"
    if kind in (Kind.OBJECT, Kind.LIST):
        return json.loads(text)
    return text


def from_csv(data: bytes) -> list[dict[str, Any]]:
    reader = csv.reader(io.StringIO(data.decode(), newline=""))
    assert tuple(next(reader)) == RECORD_FIELDS
    return [
        {name: _csv_value(fields.BY_NAME[name].kind, text) for name, text in zip(RECORD_FIELDS, row, strict=True)}
        for row in reader
    ]


def _parquet_value(kind: Kind, value: Any) -> Any:
    if value is None:
        return None
    if kind is Kind.TIMESTAMP:
        return iso(value)
    if kind in (Kind.OBJECT, Kind.LIST):
        return json.loads(value)
    return value


def from_parquet(data: bytes) -> list[dict[str, Any]]:
    table = pq.read_table(io.BytesIO(data))
    names = (*RECORD_FIELDS, *DETAIL_FIELDS)
    assert tuple(table.schema.names) == names
    for name in names:
        kind = fields.BY_NAME[name].kind
        if kind is Kind.TIMESTAMP:
            assert table.schema.field(name).type == pa.timestamp("us", tz="UTC")
        if kind in (Kind.OBJECT, Kind.LIST, Kind.TEXT):
            assert table.schema.field(name).type == pa.string()
    return [
        {name: _parquet_value(fields.BY_NAME[name].kind, value) for name, value in row.items()}
        for row in table.to_pylist()
    ]


READERS = {Format.JSONL: from_jsonl, Format.CSV: from_csv, Format.PARQUET: from_parquet}


@pytest.mark.usefixtures("stored")
@pytest.mark.parametrize("fmt", list(Format))
def test_each_format_holds_what_the_read_api_serves_in_start_order(
    fmt: Format, settings: Settings, tmp_path: Path, read_api: Callable[[str], dict[str, Any]]
) -> None:
    target = tmp_path / f"conversations.{fmt.value}"
    done = run_cli(settings, tmp_path, "--format", fmt.value, "--output", str(target))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b""
    expected = [read_api(conversation_id) for conversation_id in ORDER]
    if fmt is Format.CSV:  # the list fields
        expected = [{name: record[name] for name in RECORD_FIELDS} for record in expected]
    assert READERS[fmt](target.read_bytes()) == expected
    # The fixture reaches what the formats must survive: quoting, fractions of a second, audio, both JSON kinds.
    by_id = dict(zip(ORDER, expected, strict=True))
    assert "\n" in by_id["conv_sample"]["transcript_summary"] and by_id["conv_sample"]["audio_received_at"]
    assert by_id["conv_tie_b"]["webhook_received_at"] == "2026-01-02T03:04:05.123456Z"
    assert by_id["conv_old"]["dynamic_variables"] == {"tier": "gold", "n": 7}
    assert by_id["conv_session"]["labels"] == {"room": "r-9"}
    assert f"exported {len(ORDER)} conversation(s) as {fmt.value}" in done.stderr.decode()
    assert target.stat().st_mode & 0o777 == 0o600  # callers' personal data: its owner's only


@pytest.mark.usefixtures("stored")
@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (Selection(), ORDER),
        (Selection(agents=("agent_2",)), ["conv_old", "conv_tie_a"]),
        (Selection(agents=("agent_2", "agent_3")), ["conv_old", "conv_tie_a", "conv_new"]),
        # A window of start times leaves out the records that have none.
        (Selection(since=T0 + 10), ["conv_tie_a", "conv_tie_b", "conv_sample", "conv_new"]),
        (Selection(until=T0 + 20), ["conv_old", "conv_tie_a", "conv_tie_b"]),
        (Selection(since=T0 + 10, until=T0 + 30, agents=("agent_1",)), ["conv_tie_b", "conv_sample"]),
        (Selection(agents=("agent_postcall_test",)), ["conv_failed"]),
        (Selection(agents=("nobody",)), []),
    ],
)
def test_filters_and_order(engine: Engine, selection: Selection, expected: list[str]) -> None:
    assert exported(engine, selection) == expected
    assert query.count(engine, selection) == len(expected)


def test_batches_continue_after_the_last_key_even_across_equal_start_times(engine: Engine) -> None:
    """Batch edges fall between records that share a start time, and between dated and undated records."""
    ids = [f"conv_{n:02d}" for n in range(11)]
    records.store(
        engine,
        [
            *(records.detail(conversation_id, start=T0 + n // 4) for n, conversation_id in enumerate(ids[:8])),
            *(records.session(conversation_id) for conversation_id in ids[8:]),
        ],
    )
    for batch_rows in (1, 2, 3, 4, 1000):
        walked = query.batches(engine, Selection(), ["conversation_id"], batch_rows=batch_rows)
        sizes, got = [], []
        for (batch,) in walked:
            sizes.append(len(batch))
            got += batch
        assert got == ids, batch_rows
        assert max(sizes) <= batch_rows


@pytest.mark.usefixtures("stored")
@pytest.mark.parametrize("fmt", [Format.JSONL, Format.CSV])
def test_standard_output_holds_only_the_data(fmt: Format, settings: Settings, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    done = run_cli(settings, work, "--format", fmt.value, "--output", "-")
    assert done.returncode == 0, done.stderr.decode()
    assert [record["conversation_id"] for record in READERS[fmt](done.stdout)] == ORDER
    assert done.stderr.decode().strip() == f"exported {len(ORDER)} conversation(s) as {fmt.value} to standard output"
    assert not list(work.iterdir())


@pytest.mark.usefixtures("stored")
def test_a_reader_that_goes_away_ends_the_export_quietly(settings: Settings, tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `postcall export | head -0`: the first write finds no reader
    try:
        command = [sys.executable, "-m", "service", "export"]
        done = subprocess.run(command, cwd=tmp_path, env=cli_env(settings), stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert done.returncode == 1
    assert done.stderr == b""


@pytest.mark.usefixtures("stored")
def test_on_a_terminal_the_progress_bar_goes_to_standard_error(settings: Settings, tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    env = cli_env(settings, {"TERM": "xterm", "COLUMNS": "100"})
    command = [sys.executable, "-m", "service", "export"]
    with subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=follower) as proc:
        os.close(follower)
        on_terminal = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal, everything has been read
                break
            if not chunk:
                break
            on_terminal += chunk
        os.close(leader)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, on_terminal.decode(errors="replace")
    assert [record["conversation_id"] for record in from_jsonl(out)] == ORDER
    assert b"exporting" in on_terminal
    assert f"{len(ORDER)}/{len(ORDER)}".encode() in on_terminal


@pytest.fixture
def empty_sqlite(tmp_path: Path) -> Settings:
    url = migrated_sqlite(str(tmp_path / "postcall.db"))
    return Settings(database_url=url, data_dir=tmp_path / "data", _env_file=None)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "postcall: --since: 'yesterday' is not a time"),
        (["--until", "2026-13-45"], "postcall: --until: '2026-13-45' is not a time"),
        (["--since", "1d", "--until", "2d"], "postcall: --since must be before --until"),
        (["--format", "xml"], "postcall: --format must be one of jsonl, csv, parquet, not 'xml'"),
        (["--agent", " "], "postcall: --agent must not be empty"),
    ],
)
def test_a_bad_value_exits_2_with_one_line_and_writes_nothing(
    args: list[str], message: str, empty_sqlite: Settings, tmp_path: Path
) -> None:
    target = tmp_path / "out" / "conversations.csv"
    target.parent.mkdir()
    target.write_bytes(b"an earlier export\n")
    done = run_cli(empty_sqlite, tmp_path, *args, "--output", str(target))
    assert done.returncode == 2
    assert done.stdout == b""
    (line,) = done.stderr.decode().splitlines()
    assert line.startswith(message)
    assert [path.name for path in target.parent.iterdir()] == ["conversations.csv"]
    assert target.read_bytes() == b"an earlier export\n"


def test_an_output_in_a_missing_directory_exits_2(empty_sqlite: Settings, tmp_path: Path) -> None:
    done = run_cli(empty_sqlite, tmp_path, "--output", str(tmp_path / "missing" / "x.jsonl"))
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        f"postcall: --output: the directory '{tmp_path / 'missing'}' does not exist"
    ]


def test_an_unreachable_database_exits_1_and_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "conversations.jsonl"
    target.write_bytes(b"an earlier export\n")
    closed = "postgresql+psycopg://postgres@127.0.0.1:1/postcall"  # nothing listens on port 1
    settings = Settings(database_url=closed, _env_file=None)  # type: ignore[call-arg]
    done = run_cli(settings, tmp_path, "--output", str(target))
    assert done.returncode == 1
    assert done.stderr.decode().startswith("postcall: database unavailable")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["conversations.jsonl"]
    assert target.read_bytes() == b"an earlier export\n"


def test_a_file_appears_only_when_the_export_finishes(tmp_path: Path) -> None:
    target = tmp_path / "conversations.jsonl"
    with pytest.raises(RuntimeError), Destination.of(str(target)).open() as stream:
        stream.write(b"half of it\n")
        raise RuntimeError("the database went away")
    assert not list(tmp_path.iterdir())
    with Destination.of(str(target)).open() as stream:
        stream.write(b"all of it\n")
        assert not target.exists()
    assert target.read_bytes() == b"all of it\n"
    assert [path.name for path in tmp_path.iterdir()] == ["conversations.jsonl"]


@pytest.mark.parametrize(
    ("name", "output", "expected"),
    [
        (None, None, Format.JSONL),
        (None, "-", Format.JSONL),
        (None, "calls.parquet", Format.PARQUET),
        (None, "calls.CSV", Format.CSV),
        (None, "calls.txt", Format.JSONL),
        ("csv", "calls.parquet", Format.CSV),  # --format wins over the suffix
        ("Parquet", None, Format.PARQUET),
    ],
)
def test_the_format_comes_from_format_else_the_suffix(name: str | None, output: str | None, expected: Format) -> None:
    assert choose_format(name, output) is expected


def test_selection_parses_the_reconcilers_forms() -> None:
    now = T0 + 86_400
    assert parse_selection("1d", "2025-10-10", ["agent_1", " agent_2"], now) == Selection(
        since=T0, until=1_760_054_400, agents=("agent_1", "agent_2")
    )
    assert parse_selection(str(T0), None, [], now) == Selection(since=T0)
    with pytest.raises(ExportUsageError, match="--since must be before --until"):
        parse_selection(str(T0), str(T0), [], now)
    with pytest.raises(FormatError):
        choose_format("tsv", None)


def test_parquet_row_groups_gather_batches_up_to_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parquet, "ROW_GROUP_ROWS", 4)
    # A new record's values (what the field list says), so every column that cannot be null holds something.
    record = {field.name: field.default for field in FIELDS} | {"first_seen_via": "webhook"}
    out = io.BytesIO()
    writer = parquet.ParquetWriter(out)
    for n in range(5):
        pair = [{**record, "conversation_id": f"conv_{n}a"}, {**record, "conversation_id": f"conv_{n}b"}]
        writer.write([[one[name] for one in pair] for name in Format.PARQUET.fields])
    writer.close()
    metadata = pq.ParquetFile(io.BytesIO(out.getvalue())).metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [4, 4, 2]
    assert pq.read_table(io.BytesIO(out.getvalue())).column("conversation_id").to_pylist()[-1] == "conv_4b"


def _peak_bytes(engine: Engine, fmt: Format) -> int:
    """The export's peak memory: Python's allocations (tracemalloc) plus Arrow's buffers (its own pool)."""
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        with open(os.devnull, "wb") as sink:
            export(engine, Selection(), fmt, sink)
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)
    return int(python_peak + pool.max_memory())


def _seed(engine: Engine, first: int, count: int) -> None:
    for offset in range(first, first + count, 2000):
        ids = range(offset, min(offset + 2000, first + count))
        records.store(engine, [records.detail(f"conv_{n:06d}", start=T0 + n) for n in ids])


@pytest.mark.slow
def test_memory_stays_flat_from_2000_to_20000_conversations(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # Row groups of two batches, so that 20,000 records make ten of them as a million would make many.
    monkeypatch.setattr(parquet, "ROW_GROUP_ROWS", 2000)
    _seed(engine, 0, 2000)
    small = {fmt: _peak_bytes(engine, fmt) for fmt in Format}
    _seed(engine, 2000, 18_000)
    large = {fmt: _peak_bytes(engine, fmt) for fmt in Format}
    # Ten times the records; an export that held them all would need about ten times the memory. One batch of
    # records is the peak in both, so the margin (3x) is wide and still far below 10x.
    for fmt in Format:
        assert large[fmt] < 3 * small[fmt], (fmt, small[fmt], large[fmt])


# Byte for byte: rewrites of the export for speed must leave each format's bytes as they were. The reference is the
# read API's own answers (the bodies as served, over HTTP), written out as each format is documented, on records
# that hold the awkward values a column can: quoting, \n and \r\n, unicode, empty text, integers and floats in the
# one NUMBER column, JSON of the wrong shape (served as null), nested JSON, numbers beyond 64 bits, instants stored
# from another time zone, with and without microseconds, no start time.

AWKWARD_TEXT = 'Zoë said "no", then:\r\nyes — ça va, 👍'


def awkward_rows() -> list[dict[str, Any]]:
    """Rows of `conversation` as they are stored, written directly: some values no source would send."""
    base: dict[str, Any] = {field.name: field.default for field in FIELDS}
    base |= {"first_seen_via": "webhook", "first_seen_at": RECEIVED, "updated_at": RECEIVED, "data_rank": 35}
    awkward = {
        "conversation_id": "conv_awkward",
        "agent_id": "agent, with comma",
        "agent_name": AWKWARD_TEXT,
        "status": "done",
        "user_id": "line one\nline two",
        "branch_id": '"',
        "version_id": "\\.",  # alone on a line: the end-of-data marker of PostgreSQL's COPY
        "environment": " leading and trailing space ",
        "start_time_unix_secs": T0,
        "call_duration_secs": 22.5,
        "call_successful": "success",
        "call_summary_title": "",
        "transcript_summary": "tab\there; 'single'",
        "termination_reason": "中文 and עברית",
        "phone_number": "+33 1 23 45 67 89",
        "direction": "inbound",
        "dynamic_variables": {
            "n": 7,
            "f": 1.0,
            "u64": 18_446_744_073_709_551_615,
            "nested": {"list": [1, "two", None, True, {"deep": [1.5e-07]}]},
            "text": 'a,b\n"c"',
            "é": "ü 👍",
        },
        "labels": {"room": "r-9", "empty": ""},
        "has_audio": True,
        "has_user_audio": False,
        "audio_stored": True,
        "webhook_received_at": RECEIVED,
        "audio_received_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "reconciled_at": datetime(2026, 1, 2, 5, 4, 5, 7, tzinfo=timezone(timedelta(hours=2))),
        "complete": True,
        "revision": 2**40,
        "transcript": [{"role": "agent", "message": AWKWARD_TEXT, "time_in_call_secs": 0}, {}],
        "analysis": {"data_collection_results": {"slot": {"value": None}}, "score": 0.1 + 0.2},
        "metadata": {"start_time_unix_secs": T0, "cost": 1e20, "neg": -0.0},
        "conversation_initiation_client_data": {},
    }
    wrong_shapes = {
        "conversation_id": "conv_wrong_shapes",
        "start_time_unix_secs": T0,  # the same start: the tie goes by id
        "call_duration_secs": 22,
        "dynamic_variables": ["not", "an", "object"],
        "labels": "a JSON string",
        "transcript": {"not": "a list"},
        "analysis": [1, 2],
        "metadata": "5",  # a JSON number alone would not read back on SQLite: its NUMERIC affinity stores 5
        "has_audio": False,
    }
    return [
        base | awkward,
        base | wrong_shapes,
        base | {"conversation_id": "conv_c", "start_time_unix_secs": 0, "call_duration_secs": 22.0, "labels": {}},
        base | {"conversation_id": "conv_d", "start_time_unix_secs": -1, "call_duration_secs": 1e-07},
        base | {"conversation_id": "conv_e", "start_time_unix_secs": 2**40, "call_duration_secs": 1e20},
        base | {"conversation_id": "conv_undated", "call_duration_secs": 0, "transcript": []},
    ]


AWKWARD_ORDER = ["conv_d", "conv_c", "conv_awkward", "conv_wrong_shapes", "conv_e", "conv_undated"]


# JSON text no writer of postcall would produce (the serializer refuses integers beyond 64 bits), as another tool or
# an older version may have stored it: read back through orjson, the first number is a float, the second is 1.1.
RAW_JSON = '{"beyond_64_bits": 123456789012345678901234567890, "trailing_zero": 1.10}'


@pytest.fixture
def awkward(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.insert(conversations), awkward_rows())
        raw = "CAST(:raw AS jsonb)" if conn.dialect.name == "postgresql" else ":raw"
        update = f"UPDATE conversation SET metadata = {raw} WHERE conversation_id = 'conv_d'"
        conn.execute(sa.text(update), {"raw": RAW_JSON})


@pytest.fixture
def served(settings: Settings, engine: Engine) -> dict[str, bytes]:
    """GET /v1/conversations/{id}'s body, as the real app serves it over HTTP, for each awkward record."""
    with live_server(create_app(settings, engine=engine)) as base, httpx.Client(base_url=base, headers=AUTH) as http:
        answers = {
            conversation_id: http.get(f"/v1/conversations/{conversation_id}") for conversation_id in AWKWARD_ORDER
        }
    assert all(answer.status_code == 200 for answer in answers.values())
    return {conversation_id: answer.content for conversation_id, answer in answers.items()}


def expected_csv(records: list[dict[str, Any]]) -> bytes:
    """The list fields as documented: a header row; absent is empty, booleans true/false, objects the API's JSON."""

    def cell(value: Any) -> Any:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, dict | list):
            return json_bytes(value).decode()
        return value

    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(RECORD_FIELDS)
    writer.writerows([cell(record[name]) for name in RECORD_FIELDS] for record in records)
    return text.getvalue().encode()


def expected_parquet(records: list[dict[str, Any]]) -> pa.Table:
    """Every field typed by its kind: JSON as the API's JSON text, timestamps the API's instants."""
    schema = parquet.parquet_schema()
    columns = []
    for field in schema:
        values = [record[field.name] for record in records]
        if fields.BY_NAME[field.name].is_json:
            values = [None if value is None else json_bytes(value).decode() for value in values]
        if field.type == pa.timestamp("us", tz="UTC"):
            values = [None if value is None else datetime.fromisoformat(value) for value in values]
        columns.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)


@pytest.mark.usefixtures("awkward")
def test_each_format_is_byte_for_byte_the_read_apis_answers(engine: Engine, served: dict[str, bytes]) -> None:
    outputs = {}
    for fmt in Format:
        out = io.BytesIO()
        assert export(engine, Selection(), fmt, out) == len(AWKWARD_ORDER)
        outputs[fmt] = out.getvalue()
    # JSON lines: each line is exactly the body GET /v1/conversations/{id} answers.
    assert outputs[Format.JSONL] == b"".join(served[conversation_id] + b"\n" for conversation_id in AWKWARD_ORDER)
    records = [json.loads(served[conversation_id]) for conversation_id in AWKWARD_ORDER]
    assert outputs[Format.CSV] == expected_csv(records)
    table = pq.read_table(io.BytesIO(outputs[Format.PARQUET]))
    assert table.schema == parquet.parquet_schema()
    assert table.equals(expected_parquet(records))
    # The rows reach what they are there for.
    by_id = dict(zip(AWKWARD_ORDER, records, strict=True))
    assert by_id["conv_awkward"]["reconciled_at"] == "2026-01-02T03:04:05.000007Z"
    assert by_id["conv_d"]["metadata"] == {"beyond_64_bits": 1.2345678901234568e29, "trailing_zero": 1.1}
    assert [by_id[name]["call_duration_secs"] for name in ("conv_c", "conv_wrong_shapes")] == [22.0, 22]
    assert by_id["conv_wrong_shapes"]["dynamic_variables"] is None and by_id["conv_wrong_shapes"]["metadata"] is None
    assert b'"Zo\xc3\xab said ""no"", then:\r\nyes' in outputs[Format.CSV]
    assert b",22.0," in outputs[Format.CSV] and b",22," in outputs[Format.CSV] and b",1e+20," in outputs[Format.CSV]


@pytest.mark.usefixtures("stored")
def test_a_read_the_database_refuses_is_unavailable_not_a_crash(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows come from the driver's own cursor: its errors must still read as an outage (the CLI's exit 1,
    `database unavailable`) as every other read's do, not as a bug's traceback. Here the lock timeout ends the
    read while its connection stays healthy, so nothing else on the way out turns the error into SQLAlchemy's."""
    if engine.dialect.name != "postgresql":
        pytest.skip("a lock timeout is PostgreSQL's")
    monkeypatch.setattr(db, "PG_STATEMENT_TIMEOUT_MS", 100)  # the lock timeout too (storage/db.py)
    impatient = db.create_engine(engine.url.render_as_string(hide_password=False))
    try:
        with engine.connect() as holder, holder.begin():
            holder.exec_driver_sql("LOCK TABLE conversation IN ACCESS EXCLUSIVE MODE")  # as a migration would
            with pytest.raises(StoreUnavailable, match="LockNotAvailable"):
                list(query.batches(impatient, Selection(), ["conversation_id"]))
    finally:
        impatient.dispose()
