"""A TCP proxy for tests: put it between a client (a `plait worker`) and a server (the daemon)
and cut the line without closing it.

`stall()` stops forwarding both ways while every socket stays open, as a network partition or
a dead switch does (no FIN, no RST: the peers learn nothing until their own timeouts say so);
connections made meanwhile are accepted and stalled too. `restore()` forwards again, what was
sent meanwhile included. `close()` (or leaving the ``with``) closes every socket and joins every
thread.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from types import TracebackType


class TcpProxy:
    """Forwards connections to ``127.0.0.1:<port>`` (see `address`) to ``upstream``."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, name="proxy-accept", daemon=True)]
        self._threads[0].start()

    def stall(self) -> None:
        """Stops forwarding, both ways, on every connection (open ones and new ones)."""
        self._flowing.clear()

    def restore(self) -> None:
        """Forwards again."""
        self._flowing.set()

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=10)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.1)
                if not ready:
                    continue
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()  # the upstream is down: the client sees a refused connection
                continue
            server.settimeout(None)
            with self._lock:
                if self._closed.is_set():
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
                for src, dst in ((client, server), (server, client)):
                    t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                    self._threads.append(t)
                    t.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                self._flowing.wait()
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready or not self._flowing.is_set():
                    continue  # stalled while waiting: what arrived waits in the kernel
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # one side ended: end the other (a half-close would do too, but gRPC never uses it)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
