"""Loopback HTTP servers that behave like the destination APIs, for unit and end-to-end tests.

Each server records every request, counts what it accepted, and can be made to misbehave: canned responses
(`fault`, its body sent slowly if asked), dropped connections (`reset_connection`), requests accepted but
answered too late or not at all (`accept_then`), a share of 503s (`fail_ratio`), latency (`delay`) and a
token-bucket rate limit answering 429 (`rate_limit`). They emulate only what the platforms' documentation and
section 6 of DESIGN.md state; what those leave open is kept plain.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import itertools
import json
import random
import re
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

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
    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake
        super().__init__(("127.0.0.1", 0), _Handler)

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
        url = urlsplit(self.path)
        rec = Recorded(
            method=self.command,
            path=url.path,
            query=dict(parse_qsl(url.query, keep_blank_values=True)),
            headers={k.lower(): v for k, v in self.headers.items()},
            json=_parse_json(body),
            body=body,
        )
        action, delay, after, dribble = fake._admit(rec)
        if action == _RESET:
            self._reset()
            return
        fake._closing.wait(delay)
        if action is None:
            with fake._lock:
                action = fake._handle(rec)
            if after == _RESET:
                self._reset()
                return
            fake._closing.wait(float(after))
        assert not isinstance(action, str)
        status, data, headers = action
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


class FakeServer:
    """Base of the fake destinations: threaded HTTP server on 127.0.0.1, any free port; a context manager."""

    def __init__(
        self, *, delay: float = 0.0, fail_ratio: float = 0.0, rate_limit: float | None = None
    ) -> None:
        self.requests: list[Recorded] = []
        self.accepted: collections.Counter[tuple[Any, ...]] = collections.Counter()
        self.throttled = 0
        self.delay = delay
        self.fail_ratio = fail_ratio
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._random = random.Random(0)
        self._faults: collections.deque[tuple[Response, float, float]] = collections.deque()
        self._resets = 0
        self._after_accepting: collections.deque[float | str] = collections.deque()
        self.unanswered = 0  # requests accepted whose answer was then dropped or delayed (accept_then)
        self._connections: dict[socket.socket, threading.Thread] = {}  # open connections and their handlers
        self.rate_limit = rate_limit
        self._httpd = _HTTPServer(self)
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
            self._faults.extend([((status, data, headers), delay, dribble)] * times)

    def reset_connection(self, times: int = 1) -> None:
        """Drop the connection of the next `times` requests without answering."""
        with self._lock:
            self._resets += times

    def accept_then(self, times: int = 1, *, answer_after: float | None = None) -> None:
        """Handle the next `times` requests (what they carry is accepted), then drop the connection without
        answering, or answer only after `answer_after` seconds: the client cannot know they were accepted."""
        with self._lock:
            self._after_accepting.extend([_RESET if answer_after is None else answer_after] * times)

    def clear_faults(self) -> None:
        """Forget queued faults and resets: the destination behaves again."""
        with self._lock:
            self._faults.clear()
            self._resets = 0
            self._after_accepting.clear()

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
                response, delay, dribble = self._faults.popleft()
                return response, delay + self.delay, 0.0, dribble
            if not self._take_token():
                self.throttled += 1
                return (429, b"", {"Retry-After": "1"}), self.delay, 0.0, 0.0
            if self.fail_ratio and self._random.random() < self.fail_ratio:
                return (503, b"", {}), self.delay, 0.0, 0.0
            if not self._after_accepting:
                return None, self.delay, 0.0, 0.0
            self.unanswered += 1
            return None, self.delay, self._after_accepting.popleft(), 0.0

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


class EverflowServer(FakeServer):
    """Everflow server postbacks: `GET /?nid=&transaction_id=&adv_event_id=[&verification_token=]`."""

    def __init__(
        self, *, network_id: str = "1", verification_token: str | None = None, **kwargs: Any
    ) -> None:
        self.network_id = network_id
        self.verification_token = verification_token
        super().__init__(**kwargs)

    def _handle(self, rec: Recorded) -> Response:
        q = rec.query
        for name in ("nid", "transaction_id"):
            if not q.get(name):
                return _json(400, {"error": f"{name} is required"})
        if q["nid"] != self.network_id:
            return _json(404, {"error": "Network not found"})
        if self.verification_token is not None and q.get("verification_token") != self.verification_token:
            return _json(403, {"error": "Invalid verification token"})
        self.accepted[(q["transaction_id"], q.get("adv_event_id", ""))] += 1
        return 200, b"OK", {"Content-Type": "text/plain"}


class RefersionServer(FakeServer):
    """Refersion REST API v2 (`/v2/affiliate/new`, `/v2/affiliate/status_change`)."""

    def __init__(self, *, public_key: str = "pub", secret_key: str = "sec", **kwargs: Any) -> None:
        self.public_key = public_key
        self.secret_key = secret_key
        self.affiliates: dict[str, dict[str, Any]] = {}
        self.not_changeable: set[str] = set()
        self._ids = itertools.count(1)
        super().__init__(**kwargs)

    def add_affiliate(self, email: str, **fields: Any) -> str:
        """Store an affiliate that exists before the test (status ACTIVE unless given); returns its id."""
        with self._lock:
            return self._store({"email": email, "status": "ACTIVE", **fields})

    def _store(self, fields: dict[str, Any]) -> str:
        affiliate_id = f"a{next(self._ids):03d}"
        self.affiliates[affiliate_id] = {**fields, "id": affiliate_id}
        return affiliate_id

    def _handle(self, rec: Recorded) -> Response:
        keys = (rec.headers.get("refersion-public-key"), rec.headers.get("refersion-secret-key"))
        if keys != (self.public_key, self.secret_key):
            return _json(401, {"error": "Invalid API credentials (error 2)."})
        data = rec.json if isinstance(rec.json, dict) else {}
        if rec.method == "POST" and rec.path == "/v2/affiliate/new":
            return self._new(data)
        if rec.method == "POST" and rec.path == "/v2/affiliate/status_change":
            return self._status_change(data)
        return 404, b"", {}

    def _new(self, data: dict[str, Any]) -> Response:
        for name in ("first_name", "last_name", "email", "password", "status"):
            if not data.get(name):
                return _json(400, {"error": f"{name} is required"})
        email = str(data["email"])
        errors = _password_errors(str(data["password"]), email)
        if errors:
            return _json(400, {"errors": errors})
        if data["status"] not in ("ACTIVE", "PENDING"):
            return _json(204, {"errors": ["Invalid status"]})
        if "country" in data and not re.fullmatch(r"[A-Za-z]{2}", str(data["country"])):
            return _json(204, {"errors": ["Invalid country"]})
        if any(str(a.get("email", "")).casefold() == email.casefold() for a in self.affiliates.values()):
            return _json(422, {"errors": ["The email you have entered is taken by another Affiliate."]})
        fields = {k: v for k, v in data.items() if k != "password"}
        affiliate_id = self._store({**fields, "has_password": True})
        self.accepted[(data.get("unique_merchant_id") or email, "new")] += 1
        return _json(
            200, {"id": affiliate_id, "link": f"{self.url}/l/{affiliate_id}", "message": "Affiliate created"}
        )

    def _status_change(self, data: dict[str, Any]) -> Response:
        ids, status = data.get("ids"), data.get("status")
        if not isinstance(ids, list):
            return _json(400, {"error": "ids is required"})
        if len(ids) > 50:
            return _json(400, {"error": "A maximum of 50 ids is allowed"})
        if status not in ("ACTIVE", "DENIED", "DISABLED"):
            return _json(400, {"error": "status must be ACTIVE, DENIED or DISABLED"})
        changed, not_changed = [], []
        for affiliate_id in map(str, ids):
            if affiliate_id in self.affiliates and affiliate_id not in self.not_changeable:
                self.affiliates[affiliate_id]["status"] = status
                self.accepted[(affiliate_id, status)] += 1
                changed.append(affiliate_id)
            else:
                not_changed.append(affiliate_id)
        return _json(200, {"ids_changed": changed, "ids_not_changed": not_changed})


def _password_errors(password: str, email: str) -> list[str]:
    rules = [
        (9 <= len(password) <= 72, "Password must be 9 to 72 characters long"),
        (re.search(r"[A-Z]", password), "Password must contain an upper-case letter"),
        (re.search(r"[a-z]", password), "Password must contain a lower-case letter"),
        (re.search(r"[0-9]", password), "Password must contain a digit"),
        (re.search(r"[^A-Za-z0-9]", password), "Password must contain a special character"),
        (
            not re.search(r"(.)\1{3}", password),
            "Password must not repeat a character more than 3 times in a row",
        ),
        (password.casefold() != email.casefold(), "Password must not be the email address"),
    ]
    return [message for ok, message in rules if not ok]


class SegmentServer(FakeServer):
    """A partner destination receiving Segment's JSON messages directly (`POST` to any path)."""

    def __init__(self, *, api_key: str = "key", **kwargs: Any) -> None:
        self.api_key = api_key
        self.messages: list[dict[str, Any]] = []
        super().__init__(**kwargs)

    def _handle(self, rec: Recorded) -> Response:
        if not self._authorized(rec.headers.get("authorization", "")):
            return _json(401, {"error": "Invalid API key"})
        if rec.headers.get("content-type", "").partition(";")[0].strip().lower() != "application/json":
            return _json(415, {"error": "Content-Type must be application/json"})
        try:
            settings = rec.settings
        except ValueError:
            settings = False
        if settings is not None and not isinstance(settings, dict):
            return _json(400, {"error": "X-Segment-Settings must be a base64-encoded JSON object"})
        body = rec.json
        if not isinstance(body, dict) or "type" not in body or "messageId" not in body:
            return _json(400, {"error": "Body must be a JSON object with type and messageId"})
        self.messages.append(body)
        self.accepted[(body.get("userId"), body["messageId"])] += 1
        return _json(200, {"ok": True})

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        try:
            return (
                scheme.lower() == "basic"
                and base64.b64decode(token, validate=True) == f"{self.api_key}:".encode()
            )
        except ValueError:
            return False
