"""`postcall serve` faces the internet without a proxy (issue 18, item 5): request heads must come whole, soon and
small, and connections that never finish theirs cannot take every file descriptor."""

from __future__ import annotations

import errno
import resource
import select
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import ClassVar

import httpx
import psutil
import pytest
from sqlalchemy.engine import Engine

from service.config import Settings
from service.web.app import create_app
from service.web.server import HeadLimitedProtocol
from tests.support import webhooks as wh
from tests.support.databases import migrated_sqlite
from tests.support.live import live_server
from tests.support.process import serve_process

URL = "/webhooks/elevenlabs"
MIB = 1 << 20


def serve_env(tmp_path: Path) -> dict[str, str]:
    return {
        "POSTCALL_DATABASE_URL": migrated_sqlite(str(tmp_path / "postcall.db")),
        "POSTCALL_WEBHOOK_SECRETS": wh.SECRET,
        "POSTCALL_DATA_DIR": str(tmp_path / "data"),
    }


def address(base_url: str) -> tuple[str, int]:
    host, port = base_url.removeprefix("http://").split(":")
    return host, int(port)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


# --- a real `postcall serve` ------------------------------------------------------------------------------------------

HUGE_HEADER_BYTES = 128 * MIB


def send_huge_header(base_url: str) -> tuple[int, bytes]:
    """Send a request whose one header grows towards 128 MiB, until the server answers or hangs up; returns how
    many bytes went out and what came back."""
    piece = b"a" * 65536
    sent, answer = 0, b""
    with socket.create_connection(address(base_url), timeout=60) as sock:
        sock.sendall(f"POST {URL} HTTP/1.1\r\nHost: x\r\nX-Huge: ".encode())
        try:
            while sent < HUGE_HEADER_BYTES:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has something to say (or has closed)
                sock.sendall(piece)
                sent += len(piece)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError as exc:
            # Refused while we were still sending (a broken pipe, a reset, or a socket the server already closed,
            # which shutdown() finds not connected): what we read so far is the answer.
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                raise
    return sent, answer


def test_a_128_mib_request_header_is_refused_after_64_kib_and_costs_the_server_little(tmp_path: Path) -> None:
    with serve_process(serve_env(tmp_path), "--no-migrate") as (base_url, proc):
        assert httpx.get(base_url + "/healthz", timeout=10).status_code == 200
        before = cpu_seconds(proc.pid)

        sent, answer = send_huge_header(base_url)

        spent = cpu_seconds(proc.pid) - before
        assert sent < HUGE_HEADER_BYTES, "the server read the whole 128 MiB header"
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:100]
        # It cost 21 s of CPU before the limit; the margin is wide so that a busy machine cannot fail this.
        assert spent < 5, f"the server spent {spent:.1f} s of CPU on one header"
        assert httpx.get(base_url + "/healthz", timeout=10).status_code == 200


@contextmanager
def soft_open_files_limit(limit: int) -> Iterator[None]:
    """This process's soft limit of open files set to `limit` (children started meanwhile inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


STUCK_HEADS = 1100  # past the usual default soft limit of 1,024 open files


def test_serve_raises_its_open_files_limit_so_1100_heads_that_never_end_leave_room(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2 * STUCK_HEADS + 200:
        pytest.skip(f"the hard limit of open files here ({hard}) is too low to open {STUCK_HEADS} connections")
    body = wh.encode(wh.transcription("conv_amid_stuck_heads"))
    stuck: list[socket.socket] = []
    with soft_open_files_limit(hard), ExitStack() as server:
        with soft_open_files_limit(1024):  # what the server starts with, as on many machines
            url, proc = server.enter_context(serve_process(serve_env(tmp_path), "--no-migrate"))
        try:
            assert psutil.Process(proc.pid).rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)
            for _ in range(STUCK_HEADS):
                sock = socket.create_connection(address(url), timeout=10)
                sock.sendall(f"POST {URL} HTTP/1.1\r\nHost: x\r\n".encode())  # and never the rest
                stuck.append(sock)

            answer = httpx.post(url + URL, content=body, headers=wh.signed_headers(body), timeout=20)

            assert answer.status_code == 200, answer.text
        finally:
            for sock in stuck:
                sock.close()


# --- the protocol, with short limits, in this process ---------------------------------------------------------------


class QuickHeads(HeadLimitedProtocol):
    head_timeout_seconds: ClassVar[float] = 0.5
    max_head_bytes: ClassVar[int] = 4096


@pytest.fixture
def quick(settings: Settings, engine: Engine) -> Iterator[str]:
    with live_server(create_app(settings, engine=engine), http=QuickHeads) as url:
        yield url


def exchange(url: str, request: bytes, *, then: float = 0.0, more: bytes = b"") -> tuple[bytes, bool]:
    """Send `request`, then after `then` seconds `more`; read until the server closes the connection or 5 s pass.
    Returns what came back and whether the server closed the connection."""
    answer = b""
    with socket.create_connection(address(url), timeout=5) as sock:
        sock.sendall(request)
        if more:
            time.sleep(then)
            sock.sendall(more)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            return answer, False
    return answer, True


def signed_request(body: bytes, extra_header: str = "") -> tuple[bytes, bytes]:
    signature = wh.signed_headers(body)["ElevenLabs-Signature"]
    head = (
        f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"ElevenLabs-Signature: {signature}\r\nConnection: close\r\n{extra_header}\r\n"
    )
    return head.encode(), body


def test_a_head_that_does_not_come_whole_in_time_gets_408_and_the_connection_closes(quick: str) -> None:
    answer, closed = exchange(quick, f"POST {URL} HTTP/1.1\r\nHost: x\r\n".encode())
    assert closed and answer.startswith(b"HTTP/1.1 408 "), answer


def test_a_connection_that_sends_nothing_is_closed_without_a_word(quick: str) -> None:
    assert exchange(quick, b"") == (b"", True)


def test_the_head_deadline_does_not_cut_a_body_that_takes_longer_than_it(quick: str) -> None:
    head, body = signed_request(wh.encode(wh.transcription("conv_slow_body")))
    answer, _ = exchange(quick, head + body[:100], then=1.0, more=body[100:])  # the body ends after the deadline
    assert answer.startswith(b"HTTP/1.1 200 "), answer


def test_the_next_head_on_a_kept_alive_connection_has_its_own_deadline(quick: str) -> None:
    answer, closed = exchange(quick, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in answer and closed, answer


def test_a_head_over_the_limit_gets_431(quick: str) -> None:
    head, body = signed_request(b"{}", extra_header=f"X-Padding: {'p' * 5000}\r\n")
    answer, closed = exchange(quick, head + body)
    assert closed and answer.startswith(b"HTTP/1.1 431 "), answer


def test_a_head_just_within_the_limit_and_its_body_in_one_packet_are_served(quick: str) -> None:
    body = wh.encode(wh.transcription("conv_full_head"))
    head, _ = signed_request(body)
    padding = QuickHeads.max_head_bytes - len(head) - len("X-Padding: \r\n")
    head, body = signed_request(body, extra_header=f"X-Padding: {'p' * padding}\r\n")
    assert len(head) == QuickHeads.max_head_bytes
    answer, _ = exchange(quick, head + body)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
