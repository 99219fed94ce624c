"""Read API benchmark: 1,000,000 conversations in PostgreSQL and in SQLite; p50/p99 of a filtered first page and
of deep cursor pages, through the real query code (`service.api.reads`) and through HTTP (uvicorn + httpx).

    uv run python -m tests.bench.read_api [--rows 1000000] [--runs 300] [--scan-runs 20] [--only postgresql|sqlite]

PostgreSQL: a throw-away database on POSTCALL_TEST_PG_URL's server (default postgres@127.0.0.1:5432), loaded with
COPY. SQLite: a file under /tmp, loaded with multi-row INSERTs in one transaction. Both migrated to head first, so
the indexes are the ones migration 0002 creates. Rows are written directly (not through record.store) because a
benchmark needs a million of them in a minute; their shape is what record.store stores.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from service.api.query_params import Cursor, encode_cursor, parse_filter
from service.api.reads import list_conversations
from service.config import Settings
from service.storage.db import create_engine
from service.storage.migrations import upgrade
from service.web.app import create_app
from tests.support.databases import PG_ADMIN_URL
from tests.support.live import live_server

AGENTS = 20
T_END = 1_760_000_000
SPAN = 365 * 86_400
TOKEN = "bench-token"
COLUMNS = (
    "conversation_id",
    "agent_id",
    "status",
    "user_id",
    "start_time_unix_secs",
    "call_duration_secs",
    "call_successful",
    "transcript_summary",
    "dynamic_variables",
    "transcript",
    "audio_stored",
    "first_seen_via",
    "first_seen_at",
    "webhook_received_at",
    "complete",
    "data_rank",
    "updated_at",
)


def rows(count: int, seed: int = 7) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(seed)
    at = datetime(2026, 1, 1, tzinfo=UTC).isoformat()
    for i in range(count):
        draw = rng.random()
        status = "done" if draw < 0.9 else "failed" if draw < 0.95 else "processing"
        undated = rng.random() < 0.01
        start = None if undated else T_END - rng.randrange(SPAN)
        transcript = json.dumps(
            [
                {"role": "agent", "message": "Hello, how can I help you today?", "time_in_call_secs": 0},
                {"role": "user", "message": f"I am calling about order {i}.", "time_in_call_secs": 3},
            ]
        )
        yield (
            f"conv_{uuid.UUID(int=rng.getrandbits(128)).hex[:26]}",
            f"agent_{i % AGENTS:02d}",
            status,
            f"user_{rng.randrange(200_000)}",
            start,
            rng.randrange(5, 900),  # whole seconds, as ElevenLabs sends them
            "success" if status == "done" else "failure",
            "The caller asked about an order and got an answer.",
            json.dumps({"order_id": f"o-{i}", "tier": rng.choice(["gold", "silver"])}),
            transcript,
            rng.random() < 0.3,
            "webhook" if rng.random() < 0.97 else "reconcile",
            at,
            at,
            True,
            35,  # a transcription webhook's data (record/merge.py)
            at,
        )


def load_postgresql(engine: Engine, count: int) -> None:
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("SET statement_timeout = 0")  # the service's 10 s limit is for requests, not a bulk load
        with cursor.copy(f"COPY conversation ({', '.join(COLUMNS)}) FROM STDIN") as copy:  # type: ignore[attr-defined]
            for row in rows(count):
                copy.write_row(row)
        raw.commit()
        cursor.execute("ANALYZE conversation")
        raw.commit()
    finally:
        raw.close()


def load_sqlite(engine: Engine, count: int) -> None:
    batch = 500
    placeholders = "(" + ", ".join("?" * len(COLUMNS)) + ")"
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("PRAGMA synchronous=OFF")  # loading only; the server runs with FULL
        cursor.execute("BEGIN")
        pending: list[Any] = []
        for row in rows(count):
            pending.extend(row)
            if len(pending) == batch * len(COLUMNS):
                sql = f"INSERT INTO conversation ({', '.join(COLUMNS)}) VALUES {', '.join([placeholders] * batch)}"
                cursor.execute(sql, pending)
                pending = []
        if pending:
            n = len(pending) // len(COLUMNS)
            sql = f"INSERT INTO conversation ({', '.join(COLUMNS)}) VALUES {', '.join([placeholders] * n)}"
            cursor.execute(sql, pending)
        cursor.execute("COMMIT")
        cursor.execute("ANALYZE")
    finally:
        raw.close()


@contextmanager
def postgresql_database() -> Iterator[str]:
    name = f"postcall_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def deep_cursor(engine: Engine, where: str, offset: int) -> str:
    """The cursor a client would hold after paging `offset` records into the (filtered) order."""
    sql = (
        "SELECT start_time_unix_secs, conversation_id FROM conversation WHERE start_time_unix_secs IS NOT NULL"
        f" {where} ORDER BY start_time_unix_secs DESC, conversation_id DESC LIMIT 1 OFFSET {offset}"
    )
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET statement_timeout = 0")
        start, conversation_id = conn.exec_driver_sql(sql).one()
    return encode_cursor(Cursor(start, conversation_id))


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {p50 * 1000:7.2f} ms   p99 {p99 * 1000:7.2f} ms"


def timed(runs: int, call: Callable[[], object]) -> list[float]:
    for _ in range(min(10, runs)):  # warm the caches and the pool
        call()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def scenarios(engine: Engine, count: int) -> dict[str, list[tuple[str, str]]]:
    agent = "agent_07"
    return {
        "filtered first page (agent_id+status, 50)": [("agent_id", agent), ("status", "done")],
        "unfiltered first page (50)": [],
        "deep cursor page, 90% into everything (50)": [("cursor", deep_cursor(engine, "", int(count * 0.9)))],
        "deep cursor page, 90% into one agent (50)": [
            ("agent_id", agent),
            ("cursor", deep_cursor(engine, f"AND agent_id = '{agent}'", int(count / AGENTS * 0.9))),
        ],
        "user_id lookup (WebRTC session)": [("user_id", "user_4242")],
        "var.order_id lookup": [("var.order_id", f"o-{count // 2}")],
    }


def bench(dialect: str, url: str, count: int, runs: int, data_dir: Path, scan_runs: int) -> None:
    engine = create_engine(url)
    upgrade(engine)
    started = time.perf_counter()
    (load_postgresql if dialect == "postgresql" else load_sqlite)(engine, count)
    print(f"\n{dialect}: loaded {count:,} conversations in {time.perf_counter() - started:.0f} s")
    cases = scenarios(engine, count)

    def runs_of(label: str) -> int:
        # SQLite has no index for a dynamic variable's value: that lookup scans every row, so fewer runs of it.
        return scan_runs if dialect == "sqlite" and label.startswith("var.") else runs

    for label, params in cases.items():
        wanted = parse_filter(params)

        def query(wanted: Any = wanted) -> object:
            with engine.connect() as conn:
                return list_conversations(conn, wanted)

        print(f"  query  {label:45s} {percentiles(timed(runs_of(label), query))}")
    settings = Settings(database_url=url, data_dir=data_dir, api_tokens=TOKEN, _env_file=None)  # type: ignore[call-arg]
    with live_server(create_app(settings, engine=engine)) as base, httpx.Client(base_url=base) as client:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        for label, params in cases.items():

            def get(params: list[tuple[str, str]] = params) -> object:
                answer = client.get("/v1/conversations", params=params, headers=headers)
                assert answer.status_code == 200, answer.text
                return answer

            print(f"  HTTP   {label:45s} {percentiles(timed(runs_of(label), get))}")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--scan-runs", type=int, default=20, help="runs of the var. lookup on SQLite (a full scan)")
    parser.add_argument("--only", choices=["postgresql", "sqlite"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="postcall-bench-") as tmp:
        if args.only in (None, "postgresql"):
            with postgresql_database() as url:
                bench("postgresql", url, args.rows, args.runs, Path(tmp) / "pg-data", args.scan_runs)
        if args.only in (None, "sqlite"):
            bench(
                "sqlite", f"sqlite:///{tmp}/bench.db", args.rows, args.runs, Path(tmp) / "sqlite-data", args.scan_runs
            )


if __name__ == "__main__":
    main()
