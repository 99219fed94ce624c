"""Reconcile benchmark: backfill N conversations from the fake platform (no latency) into an empty database.

    uv run python -m tests.bench.reconcile [--counts 1000,10000,20000] [--db sqlite,postgresql] [--concurrency 8]

For each count and database, a fresh child process runs one `Reconciler.run` against the fake platform served
by another child process, and reports: conversations per second of wall time and per second of the reconciling
process's CPU time (the fake shares the machine); "own": per second of that CPU time minus what plain httpx needs
for the same requests with the same limits (measured after the run, in the same process), i.e. the cost of
postcall's own code per conversation; API calls made against
the minimum (one list call per 100 conversations plus one detail call per missing conversation), and its peak
RSS (Linux VmHWM, reset after start-up), which must stay flat as N grows: pages are streamed, never collected.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

AGENT = "agent_bench"
KEY = "bench-key"


def serve_fake(count: int, port: int) -> None:
    """Child process: the fake platform with `count` final conversations of one agent."""
    from service.testing import FakePlatform, seed_conversations

    now = int(time.time())
    conversations = seed_conversations(count, (AGENT,), now=now, spread_seconds=5 * 86400, seed=1)
    platform = FakePlatform(api_key=KEY, conversations=conversations, agents=(AGENT,), log_calls=False)
    del conversations
    with platform.serve(port=port):
        print("ready", flush=True)
        sys.stdin.read()  # until the parent closes our stdin


def run_once(count: int, database_url: str, base_url: str, concurrency: int) -> dict[str, object]:
    """Child process: one reconcile run; prints its figures as JSON."""
    import anyio

    from service.elevenlabs import ElevenLabsClient
    from service.reconcile.reconciler import Options, Reconciler
    from service.storage.audio import BlobStore
    from service.storage.db import create_engine
    from tests.support.process import peak_rss_bytes, reset_peak_rss, rss_bytes

    engine = create_engine(database_url)
    data_dir = Path(tempfile.mkdtemp(prefix="postcall-bench-"))

    async def go() -> tuple[float, dict[str, int], dict[str, int]]:
        async with ElevenLabsClient.open(base_url, KEY, concurrency=concurrency) as client:
            reconciler = Reconciler(engine, client, BlobStore(data_dir))
            options = Options(agents=(AGENT,), since=int(time.time()) - 6 * 86400)
            reset_peak_rss(os.getpid())
            started, cpu_started = time.perf_counter(), time.process_time()
            report = await reconciler.run(options)
            cpu_seconds = time.process_time() - cpu_started
            return time.perf_counter() - started, cpu_seconds, report.counts.as_dict(), dict(client.calls)

    baseline = rss_bytes(os.getpid())
    seconds, cpu_seconds, counts, calls = anyio.run(go)
    engine.dispose()
    peak = peak_rss_bytes(os.getpid())
    floor_cpu_seconds = anyio.run(bare_httpx_cpu, base_url, concurrency)
    return {
        "count": count,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "counts": counts,
        "calls": calls,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "floor_cpu_seconds": floor_cpu_seconds,
    }


async def bare_httpx_cpu(base_url: str, concurrency: int) -> float:
    """CPU seconds that plain httpx needs for the same calls (every list page, every detail) with the same
    connection limits and nothing else: the floor under the reconciler, so what is above it is our own cost."""
    import anyio
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    headers = {"xi-api-key": KEY}
    started = time.process_time()
    async with httpx.AsyncClient(base_url=base_url, limits=limits, headers=headers) as http:
        slots = anyio.Semaphore(concurrency)

        async def detail(conversation_id: str) -> None:
            async with slots:
                (await http.get(f"/v1/convai/conversations/{conversation_id}")).json()

        params: dict[str, object] = {"agent_id": AGENT, "page_size": 100}
        while True:
            page = (await http.get("/v1/convai/conversations", params=params)).json()
            async with anyio.create_task_group() as group:
                for summary in page["conversations"]:
                    group.start_soon(detail, summary["conversation_id"])
            if not page["has_more"]:
                break
            params["cursor"] = page["next_cursor"]
    return time.process_time() - started


@contextmanager
def fake_platform(count: int) -> Iterator[str]:
    from tests.support.live import free_port

    port = free_port()
    command = [sys.executable, "-m", "tests.bench.reconcile", "--serve-fake", str(count), str(port)]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the fake platform did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


@contextmanager
def database(kind: str) -> Iterator[str]:
    from tests.support.databases import migrated_sqlite, postgres_database

    if kind == "postgresql":
        with postgres_database() as url:
            yield url
        return
    with tempfile.TemporaryDirectory(prefix="postcall-bench-db-") as tmp:
        yield migrated_sqlite(str(Path(tmp) / "bench.db"))


def measure(count: int, kind: str, concurrency: int) -> dict[str, object]:
    with fake_platform(count) as base_url, database(kind) as url:
        command = [sys.executable, "-m", "tests.bench.reconcile", "--run-once", str(count), url, base_url]
        out = subprocess.run([*command, str(concurrency)], capture_output=True, text=True, check=True).stdout
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    result["db"] = kind
    return result


def row(result: dict[str, object]) -> str:
    count = int(result["count"])  # type: ignore[call-overload]
    counts: dict[str, int] = result["counts"]  # type: ignore[assignment]
    calls: dict[str, int] = result["calls"]  # type: ignore[assignment]
    minimum = math.ceil(count / 100) + count
    made = sum(calls.values()) - calls.get("agents", 0)
    seconds = float(result["seconds"])  # type: ignore[arg-type]
    cpu = float(result["cpu_seconds"])  # type: ignore[arg-type]
    own = cpu - float(result["floor_cpu_seconds"])  # type: ignore[arg-type]
    mib = 1024 * 1024
    return (
        f"{result['db']:<10} {count:>7} {seconds:>7.1f}s {count / seconds:>6.0f}/s "
        f"CPU {cpu:>5.1f}s {count / cpu:>5.0f}/CPU-s own {own:>5.1f}s {count / own:>5.0f}/s "
        f"{made:>7} calls (min {minimum}, list {calls.get('list', 0)}, detail {calls.get('detail', 0)}) "
        f"stored new {counts['new']:>7} failed {counts['failed']} "
        f"peak RSS {int(result['peak_rss']) / mib:>6.1f} MiB (at start {int(result['baseline_rss']) / mib:.1f})"  # type: ignore[call-overload]
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-fake":
        serve_fake(int(sys.argv[2]), int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--run-once":
        count, url, base_url, concurrency = sys.argv[2:6]
        print(json.dumps(run_once(int(count), url, base_url, int(concurrency))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1000,10000,20000")
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    for kind in args.db.split(","):
        for count in (int(n) for n in args.counts.split(",")):
            print(row(measure(count, kind, args.concurrency)), flush=True)


if __name__ == "__main__":
    main()
