"""Forwarding benchmark: what forwarding costs the receiver, how fast it dispatches, how soon an event arrives,
and whether a large backlog drains in flat memory.

    uv run python -m tests.bench.forward [--db sqlite,postgresql] [--events 20000] [--backlog 100000]

- ingest: the ingest benchmark's wrk run (tests/bench/ingest.py) against `serve` without forwarding, then with one
  webhook sink on loopback (a separate uvicorn process answering 204 at once), in the same run;
- dispatch: N events already committed, then one dispatcher sends them all: to the loopback endpoint, and to
  NATS JetStream at 127.0.0.1:4222 (a stream of its own, deleted after);
- clients: the HTTP client alone, httpx.AsyncClient against aiohttp.ClientSession, each posting the same signed
  ~3 KB body to the loopback endpoint over 16 kept-alive connections, alternated twice in the same run;
- latency: events committed one by one at 100/s for 20 s while a dispatcher runs; commit to delivery recorded
  (`delivered_at - committed_at`, both stamped by the processes that did them);
- backlog: `postcall forward` as a process with the endpoint down while the backlog is committed, then up; its
  RSS sampled as it drains.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import anyio
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.forward import outbox
from service.forward.dispatcher import Dispatcher
from service.forward.events import CREATED, Event, new_event_id
from service.forward.nats_sink import NatsSink
from service.forward.sinks import Sink
from service.storage.db import create_engine, transaction
from tests.bench.ingest import LUA, run_wrk, uvicorn_server, write_requests
from tests.support.databases import migrated_sqlite, postgres_database
from tests.support.forwarding import FORWARD_SECRET, empty_forwarding, webhook_sink
from tests.support.process import rss_bytes

SECRET = "bench-secret"
NATS_URL = "nats://127.0.0.1:4222"
RECORD = {"conversation_id": "x", "transcript": [{"role": "agent", "message": "hello " * 40}] * 8}


def build_sink() -> Starlette:
    """The loopback endpoint: answers 204 at once (`uvicorn tests.bench.forward:build_sink --factory`)."""

    async def hook(request: Request) -> Response:
        await request.body()
        return Response(status_code=204)

    return Starlette(routes=[Route("/hook", hook, methods=["POST"])])


def fill(engine: Engine, count: int, batch: int = 2000) -> None:
    """`count` events of distinct conversations, ~3 KB each, committed in batches."""
    for start in range(0, count, batch):
        now = datetime.now(UTC)
        events = []
        for n in range(start, min(start + batch, count)):
            event_id = new_event_id()
            body = orjson.dumps({"id": event_id, "type": CREATED, "data": {"revision": 1, "conversation": RECORD}})
            events.append(Event(event_id, CREATED, f"conv_bench{n}", "agent_bench", 1, now, body.decode()))
        transaction(engine, lambda conn, events=events: outbox.add(conn, events))


def delivered(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM forward_delivery WHERE status = 'delivered'")).scalar())


@contextmanager
def running(engine: Engine, sinks: list[Sink]) -> Iterator[Dispatcher]:
    dispatcher = Dispatcher(engine, sinks, retention_seconds=30 * 86400)
    with anyio.from_thread.start_blocking_portal(backend_options={"use_uvloop": True}) as portal:
        future = portal.start_task_soon(dispatcher.run)
        try:
            yield dispatcher
        finally:
            future.cancel()


def wait_for(engine: Engine, count: int, timeout: float = 600) -> float:
    started = time.perf_counter()
    while delivered(engine) < count:
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"only {delivered(engine)} of {count} delivered in {timeout} s")
        time.sleep(0.05)
    return time.perf_counter() - started


def dispatch_rate(engine: Engine, sink: Sink, count: int) -> float:
    empty_forwarding(engine)
    fill(engine, count)
    with running(engine, [sink]):
        seconds = wait_for(engine, count)
    return count / seconds


def client_rates(url: str, count: int = 3000, connections: int = 16) -> dict[str, list[float]]:
    """Requests a second through each HTTP client, alternated so both see the same load."""
    import aiohttp
    import httpx

    body = orjson.dumps({"id": new_event_id(), "type": CREATED, "data": {"conversation": RECORD}})

    async def through_httpx() -> float:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(limits=limits) as client:
            return await _rate(lambda: client.post(url, content=body), count, connections)

    async def through_aiohttp() -> float:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:

            async def post() -> None:
                async with session.post(url, data=body) as answer:
                    await answer.read()

            return await _rate(post, count, connections)

    rates: dict[str, list[float]] = {"httpx": [], "aiohttp": []}
    for _ in range(2):
        rates["httpx"].append(asyncio.run(through_httpx()))
        rates["aiohttp"].append(asyncio.run(through_aiohttp()))
    return rates


async def _rate(post: Callable[[], Awaitable[object]], count: int, connections: int) -> float:
    left = iter(range(count))

    async def worker() -> None:
        for _ in left:
            await post()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return count / (time.perf_counter() - started)


def latency(engine: Engine, sink: Sink, rate: float = 100, seconds: float = 20) -> tuple[float, float, float, int]:
    empty_forwarding(engine)
    total = int(rate * seconds)
    with running(engine, [sink]):
        time.sleep(1)  # the loop is up
        started = time.perf_counter()
        for n in range(total):
            fill_one(engine, n)
            pause = started + (n + 1) / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        wait_for(engine, total)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT committed_at, delivered_at FROM forward_delivery")).all()
    waits = sorted((_utc(done) - _utc(committed)).total_seconds() * 1000 for committed, done in rows)
    return statistics.median(waits), waits[int(len(waits) * 0.99) - 1], waits[-1], len(waits)


def _utc(moment: datetime | str) -> datetime:
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def fill_one(engine: Engine, n: int) -> None:
    event_id = new_event_id()
    body = orjson.dumps({"id": event_id, "type": CREATED, "data": {"revision": 1, "conversation": RECORD}}).decode()
    event = Event(event_id, CREATED, f"conv_lat{n}", "agent_bench", 1, datetime.now(UTC), body)
    transaction(engine, lambda conn: outbox.add(conn, [event]))


def backlog(db_url: str, engine: Engine, count: int, work: Path) -> list[tuple[int, float]]:
    """(delivered, RSS MiB) samples of `postcall forward` draining `count` events after its endpoint comes up."""
    import subprocess

    empty_forwarding(engine)
    fill(engine, count)
    from tests.support.live import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    env = {
        **os.environ,
        "POSTCALL_DATABASE_URL": db_url,
        "POSTCALL_FORWARD_URLS": url,
        "POSTCALL_FORWARD_SECRET": FORWARD_SECRET,
    }
    log = (work / "forward.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "service", "forward"], env=env, stderr=log)
    samples: list[tuple[int, float]] = []
    try:
        time.sleep(3)  # the endpoint is down: every first attempt fails and waits for its retry
        samples.append((delivered(engine), rss_bytes(proc.pid) / 2**20))
        with _sink_on(port):
            deadline = time.monotonic() + 900
            while (done := delivered(engine)) < count and time.monotonic() < deadline:
                samples.append((done, rss_bytes(proc.pid) / 2**20))
                time.sleep(2)
            samples.append((delivered(engine), rss_bytes(proc.pid) / 2**20))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    return samples


@contextmanager
def _sink_on(port: int) -> Iterator[None]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(build_sink(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def nats_stream() -> Iterator[str]:
    import nats

    name = f"POSTCALL_BENCH_{uuid.uuid4().hex[:8].upper()}"
    try:
        yield name
    finally:

        async def delete() -> None:
            client = await nats.connect(NATS_URL)
            try:
                await client.jetstream().delete_stream(name)
            finally:
                await client.close()

        asyncio.run(delete())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--events", type=int, default=20_000, help="events for the dispatch rates")
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--duration", type=int, default=5, help="seconds of each wrk run")
    parser.add_argument(
        "--skip", default="", help="comma-separated parts to skip: ingest,dispatch,clients,latency,backlog"
    )
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    work = Path(tempfile.mkdtemp(prefix="postcall-bench-forward-"))
    requests_file, script = work / "requests.tsv", work / "bodies.lua"
    script.write_text(LUA)
    write_requests(requests_file, 20_000)
    print(f"{os.cpu_count()} cores; wrk -t1 -c32 -d{args.duration}s for ingest")
    print(f"{'db':11} {'what':46} {'figure':>24}")
    for db in args.db.split(","):
        with ExitStack() as stack:
            if db == "sqlite":
                db_url = migrated_sqlite(str(work / f"bench-{uuid.uuid4().hex[:6]}.db"))
            else:
                db_url = stack.enter_context(postgres_database())
            engine = create_engine(db_url)
            sink_url = stack.enter_context(uvicorn_server("tests.bench.forward:build_sink", {})) + "/hook"

            def row(what: str, figure: str, db: str = db) -> None:
                print(f"{db:11} {what:46} {figure:>24}", flush=True)

            if "ingest" not in skip:
                env = {"POSTCALL_WEBHOOK_SECRETS": SECRET, "POSTCALL_DATA_DIR": str(work / "data")}
                rates = {}
                for label, extra in (
                    ("off", {}),
                    ("on", {"POSTCALL_FORWARD_URLS": sink_url, "POSTCALL_FORWARD_SECRET": FORWARD_SECRET}),
                ):
                    empty_forwarding(engine)
                    with uvicorn_server(
                        "service.web.asgi:build", {**env, **extra, "POSTCALL_DATABASE_URL": db_url}
                    ) as url:
                        rates[label] = run_wrk(url, requests_file, script, args.duration, 32)
                        if label == "on":
                            time.sleep(2)
                            rates["forwarded"] = {"rps": float(delivered(engine))}
                    row(
                        f"ingest, forwarding {label}: req/s (p99 ms)",
                        f"{rates[label]['rps']:.0f} ({rates[label]['p99']:.0f})",
                    )
                row("ingest on/off", f"{rates['on']['rps'] / rates['off']['rps']:.2f}x")
                row("  events delivered 2 s after the run", f"{rates['forwarded']['rps']:.0f}")
            if "dispatch" not in skip:
                rate = dispatch_rate(engine, webhook_sink(sink_url), args.events)
                row(f"dispatch {args.events} events, HTTP", f"{rate:.0f}/s")
                with nats_stream() as stream:
                    rate = dispatch_rate(engine, NatsSink(NATS_URL, stream), args.events)
                row(f"dispatch {args.events} events, JetStream", f"{rate:.0f}/s")
            if "clients" not in skip and db == args.db.split(",")[0]:
                rates = client_rates(sink_url)
                for client, figures in rates.items():
                    row(f"{client} alone, 16 connections", " / ".join(f"{rate:.0f}" for rate in figures) + " req/s")
            if "latency" not in skip:
                p50, p99, worst, n = latency(engine, webhook_sink(sink_url))
                row(f"commit to delivery at 100/s, HTTP ({n})", f"p50 {p50:.0f} p99 {p99:.0f} max {worst:.0f} ms")
            if "backlog" not in skip:
                samples = backlog(db_url, engine, args.backlog, work)
                rss = [mib for _, mib in samples]
                row(
                    f"backlog {args.backlog}: RSS start / peak / end",
                    f"{rss[0]:.0f} / {max(rss):.0f} / {rss[-1]:.0f} MiB",
                )
                row("  delivered at the end", f"{samples[-1][0]}")
                for done, mib in samples[:: max(len(samples) // 6, 1)]:
                    row(f"  RSS at {done} delivered", f"{mib:.0f} MiB")
            empty_forwarding(engine)
            engine.dispose()


if __name__ == "__main__":
    main()
