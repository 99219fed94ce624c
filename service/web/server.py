"""How `postcall serve` runs uvicorn: with limits of its own, so it can face the internet without a proxy.

Measured against uvicorn 0.54 with httptools, as it comes (issue 18, item 5):
- a connection that never finishes its request head is never timed out (uvicorn's keep-alive timeout starts only
  after a first response), so 1,100 of them took every file descriptor of the default soft limit of 1,024;
- the head's size is not limited either (`h11_max_incomplete_event_size` applies to h11 only), and httptools
  gathers a header trickled in pieces by concatenation: a 128 MiB header cost 21 s of CPU.
`HeadLimitedProtocol` gives every head HEAD_TIMEOUT_SECONDS and MAX_HEAD_BYTES; `raise_open_files_limit` lifts
the soft descriptor limit to the hard one; and `serve --limit-concurrency` has uvicorn answer 503 past a number
of connections (idle ones count) instead of letting requests pile up. Bodies have limits of their own (size,
pace, pending budget: service/webhook/).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("postcall.server")

# ElevenLabs' heads are under 1 KiB; nginx's default allows 4 x 8 KiB lines. 64 KiB leaves room for any proxy.
MAX_HEAD_BYTES = 64 * 1024
# A genuine client sends its head in one packet; nginx's client_header_timeout default is 60 s.
HEAD_TIMEOUT_SECONDS = 10.0
KEEP_ALIVE_SECONDS = 5

_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_HEAD_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class HeadLimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, where each request head must arrive within `head_timeout_seconds` of the
    connection (or of its first byte, on a kept-alive connection) and hold at most `max_head_bytes`: else the
    connection is answered 408 or 431 and closed. Bytes are counted before the parser sees them, so a huge head
    costs no more than `max_head_bytes` of parsing."""

    head_timeout_seconds: ClassVar[float] = HEAD_TIMEOUT_SECONDS
    max_head_bytes: ClassVar[int] = MAX_HEAD_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = False  # waiting for a head: from the connection, or from the first byte of the next request
        self._head_begun = False  # and some of it came
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_head:  # the next request on a kept-alive connection
            self._start_head()
        self._head_begun = True

    def on_headers_complete(self) -> None:
        self._in_head = self._head_begun = False
        self._stop_head_timer()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if not self._in_head:
            super().data_received(data)
            return
        room = self.max_head_bytes - self._head_bytes
        self._head_bytes += min(len(data), room)
        if len(data) <= room:
            super().data_received(data)
            return
        # Feed what the head may still hold: the rest is acceptable only as a body, after a head that ended there.
        super().data_received(data[:room])
        if self._in_head:
            self._refuse(_HEAD_TOO_LARGE, f"request head over {self.max_head_bytes} bytes")
        elif not self.transport.is_closing():
            super().data_received(data[room:])

    def _start_head(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_seconds, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head arriving while the previous request is answered: judge it once that is done.
            self._head_timer = self.loop.call_later(self.head_timeout_seconds, self._head_timed_out)
        elif self._head_begun:
            self._refuse(_REQUEST_TIMEOUT, f"request head not complete within {self.head_timeout_seconds} s")
        elif self._in_head:
            self._refuse(None, "nothing sent")  # a connection that never said a word is closed without one

    def _refuse(self, answer: bytes | None, reason: str) -> None:
        self._stop_head_timer()
        if self.transport.is_closing():
            return
        log.info("connection closed: %s", reason)
        if answer is not None:
            self.transport.write(answer)
        self.transport.close()


def raise_open_files_limit() -> int:
    """Lift the soft limit of open files to the hard one (each connection holds one); returns the limit now.

    Where the hard limit is all there is (systemd's LimitNOFILE= sets both; a seccomp filter may forbid
    setrlimit) nothing is called."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning("open files limit stays at %d: %s", soft, exc)
        return soft
    return hard
