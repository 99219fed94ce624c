"""A TCP proxy on loopback that a test can cut and restore: a database outage without stopping the database.

    with TcpProxy(("127.0.0.1", 5432)) as proxy:   # listens on 127.0.0.1:proxy.port
        ...point the client at proxy.port...
        proxy.cut()       # every open connection is reset; new ones are accepted and reset at once
        proxy.restore()   # new connections are forwarded again

A reset (RST, not a FIN) is what a client sees when a server host dies or a firewall drops its state: the
client's next read fails at once, so the test measures how the client handles the failure, not a timeout.
Threads, one pair per connection: the proxy carries a handful of connections, not a load.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType

BUFFER_BYTES = 65536


def _close(sock: socket.socket, *, reset: bool) -> None:
    """Close with a FIN, or an RST when `reset`; either wakes a thread blocked reading the socket (the shutdown
    does: close alone would not)."""
    try:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed
    sock.close()


def _reset(sock: socket.socket) -> None:
    _close(sock, reset=True)


class TcpProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # so the accept loop notices close()
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = False
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connections = 0  # accepted and forwarded, for the test's figures
        self.refused = 0  # accepted and reset while cut

    def __enter__(self) -> TcpProxy:
        self._spawn(self._accept_loop)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def cut(self) -> None:
        """Reset every open connection and every new one until `restore()`."""
        with self._lock:
            self._cut = True
            doomed, self._open = self._open, set()
        for sock in doomed:
            _reset(sock)

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closing.set()
        self.cut()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._connect(client)

    def _connect(self, client: socket.socket) -> None:
        with self._lock:
            cut = self._cut
        if cut:
            self.refused += 1
            _reset(client)
            return
        try:
            server = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _reset(client)
            return
        server.settimeout(None)
        with self._lock:
            if self._cut:  # cut while we connected
                _reset(client)
                _reset(server)
                return
            self._open |= {client, server}
            self.connections += 1
        self._spawn(self._pump, client, server)
        self._spawn(self._pump, server, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(BUFFER_BYTES):
                sink.sendall(data)
        except OSError:
            pass  # reset by cut(), or by either end
        with self._lock:
            ours = source in self._open
            self._open -= {source, sink}
        if ours:  # one end hung up: hang up the other one too (cut() has already reset both otherwise)
            _close(source, reset=False)
            _close(sink, reset=False)
