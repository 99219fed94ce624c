"""Audio benchmark: peak RSS growth and throughput of `postcall serve` taking 10, 40 and 80 MB audio webhooks.

    uv run python -m tests.bench.audio [--sizes 10,40,80] [--repeat 3]

One real server process (SQLite, one worker). Each body is streamed with chunked transfer encoding from a
generator, as ElevenLabs sends it; the figures are the server's peak RSS over its RSS before the request (Linux
VmHWM, reset before each request) and the body's size divided by the time from the first byte sent to the 200.
The best of `--repeat` runs is printed for throughput, the worst for memory. Goals (issue 6): growth <= 64 MiB,
>= 150 MB/s of body.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import httpx

from tests.support.audio_body import AudioBody, blocks_for
from tests.support.databases import migrated_sqlite
from tests.support.process import peak_rss_bytes, reset_peak_rss, rss_bytes, serve_process
from tests.support.webhooks import SECRET


def post(endpoint: str, body: AudioBody, pid: int) -> tuple[float, int]:
    """Seconds to take the body, and the peak RSS growth while doing so."""
    baseline = rss_bytes(pid)
    reset_peak_rss(pid)
    headers = {"ElevenLabs-Signature": body.signature(int(time.time()))}
    started = time.perf_counter()
    answer = httpx.post(endpoint, content=body.pieces(), headers=headers, timeout=300)
    elapsed = time.perf_counter() - started
    answer.raise_for_status()
    assert answer.json()["status"] == "accepted", answer.text
    return elapsed, peak_rss_bytes(pid) - baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,40,80", help="MiB of MP3 per webhook")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="postcall-bench-audio-"))
    env = {
        "POSTCALL_DATABASE_URL": migrated_sqlite(str(work / "postcall.db")),
        "POSTCALL_WEBHOOK_SECRETS": SECRET,
        "POSTCALL_DATA_DIR": str(work / "data"),
    }
    print(f"one `postcall serve` worker (SQLite), bodies streamed chunked from loopback, {os.cpu_count()} cores")
    print(f"{'audio MiB':>9} {'body MB':>8} {'MB/s':>7} {'peak RSS growth MiB':>20}")
    with serve_process(env, "--no-migrate") as (base_url, proc):
        endpoint = f"{base_url}/webhooks/elevenlabs"
        post(endpoint, AudioBody("conv_warmup", blocks_for(1)), proc.pid)
        for megabytes in (int(size) for size in args.sizes.split(",")):
            runs = []
            for attempt in range(args.repeat):
                body = AudioBody(f"conv_bench_{megabytes}_{attempt}", blocks_for(megabytes))
                elapsed, growth = post(endpoint, body, proc.pid)
                runs.append((body.size() / elapsed / 1e6, growth))
            size_mb = AudioBody("x", blocks_for(megabytes)).size() / 1e6
            best_rate = max(rate for rate, _ in runs)
            worst_growth = max(growth for _, growth in runs)
            print(f"{megabytes:9d} {size_mb:8.1f} {best_rate:7.0f} {worst_growth / 2**20:20.1f}")


if __name__ == "__main__":
    main()
