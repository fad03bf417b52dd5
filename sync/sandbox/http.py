"""The HTTP plumbing of the emulated APIs: a recorded request, JSON answers, the loopback server and its
handler."""

from __future__ import annotations

import base64
import json
import logging
import socket
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

if TYPE_CHECKING:
    from sync.sandbox.fake import FakeServer

log = logging.getLogger(__name__)


Response = tuple[int, bytes, dict[str, str]]


_RESET = "reset"  # what _admit returns for a request whose connection is to be dropped


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    json: Any  # parsed body, or None when the body is empty or not JSON
    body: bytes

    @classmethod
    def of(cls, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes) -> Recorded:
        """A request as it arrives: `target` is the path with its query string."""
        url = urlsplit(target)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        return cls(method, url.path, query, {k.lower(): v for k, v in headers}, _parse_json(body), body)

    @property
    def settings(self) -> Any:
        """The decoded `X-Segment-Settings` header, or None without one (raises ValueError when malformed)."""
        raw = self.headers.get("x-segment-settings")
        return None if raw is None else json.loads(base64.b64decode(raw, validate=True))


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def _json(status: int, obj: Any) -> Response:
    return status, json.dumps(obj).encode(), {"Content-Type": "application/json"}


class _HTTPServer(ThreadingHTTPServer):
    def __init__(self, fake: FakeServer, port: int) -> None:
        self.fake = fake
        super().__init__(("127.0.0.1", port), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (timeout, reset) is part of the tests, not an error; real bugs still print.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real APIs; every response carries Content-Length
    disable_nagle_algorithm = True  # headers and body go out in two writes; no 40 ms delayed-ACK stall
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, add=True)

    def finish(self) -> None:
        self.server.fake._track(self.connection, add=False)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        fake = self.server.fake
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        rec = Recorded.of(self.command, self.path, self.headers.items(), body)
        response, after, dribble = fake._respond(rec)
        if response is None or after == _RESET:
            self._reset()
            return
        fake._closing.wait(float(after))
        status, data, headers = response
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        if status in (204, 304) and data:
            # Clients read no body on 204, so the bytes would poison a kept-alive connection: close it.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if dribble:  # wfile is unbuffered: each byte goes out on its own
            for i in range(len(data)):
                fake._closing.wait(dribble)
                self.wfile.write(data[i : i + 1])
        else:
            self.wfile.write(data)

    def _reset(self) -> None:
        # SO_LINGER 0 makes close() send RST: the client sees "connection reset", not a clean EOF.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve
