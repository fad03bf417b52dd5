"""FakeServer: the faults every emulated API can be made to show, served over loopback and in process."""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import threading
import time
from typing import Any, Self

import httpx

from sync.sandbox.http import _RESET, Recorded, Response, _HTTPServer, _parse_json, log


class FakeServer:
    """Base of the fake destinations: threaded HTTP server on 127.0.0.1, on `port` or any free one; a context
    manager."""

    def __init__(
        self, *, delay: float = 0.0, fail_ratio: float = 0.0, rate_limit: float | None = None, port: int = 0
    ) -> None:
        self.requests: list[Recorded] = []
        self.accepted: collections.Counter[tuple[Any, ...]] = collections.Counter()
        self.throttled = 0
        self.delay = delay
        self.fail_ratio = fail_ratio
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._random = random.Random(0)
        # canned answers (None: handled, then what follows) in the order they were queued
        self._faults: collections.deque[tuple[Response | None, float, float, float | str]] = (
            collections.deque()
        )
        self._resets = 0
        self.unanswered: list[Recorded] = []  # requests accepted, their answer then dropped or delayed
        self._connections: dict[socket.socket, threading.Thread] = {}  # open connections and their handlers
        self.rate_limit = rate_limit
        self._httpd = _HTTPServer(self, port)
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"
        # A short poll interval, because shutdown() waits for the serving loop to look at its flag.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.01,), name=self.url, daemon=True
        )
        self._thread.start()

    @property
    def rate_limit(self) -> float | None:
        """Requests per second allowed by a token bucket (burst `max(1, rate_limit)`); None: unlimited."""
        return self._rate_limit

    @rate_limit.setter
    def rate_limit(self, value: float | None) -> None:
        with self._lock:
            self._rate_limit = value
            self._tokens = max(1.0, value or 0.0)
            self._stamp = time.monotonic()

    def fault(
        self,
        status: int,
        body: bytes | str = b"",
        headers: dict[str, str] | None = None,
        times: int = 1,
        delay: float = 0.0,
        dribble: float = 0.0,
    ) -> None:
        """Answer the next `times` requests with this response instead of handling them; with `dribble`,
        send its body one byte at a time, `dribble` seconds apart."""
        data = body.encode() if isinstance(body, str) else body
        headers = dict(headers or {})
        if data and not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json" if _parse_json(data) is not None else "text/plain"
        with self._lock:
            self._faults.extend([((status, data, headers), delay, dribble, 0.0)] * times)

    def reset_connection(self, times: int = 1) -> None:
        """Drop the connection of the next `times` requests without answering."""
        with self._lock:
            self._resets += times

    def accept_then(self, times: int = 1, *, answer_after: float | None = None) -> None:
        """Handle the next `times` requests (what they carry is accepted), then drop the connection without
        answering, or answer only after `answer_after` seconds: the client cannot know they were accepted.
        Queued with `fault`'s answers: those queued after these answer the requests after them."""
        with self._lock:
            self._faults.extend([(None, 0.0, 0.0, _RESET if answer_after is None else answer_after)] * times)

    def clear_faults(self) -> None:
        """Forget queued faults and resets: the destination behaves again."""
        with self._lock:
            self._faults.clear()
            self._resets = 0

    def close(self) -> None:
        """Stop serving, end open connections and join every thread."""
        with self._lock:
            if self._closing.is_set():
                return
            self._closing.set()  # also cuts short any delay being slept
        self._httpd.shutdown()
        with self._lock:
            for conn in self._connections:
                self._shutdown(conn)
            handlers = list(self._connections.values())
        self._httpd.server_close()
        for thread in [*handlers, self._thread]:
            thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _handle(self, rec: Recorded) -> Response:
        """The destination's own behaviour; called with the lock held."""
        raise NotImplementedError

    def _admit(self, rec: Recorded) -> tuple[Response | str | None, float, float | str, float]:
        """Record the request and pick its answer: reset, a canned response, or None (handle it normally),
        the delay before it, what follows handling (a reset or the seconds to wait before answering), and
        the seconds between the bytes of the body (0: all at once)."""
        with self._lock:
            self.requests.append(rec)
            if self._resets:
                self._resets -= 1
                return _RESET, 0.0, 0.0, 0.0
            if self._faults:
                response, delay, dribble, after = self._faults.popleft()
                if response is None:
                    self.unanswered.append(rec)
                return response, delay + self.delay, after, dribble
            if not self._take_token():
                self.throttled += 1
                return (429, b"", {"Retry-After": "1"}), self.delay, 0.0, 0.0
            if self.fail_ratio and self._random.random() < self.fail_ratio:
                return (503, b"", {}), self.delay, 0.0, 0.0
            return None, self.delay, 0.0, 0.0

    def _respond(self, rec: Recorded) -> tuple[Response | None, float | str, float]:
        """The answer to `rec` (None: drop the connection unanswered), after its delay; what follows handling
        (a reset or the seconds to wait before answering) and the seconds between the body's bytes."""
        action, delay, after, dribble = self._admit(rec)
        if action == _RESET:
            return None, 0.0, 0.0
        self._closing.wait(delay)
        if action is None:
            with self._lock:
                action = self._handle(rec)
        assert not isinstance(action, str)
        name, status = type(self).__name__, action[0]
        log.info("%s %s %s -> %d", name, rec.method, rec.path, status, extra={"action": "received"})
        return action, after, dribble

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """The same emulation in process, as an `httpx.MockTransport` handler (see `transport`).

        A dropped connection raises `httpx.ReadError`, as on the wire; an answer held back (`accept_then` with
        `answer_after`) or a dribbled body needs a socket and a client timeout: use `url` for those.
        """
        target = request.url.raw_path.decode()
        rec = Recorded.of(request.method, target, request.headers.items(), request.read())
        response, after, dribble = self._respond(rec)
        if response is None or after == _RESET:
            raise httpx.ReadError("[Errno 104] Connection reset by peer", request=request)
        if after or dribble:
            raise RuntimeError(f"{type(self).__name__}: a late answer or a dribbled body needs its url")
        status, data, headers = response
        # as on the wire: a client reads no body on 204 or 304
        return httpx.Response(status, headers=headers, content=b"" if status in (204, 304) else data)

    def _take_token(self) -> bool:
        if self._rate_limit is None:
            return True
        now = time.monotonic()
        burst = max(1.0, self._rate_limit)
        self._tokens = min(burst, self._tokens + (now - self._stamp) * self._rate_limit)
        self._stamp = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if not add:
                self._connections.pop(conn, None)
            elif self._closing.is_set():
                self._shutdown(conn)
            else:
                self._connections[conn] = threading.current_thread()

    @staticmethod
    def _shutdown(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)  # wakes a handler waiting for the next kept-alive request


def transport(*servers: FakeServer) -> httpx.MockTransport:
    """These servers in process: each request goes to the server whose `url` it names; any other address is
    refused (`httpx.ConnectError`), like a port nothing listens on."""
    by_origin = {server.url: server for server in servers}

    def handler(request: httpx.Request) -> httpx.Response:
        origin = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if origin not in by_origin:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return by_origin[origin].handle_request(request)

    return httpx.MockTransport(handler)
