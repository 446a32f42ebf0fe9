"""A TCP proxy a test puts between a client and a server to cut the network between them.

:meth:`TcpProxy.cut` is a pulled cable, not a refused connection: nothing passes either way
and nobody is told. Open connections stay open with their bytes held, new connections are
accepted and get no answer, and what was held flows again on :meth:`TcpProxy.restore`, as
TCP retransmits once a short partition heals. Clients see only silence: what their
timeouts and pings make of it is what a test of a network cut is about.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

from .services import LOOPBACK

_CHUNK = 64 * 1024


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``host:port``, one pair of threads per connection."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._flowing = threading.Event()
        self._flowing.set()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server((LOOPBACK, 0))
        self._closed = False
        threading.Thread(target=self._accept, name="tcp-proxy-accept", daemon=True).start()

    @property
    def port(self) -> int:
        port: int = self._listener.getsockname()[1]
        return port

    def url(self, scheme: str) -> str:
        """The proxy's address as ``scheme://127.0.0.1:port``."""
        return f"{scheme}://{LOOPBACK}:{self.port}"

    def cut(self) -> None:
        """Stop every byte, in both directions, until :meth:`restore`."""
        self._flowing.clear()

    def restore(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._track(client)
        self._flowing.wait()  # during a cut the connection is accepted and then nothing
        try:
            server = socket.create_connection(self.target)
        except OSError:
            self._drop(client)
            return
        self._track(server)
        threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
        self._pump(server, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy ``source`` to ``sink`` until either end closes; then close both."""
        try:
            while chunk := source.recv(_CHUNK):
                self._flowing.wait()
                sink.sendall(chunk)
        except OSError:
            pass
        self._drop(source)
        self._drop(sink)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
