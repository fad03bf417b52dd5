"""A loopback TCP proxy that can be cut and restored: a database that goes away and comes back."""

import contextlib
import socket
import threading
from typing import Self


class TcpProxy:
    """Forwards 127.0.0.1:<port> to `target`; `cut()` drops every connection and refuses new ones, `stall()`
    stops forwarding on the connections open now without closing them, `stall_after(n)` on each connection
    once the server has sent it `n` bytes."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.sockets: set[socket.socket] = set()
        self.stalled: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.server_bytes: int | None = None  # forwarded from the server on each connection, before a stall
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets |= {client, upstream}
            for source, sink, limit in ((client, upstream, None), (upstream, client, self.server_bytes)):
                threading.Thread(target=self._pipe, args=(source, sink, limit), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, limit: int | None = None) -> None:
        forwarded = 0
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if limit is not None and forwarded + len(data) > limit:
                    with self.lock:
                        self.stalled |= {source, sink}
                if source not in self.stalled:
                    sink.sendall(data)
                    forwarded += len(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
        with self.lock:  # the second of the two pipes to finish closes both ends
            if source in self.sockets:
                self.sockets -= {source, sink}
            else:
                source.close()
                sink.close()

    def cut(self) -> None:
        self.up.clear()
        with self.lock:
            for end in self.sockets:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def stall(self) -> None:
        """What a NAT gateway does to a flow idle past its timeout: what is sent is lost, nothing says so."""
        with self.lock:
            self.stalled |= self.sockets

    def stall_after(self, server_bytes: int) -> None:
        """On each connection opened from now on, stop forwarding (both ways) once the server has sent
        `server_bytes`: a result cut off midway, the connection left open and silent."""
        self.server_bytes = server_bytes

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.cut()
        self.listener.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
