"""Ingest benchmark: durable transcription webhooks per second, against the verify-and-parse ceiling.

    uv run python -m tests.bench.ingest [--duration 5] [--connections 32] [--db sqlite,postgresql]

Needs `wrk` (Debian: `apt-get install wrk`). Both servers run as one uvicorn worker with uvloop + httptools and
no access log; wrk drives each with the same unique signed ~24 KB bodies (so postcall never sees a duplicate),
and the table prints req/s, p50/p99 and the ratio to the ceiling measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from service.webhook.signature import sign
from tests.support.databases import migrated_sqlite, postgres_database
from tests.support.live import free_port
from tests.support.process import ROOT, wait_for_port

SECRET = "bench-secret"
LUA = """
local sigs, bodies, n, i, reused = {}, {}, 0, 0, 0
init = function(args)
  for line in io.lines(args[1]) do
    local tab = line:find("\\t", 1, true)
    n = n + 1
    sigs[n] = line:sub(1, tab - 1)
    bodies[n] = line:sub(tab + 1)
  end
end
request = function()
  i = i + 1
  if i > n then i = 1; reused = reused + 1 end
  return wrk.format("POST", "/webhooks/elevenlabs",
    {["ElevenLabs-Signature"] = sigs[i], ["Content-Type"] = "application/json"}, bodies[i])
end
"""


def transcription_body(n: int) -> bytes:
    turns = [
        {
            "role": "agent" if t % 2 else "user",
            "message": f"turn {t} of conversation {n}: " + "lorem ipsum " * 12,
            "time_in_call_secs": t * 3,
            "tool_calls": None,
            "feedback": None,
        }
        for t in range(90)
    ]
    event = {
        "type": "post_call_transcription",
        "event_timestamp": int(time.time()),
        "data": {
            "agent_id": "agent_bench",
            "conversation_id": f"conv_bench{n:08d}",
            "status": "done",
            "user_id": f"u{n}",
            "transcript": turns,
            "metadata": {"start_time_unix_secs": 1_760_000_000 + n, "call_duration_secs": 270, "cost": 100},
            "analysis": {"call_successful": "success", "transcript_summary": "A benchmark call."},
            "conversation_initiation_client_data": {"dynamic_variables": {"n": n}},
        },
    }
    return json.dumps(event, separators=(",", ":")).encode()


def write_requests(path: Path, count: int) -> int:
    ts = int(time.time())
    size = 0
    with path.open("wb") as out:
        for n in range(count):
            body = transcription_body(n)
            size = len(body)
            out.write(sign(body, SECRET.encode(), ts).encode() + b"\t" + body + b"\n")
    return size


@contextmanager
def uvicorn_server(target: str, env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        target,
        "--factory",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env})
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_wrk(url: str, requests_file: Path, script: Path, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            str(script),
            url,
            "--",
            str(requests_file),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50": _ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1)),  # type: ignore[union-attr]
        "p99": _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1)),  # type: ignore[union-attr]
        "requests": float(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "errors": float(errors.group(1)) if errors else 0.0,
    }


def _ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(\w+)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--bodies", type=int, default=20_000, help="unique signed bodies (more than one run sends)")
    parser.add_argument("--db", default="sqlite,postgresql")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")

    work = Path(tempfile.mkdtemp(prefix="postcall-bench-"))
    requests_file, script = work / "requests.tsv", work / "bodies.lua"
    script.write_text(LUA)
    size = write_requests(requests_file, args.bodies)
    print(
        f"{args.bodies} unique signed bodies of {size / 1024:.1f} KB, wrk -t1 -c{args.connections} "
        f"-d{args.duration}s, one uvicorn worker (uvloop, httptools), {os.cpu_count()} cores"
    )

    env = {"POSTCALL_WEBHOOK_SECRETS": SECRET, "POSTCALL_DATA_DIR": str(work / "data")}
    with uvicorn_server("tests.bench.ceiling:build", env) as url:
        run_wrk(url, requests_file, script, 1, args.connections)  # warm-up
        ceiling = run_wrk(url, requests_file, script, args.duration, args.connections)
    rows = [("verify-and-parse ceiling", ceiling, 1.0)]
    for db in args.db.split(","):
        with ExitStack() as stack:
            if db == "sqlite":
                db_url = migrated_sqlite(str(work / "bench.db"))
            else:
                db_url = stack.enter_context(postgres_database())
            with uvicorn_server("service.web.asgi:build", {**env, "POSTCALL_DATABASE_URL": db_url}) as url:
                result = run_wrk(url, requests_file, script, args.duration, args.connections)
            rows.append((f"postcall, {db}", result, result["rps"] / ceiling["rps"]))
    print(f"{'server':28} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'ratio':>6}")
    for name, r, ratio in rows:
        print(f"{name:28} {r['rps']:8.0f} {r['p50']:8.1f} {r['p99']:8.1f} {r['errors']:8.0f} {ratio:6.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
