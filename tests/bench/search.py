"""Search benchmark: `q=` over conversations of 20 turns; migration 0008's index build time and size; p50/p99 of the
first page of a common, a middling and a rare word, through the real query code (`service.api.reads`) and over HTTP.

    uv run python -m tests.bench.search [--rows 1000000] [--sqlite-rows 100000] [--runs 200] [--only postgresql|sqlite]
        [--url postgresql+psycopg://…/a_database_this_script_loaded_before]

Each database is migrated to 0008, loaded, then migrated to 0009, which builds the index from the stored records
exactly as it would for a user upgrading (search/index.py `rebuild`): that upgrade is the build time measured.
Then both tables are vacuumed, as autovacuum would after such inserts (the pages' hint bits and visibility map
set, so the timings are not those of the first reads after a bulk load). `--url` runs only the queries, against a
PostgreSQL database loaded by an earlier run (the load and build of a million take ~15 minutes).
PostgreSQL is loaded in SQL (INSERT … SELECT over generate_series, each transcript 20 messages drawn from a pool
of 5,000 that Python made from a vocabulary of 3,000 words); SQLite with executemany from the same pool. The words:
`common` is in ~30% of conversations, `middling` in ~1% (about where the planner switches from walking the start
index to reading the GIN index, so the slowest case), `zanzibar` in 1 of 20,000.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import Engine

from service.api.query_params import parse_filter
from service.api.reads import list_conversations
from service.config import Settings
from service.storage.db import create_engine
from service.storage.migrations import upgrade
from tests.bench.read_api import percentiles, postgresql_database, timed
from tests.support.live import live_server

TOKEN = "bench-token"
T_END = 1_760_000_000
SPAN = 365 * 86_400
POOL = 5_000
TURNS = 20
RARE_EVERY = 20_000
QUERIES = {
    "common word": [("q", "common")],
    "middling word": [("q", "middling")],
    "rare word": [("q", "zanzibar")],
    "two words (common + middling)": [("q", "common middling")],
    "common word + agent_id": [("q", "common"), ("agent_id", "agent_07")],
}


def pool(seed: int = 3) -> list[str]:
    """Messages of 6-20 words from a Zipf-like vocabulary; `common` in ~1.8% of them (~30% of 20-turn calls),
    `middling` in ~0.05% (~1%)."""
    rng = random.Random(seed)
    vocabulary = [f"w{n}" for n in range(3_000)]
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]
    messages = []
    for n in range(POOL):
        words = rng.choices(vocabulary, weights, k=rng.randrange(6, 21))
        if n % 56 == 0:
            words.append("Common")
        if n % 2_000 == 7:
            words.append("middling")
        messages.append(" ".join(words).capitalize() + ".")
    return messages


def load_postgresql(engine: Engine, count: int, messages: list[str]) -> None:
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("SET statement_timeout = 0")
        cursor.execute("CREATE TEMP TABLE pool (n int PRIMARY KEY, message text)")
        with cursor.copy("COPY pool (n, message) FROM STDIN") as copy:
            for n, message in enumerate(messages):
                copy.write_row((n, message))
        cursor.execute(
            f"""
            INSERT INTO conversation (conversation_id, agent_id, status, start_time_unix_secs, call_summary_title,
                transcript_summary, transcript, audio_stored, first_seen_via, first_seen_at, complete, revision,
                data_rank, updated_at)
            SELECT 'conv_' || lpad(to_hex(i), 26, '0'), 'agent_' || lpad((i % 20)::text, 2, '0'), 'done',
                {T_END} - (hashint8(i) & 2147483647) % {SPAN}, 'A call about an order',
                'The caller asked about an order and got an answer.',
                (SELECT jsonb_agg(jsonb_build_object('role', CASE WHEN t % 2 = 0 THEN 'agent' ELSE 'user' END,
                                                     'message', p.message, 'time_in_call_secs', t * 5) ORDER BY t)
                   FROM generate_series(0, {TURNS - 1}) AS t
                   JOIN pool AS p ON p.n = (hashint8(i * {TURNS} + t) & 2147483647) % {POOL})
                || CASE WHEN i % {RARE_EVERY} = 0
                        THEN '[{{"role": "user", "message": "I flew to Zanzibar."}}]'::jsonb ELSE '[]'::jsonb END,
                false, 'webhook', now(), true, 1, 35, now()
            FROM generate_series(1, {count}) AS i
            """
        )
        raw.commit()
        cursor.execute("ANALYZE conversation")
        raw.commit()
    finally:
        raw.close()


def load_sqlite(engine: Engine, count: int, messages: list[str]) -> None:
    rng = random.Random(5)
    columns = (
        "conversation_id, agent_id, status, start_time_unix_secs, call_summary_title, transcript_summary, transcript, "
        "audio_stored, first_seen_via, first_seen_at, complete, revision, data_rank, updated_at"
    )
    sql = f"INSERT INTO conversation ({columns}) VALUES (?, ?, 'done', ?, ?, ?, ?, 0, 'webhook', ?, 1, 1, 35, ?)"
    at = "2026-01-01 00:00:00.000000"
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("PRAGMA synchronous=OFF")  # loading only; the server runs with FULL
        cursor.execute("BEGIN")
        batch = []
        for i in range(1, count + 1):
            turns = [
                {"role": "agent" if t % 2 == 0 else "user", "message": rng.choice(messages), "time_in_call_secs": t * 5}
                for t in range(TURNS)
            ]
            if i % RARE_EVERY == 0:
                turns.append({"role": "user", "message": "I flew to Zanzibar."})
            batch.append(
                (
                    f"conv_{i:026x}",
                    f"agent_{i % 20:02d}",
                    T_END - rng.randrange(SPAN),
                    "A call about an order",
                    "The caller asked about an order and got an answer.",
                    json.dumps(turns),
                    at,
                    at,
                )
            )
            if len(batch) == 5_000:
                cursor.executemany(sql, batch)
                batch = []
        cursor.executemany(sql, batch)
        cursor.execute("COMMIT")
        cursor.execute("ANALYZE")
    finally:
        raw.close()


def sizes(engine: Engine) -> str:
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            gin_index = "pg_relation_size('ix_conversation_search_document')"
            table, gin, records = conn.exec_driver_sql(
                f"SELECT pg_total_relation_size('conversation_search') - {gin_index}, {gin_index},"
                " pg_total_relation_size('conversation')"
            ).one()
            mib = 2**20
            return (
                f"entries {table / mib:,.0f} MiB + GIN index {gin / mib:,.0f} MiB (records: {records / mib:,.0f} MiB)"
            )
        size = sum(
            conn.exec_driver_sql(
                f"SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name LIKE '{prefix}%'"
            ).scalar_one()
            for prefix in ("conversation_search",)
        )
        whole = conn.exec_driver_sql(
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()"
        ).scalar_one()
        return f"search tables {size / 2**20:,.0f} MiB (whole file {whole / 2**20:,.0f} MiB)"


def matches(engine: Engine, params: list[tuple[str, str]]) -> int:
    """How many conversations a search finds (every page), for the table."""
    count, wanted = 0, parse_filter([*params, ("limit", "500")])
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET statement_timeout = 0")
        while True:
            page = list_conversations(conn, wanted)
            count += len(page.records)
            if page.next_cursor is None:
                return count
            wanted = type(wanted)(**{**wanted.__dict__, "after": page.next_cursor})


def load(dialect: str, engine: Engine, count: int) -> None:
    upgrade(engine, "0008")
    messages = pool()
    started = time.perf_counter()
    (load_postgresql if dialect == "postgresql" else load_sqlite)(engine, count, messages)
    print(f"\n{dialect}: loaded {count:,} conversations of {TURNS} turns in {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    upgrade(engine, "0009")
    print(f"  migration 0009 (index build) {time.perf_counter() - started:8.1f} s   {sizes(engine)}")
    if dialect == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE) conversation, conversation_search")


def bench(dialect: str, url: str, count: int, runs: int, data_dir: Path, loaded: bool = False) -> None:
    engine = create_engine(url)
    if loaded:
        print(f"\n{dialect}: the database loaded before   {sizes(engine)}")
    else:
        load(dialect, engine, count)
    print(f"  load average {' '.join(f'{value:.1f}' for value in os.getloadavg())} ({os.cpu_count()} cores)")
    for label, params in QUERIES.items():
        wanted = parse_filter(params)

        def query(wanted: Any = wanted) -> object:
            with engine.connect() as conn:
                return list_conversations(conn, wanted)

        found = matches(engine, params)
        print(f"  query  {label:32s} {found:>9,} found   {percentiles(timed(runs, query))}")
    settings = Settings(database_url=url, data_dir=data_dir, api_tokens=TOKEN, _env_file=None)
    from service.web.app import create_app

    with live_server(create_app(settings, engine=engine)) as base, httpx.Client(base_url=base) as client:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        for label, params in QUERIES.items():

            def get(params: Any = params) -> object:
                answer = client.get("/v1/conversations", params=params, headers=headers)
                assert answer.status_code == 200, answer.text
                return answer

            print(f"  HTTP   {label:32s} {'':>15s} {percentiles(timed(runs, get))}")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000, help="PostgreSQL")
    parser.add_argument("--sqlite-rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--only", choices=["postgresql", "sqlite"])
    parser.add_argument("--url", help="PostgreSQL database loaded by an earlier run: run only the queries")
    args = parser.parse_args()
    print(f"search benchmark, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    with tempfile.TemporaryDirectory(prefix="postcall-bench-") as tmp:
        if args.url:
            bench("postgresql", args.url, args.rows, args.runs, Path(tmp) / "pg-data", loaded=True)
        elif args.only in (None, "postgresql"):
            with postgresql_database() as url:
                bench("postgresql", url, args.rows, args.runs, Path(tmp) / "pg-data")
        if args.only in (None, "sqlite") and not args.url:
            name = f"sqlite:///{tmp}/search-{uuid.uuid4().hex[:6]}.db"
            bench("sqlite", name, args.sqlite_rows, args.runs, Path(tmp) / "sqlite-data")


if __name__ == "__main__":
    main()
