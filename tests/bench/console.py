"""Console benchmark: the list page (and coverage) at 1,000,000 conversations, p50/p99 of the server's time for
the whole page (from the request reaching the app to the last byte of HTML) and of the HTTP round trip.

    uv run python -m tests.bench.console [--rows 1000000] [--runs 300] [--only postgresql|sqlite] [--no-vacuum]

The data set and its loading are the read API benchmark's (tests/bench/read_api.py): the same rows, COPY into
PostgreSQL, multi-row INSERTs into SQLite. The session cookie is minted with the console's own signing
(service/console/session.py), as a sign-in would. The server's time is measured by an ASGI wrapper around the app
in the same process, so it leaves out the client and the loopback.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from service.config import Settings
from service.console.session import COOKIE, Tokens, sign_in
from service.storage.db import create_engine
from service.storage.migrations import upgrade
from service.web.app import create_app
from tests.bench.read_api import (
    T_END,
    TOKEN,
    deep_cursor,
    load_postgresql,
    load_sqlite,
    percentiles,
    postgresql_database,
    timed,
)
from tests.support.live import live_server


class ServerTimer:
    """ASGI wrapper: how long the app took for each HTTP request, until its last body message was sent."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.samples: list[float] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.samples.append(time.perf_counter() - started)

        await self.app(scope, receive, timed_send)


def pages(engine: Any, count: int) -> dict[str, str]:
    agent = "agent_07"
    return {
        "list, first page (50)": "/console/conversations",
        "list, agent_id + status filter": f"/console/conversations?agent_id={agent}&status=done",
        "list, deep cursor 90% in": f"/console/conversations?cursor={deep_cursor(engine, '', int(count * 0.9))}",
        "coverage (30 days, all agents)": "/console/coverage?days=30",
    }


def bench(dialect: str, url: str, count: int, runs: int, data_dir: Path, vacuum: bool = True) -> None:
    engine = create_engine(url)
    upgrade(engine)
    started = time.perf_counter()
    (load_postgresql if dialect == "postgresql" else load_sqlite)(engine, count)
    print(f"\n{dialect}: loaded {count:,} conversations in {time.perf_counter() - started:.0f} s")
    if dialect == "postgresql" and vacuum:
        # What autovacuum does to a table after inserts (migration 0011 has it run after every 1% new rows): set
        # the visibility map the coverage index's index-only scan relies on. Without it each row in the window is
        # read from the table, as `--no-vacuum` shows.
        started = time.perf_counter()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE) conversation")
        print(f"  VACUUM (ANALYZE) conversation {time.perf_counter() - started:.0f} s")
    settings = Settings(database_url=url, data_dir=data_dir, api_tokens=TOKEN, _env_file=None)  # type: ignore[call-arg]
    # The data set's newest start is T_END: "today" for the coverage page is that day.
    timer = ServerTimer(create_app(settings, engine=engine, clock=lambda: float(T_END)))
    session = sign_in(TOKEN, Tokens(read=[TOKEN.encode()], admin=[]), float(T_END))
    assert session is not None
    with live_server(timer) as base, httpx.Client(base_url=base, cookies={COOKIE: session.value}) as client:
        for label, path in pages(engine, count).items():

            def get(path: str = path) -> object:
                answer = client.get(path)
                assert answer.status_code == 200, answer.status_code
                return answer

            timer.samples.clear()
            round_trips = timed(runs, get)
            server = timer.samples[-runs:]
            print(f"  {label:34s} server {percentiles(server)}   HTTP {percentiles(round_trips)}")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--only", choices=["postgresql", "sqlite"])
    parser.add_argument("--no-vacuum", action="store_true", help="PostgreSQL: leave the visibility map unset")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:

        def run(dialect: str, url: str) -> None:
            bench(dialect, url, args.rows, args.runs, Path(tmp) / dialect, vacuum=not args.no_vacuum)

        if args.only in (None, "postgresql"):
            with postgresql_database() as url:
                run("postgresql", url)
        if args.only in (None, "sqlite"):
            run("sqlite", f"sqlite:///{tmp}/bench.db")


if __name__ == "__main__":
    main()
