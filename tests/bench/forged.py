"""Forged-body attack: what unauthenticated senders make a real `postcall serve` hold in memory and on disk.

    uv run python -m tests.bench.forged [--senders 4] [--mib 100] [--shapes json,audio] [--declared]

One real server process (SQLite, one worker, default settings). `--senders` threads each post, at the same
time, a body of `--mib` MiB signed with the wrong secret, streamed with chunked transfer encoding (or with a
Content-Length, `--declared`), in one of two shapes:
    json    a transcription whose transcript holds the bulk of the body (nothing to split off)
    audio   a post_call_audio event whose data.full_audio holds the bulk, as ElevenLabs sends audio
While they are in flight, psutil samples the server's RSS, and the disk its data dir takes (files there, and files
the server holds open there without a name) every 20 ms; the table shows the growth of both over their values
before the attack (RSS also as Linux's exact peak, VmHWM), what the data dir still takes once every answer came,
and the answers.
"""

from __future__ import annotations

import argparse
import base64
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from service.webhook.signature import sign
from tests.support.databases import migrated_sqlite
from tests.support.process import disk_bytes, peak_rss_bytes, reset_peak_rss, serve_process
from tests.support.webhooks import SECRET

PIECE = 64 * 1024
MIB = 1 << 20
FILLER = {"json": b"x" * PIECE, "audio": base64.b64encode(os.urandom(PIECE // 4 * 3))}
HEADS = {
    "json": b'{"type":"post_call_transcription","data":{"conversation_id":"conv_forged","transcript":[{"message":"',
    "audio": b'{"type":"post_call_audio","data":{"conversation_id":"conv_forged","full_audio":"',
}
TAILS = {"json": b'"}]}}', "audio": b'"}}'}


def forged_body(shape: str, mebibytes: int) -> Iterator[bytes]:
    """About `mebibytes` MiB of a readable event, generated piece by piece, never whole in the sender."""
    yield HEADS[shape]
    for _ in range(mebibytes * MIB // PIECE):
        yield FILLER[shape]
    yield TAILS[shape]


def body_size(shape: str, mebibytes: int) -> int:
    return len(HEADS[shape]) + mebibytes * MIB // PIECE * PIECE + len(TAILS[shape])


@dataclass
class Sampler:
    """Peak RSS and data-dir size of the server, sampled until `stop()`."""

    pid: int
    data_dir: Path
    peak_rss: int = 0
    peak_disk: int = 0
    _done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        process = psutil.Process(self.pid)
        while not self._done.is_set():
            self.peak_rss = max(self.peak_rss, process.memory_info().rss)
            self.peak_disk = max(self.peak_disk, disk_bytes(self.data_dir, self.pid))
            time.sleep(0.02)

    def stop(self) -> None:
        self._done.set()


def attack(endpoint: str, shape: str, senders: int, mebibytes: int, declared: bool) -> Counter[int | str]:
    """Every sender posts its forged body at once; returns the answers' statuses (or the error that ended one)."""
    answers: Counter[int | str] = Counter()
    lock = threading.Lock()
    signature = sign(b"not this body", SECRET.encode(), int(time.time()))  # the right secret, another body

    def send() -> None:
        headers = {"ElevenLabs-Signature": signature, "Content-Type": "application/json"}
        if declared:
            headers["Content-Length"] = str(body_size(shape, mebibytes))
        try:
            status: int | str = httpx.post(
                endpoint, content=forged_body(shape, mebibytes), headers=headers, timeout=600
            ).status_code
        except httpx.HTTPError as exc:  # the server may answer and close before the whole body is sent
            status = type(exc).__name__
        with lock:
            answers[status] += 1

    threads = [threading.Thread(target=send) for _ in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--mib", type=int, default=100, help="MiB of each forged body")
    parser.add_argument("--shapes", default="json,audio")
    parser.add_argument("--declared", action="store_true", help="send a Content-Length instead of chunks")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="postcall-bench-forged-"))
    data_dir = work / "data"
    env = {
        "POSTCALL_DATABASE_URL": migrated_sqlite(str(work / "postcall.db")),
        "POSTCALL_WEBHOOK_SECRETS": SECRET,
        "POSTCALL_DATA_DIR": str(data_dir),
    }
    framing = "Content-Length" if args.declared else "chunked"
    print(f"one `postcall serve` worker (SQLite); {args.senders} senders at once, {args.mib} MiB each, {framing}")
    print(
        f"{'shape':>5} {'peak RSS +MiB':>13} {'VmHWM +MiB':>10} {'peak disk MiB':>13} {'left MiB':>8} "
        f"{'seconds':>7}  answers"
    )
    with serve_process(env, "--no-migrate") as (base_url, proc):
        endpoint = f"{base_url}/webhooks/elevenlabs"
        httpx.post(endpoint, content=b"{}", timeout=30)  # warm up: imports, first request
        for shape in args.shapes.split(","):
            time.sleep(1)  # let the previous round's memory settle
            baseline_rss = psutil.Process(proc.pid).memory_info().rss
            baseline_disk = disk_bytes(data_dir, proc.pid)
            reset_peak_rss(proc.pid)
            sampler = Sampler(proc.pid, data_dir, peak_rss=baseline_rss, peak_disk=baseline_disk)
            sampling = threading.Thread(target=sampler.run)
            sampling.start()
            started = time.perf_counter()
            answers = attack(endpoint, shape, args.senders, args.mib, args.declared)
            elapsed = time.perf_counter() - started
            time.sleep(0.5)  # anything the server still does after its answers
            sampler.stop()
            sampling.join()
            hwm = peak_rss_bytes(proc.pid) - baseline_rss
            left = disk_bytes(data_dir, proc.pid) - baseline_disk
            print(
                f"{shape:>5} {(sampler.peak_rss - baseline_rss) / MIB:13.1f} {hwm / MIB:10.1f} "
                f"{(sampler.peak_disk - baseline_disk) / MIB:13.1f} {left / MIB:8.1f} {elapsed:7.1f}  "
                + ", ".join(f"{count} x {status}" for status, count in sorted(answers.items(), key=str))
            )


if __name__ == "__main__":
    main()
