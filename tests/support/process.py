"""`postcall serve` as a real child process, for tests that measure or kill the server."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tests.support.live import free_port

ROOT = Path(__file__).resolve().parents[2]


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("server did not start listening")


@contextmanager
def serve_process(
    env: Mapping[str, str], *args: str, log: Path | None = None, cwd: Path = ROOT
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run `python -m service serve` on a free port with `env` added, its standard error appended to `log` (else
    dropped); yields (base URL, process) once it listens, and stops it (or reaps it, if a test killed it) after."""
    port = free_port()
    command = [sys.executable, "-m", "service", "serve", "--port", str(port), *args]
    with ExitStack() as files:
        stderr = files.enter_context(log.open("ab")) if log is not None else subprocess.DEVNULL
        proc = subprocess.Popen(command, cwd=cwd, env={**os.environ, **env}, stderr=stderr)
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_bytes(pid: int) -> int:
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss_bytes(pid: int) -> int:
    return _status_kib(pid, "VmHWM") * 1024


def reset_peak_rss(pid: int) -> None:
    """Linux: writing 5 to clear_refs resets the peak-RSS high-water mark to the current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def disk_bytes(root: Path, pid: int | None = None) -> int:
    """Bytes of the files under `root`, and of those process `pid` holds open there even without a name (a
    deleted or anonymous temp file takes disk too, though no directory walk sees it)."""
    sizes: dict[tuple[int, int], int] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                info = os.stat(os.path.join(folder, name))
            except FileNotFoundError:
                continue  # removed while we walked
            sizes[(info.st_dev, info.st_ino)] = info.st_size
    if pid is not None:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if not os.readlink(fd).startswith(str(root.resolve())):
                    continue
                info = os.stat(fd)
            except FileNotFoundError:
                continue  # closed while we looked
            if stat.S_ISREG(info.st_mode):
                sizes[(info.st_dev, info.st_ino)] = info.st_size
    return sum(sizes.values())
