"""Loopback HTTP servers that behave like the destination APIs: `audience-sync sandbox`, and the tests'. The
same request handling also answers in process, as an `httpx.MockTransport` (`transport(*servers)`).

Each server records every request, counts what it accepted, and can be made to misbehave: canned responses
(`fault`, its body sent slowly if asked), dropped connections (`reset_connection`), requests accepted but
answered too late or not at all (`accept_then`), a share of 503s (`fail_ratio`), latency (`delay`) and a
token-bucket rate limit answering 429 (`rate_limit`). They emulate only what the platforms' published
documentation (gathered in REFERENCE.md) and section 6 of DESIGN.md state, each fact commented with its
source; what those leave open is kept plain and marked "not documented; chosen here".
"""

from __future__ import annotations

import base64
import collections
import contextlib
import itertools
import json
import logging
import random
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

import httpx

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
        self._faults: collections.deque[tuple[Response, float, float]] = collections.deque()
        self._resets = 0
        self._after_accepting: collections.deque[float | str] = collections.deque()
        self.unanswered = 0  # requests accepted whose answer was then dropped or delayed (accept_then)
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


def _is_int(value: Any) -> bool:
    """A JSON integer: not a bool (a subclass of int in Python), not a string of digits."""
    return isinstance(value, int) and not isinstance(value, bool)


class EverflowServer(FakeServer):
    """Everflow server postbacks: `GET /?nid=&transaction_id=&adv_event_id=[&verification_token=]...`.

    Every postback answers 200. `accepted` counts what the endpoint received, per (transaction_id,
    adv_event_id); `conversions` counts what Everflow would record; `report` lists the rejected ones with
    their reason, which the real platform shows only in its reports.
    """

    def __init__(
        self,
        *,
        network_id: str = "1",
        verification_token: str | None = None,
        allow_duplicates: bool = False,
        **kwargs: Any,
    ) -> None:
        self.network_id = network_id
        self.verification_token = verification_token
        # Everflow helpdesk, advertiser events / REFERENCE.md: "Allow Duplicate Conversion" is off by default.
        self.allow_duplicates = allow_duplicates
        self.conversions: collections.Counter[tuple[str, str]] = collections.Counter()
        self.report: list[tuple[str, str, str]] = []  # (transaction_id, adv_event_id or "", reason)
        super().__init__(**kwargs)

    def _handle(self, rec: Recorded) -> Response:
        # Everflow helpdesk, server postbacks / REFERENCE.md: nid and transaction_id, optional adv_event_id,
        # aid, amount, adv1..adv5, order_id, coupon_code, email, verification_token. The extras are only
        # recorded.
        q = rec.query
        key = (q.get("transaction_id", ""), q.get("adv_event_id", ""))
        if q.get("nid") and q.get("transaction_id"):
            self.accepted[key] += 1
        reason = self._rejection(q, key)
        if reason:
            self.report.append((*key, reason))
        else:
            self.conversions[key] += 1
        # REFERENCE.md (Everflow helpdesk, server postbacks): a postback answers 200 even when the conversion
        # is rejected; the error codes appear only in Everflow's reports. Response format not documented (2xx
        # = received); the plain-text "OK" body is chosen here.
        return 200, b"OK", {"Content-Type": "text/plain"}

    def _rejection(self, q: dict[str, str], key: tuple[str, str]) -> str | None:
        """Why Everflow would not record this conversion, or None when it would."""
        # A postback without nid or transaction_id: the answer is not documented; chosen here: 200, and
        # reported.
        if not q.get("nid"):
            return "missing nid"
        if not q.get("transaction_id"):
            return "missing transaction_id"
        # Not documented how an unknown network id is reported; chosen here.
        if q["nid"] != self.network_id:
            return "invalid network id"
        # REFERENCE.md (Everflow helpdesk): verification_token is required when the advertiser uses tokens;
        # "invalid verification token" is one of the report's error codes.
        if self.verification_token is not None and q.get("verification_token") != self.verification_token:
            return "invalid verification token"
        # REFERENCE.md (Everflow helpdesk): the same transaction id and event twice is a duplicate conversion.
        # Not documented whether a missing adv_event_id and adv_event_id=0 are the same event; chosen here:
        # they are compared as sent.
        if key in self.conversions and not self.allow_duplicates:
            return "duplicate conversion"
        return None


class RefersionServer(FakeServer):
    """Refersion REST API v2: `/v2/affiliate/new`, `/get`, `/search` and `/status_change`.

    Affiliates are keyed by their numeric id; each also has a string code, which is what `/affiliate/new` and
    `/affiliate/search` answer as `id`.
    """

    def __init__(self, *, public_key: str = "pub", secret_key: str = "sec", **kwargs: Any) -> None:
        self.public_key = public_key
        self.secret_key = secret_key
        self.affiliates: dict[int, dict[str, Any]] = {}
        self.not_changeable: set[int] = set()  # numeric ids status_change refuses (ids_not_changed)
        # Refersion REST API v2 reference (OpenAPI, affiliate/search): results come in pages (`page`); the
        # page size is not documented; chosen here.
        self.search_page_size = 10
        # Refersion REST API v2 reference (OpenAPI, affiliate/new): `offer` "defaults to your default offer";
        # the default offer's id is not documented; chosen here (the OpenAPI example's offer_id).
        self.default_offer = "1234"
        # Refersion REST API v2 reference (OpenAPI, affiliate/new example): "The affiliate 37569297 has been
        # created", code "a3y7". How ids and codes are made is not documented; chosen here: numbers counting
        # up from the example, codes "c" + hex counter, so a code is never all digits.
        self._ids = itertools.count(37569297)
        self._codes = itertools.count(0xA37)
        super().__init__(**kwargs)

    def add_affiliate(self, email: str, **fields: Any) -> int:
        """Store an affiliate that exists before the test (status ACTIVE unless given); its numeric id."""
        with self._lock:
            return self._store({"status": "ACTIVE", **fields, "email": email})

    def code_of(self, affiliate_id: int) -> str:
        """The code of the affiliate with this numeric id (KeyError when there is none)."""
        with self._lock:
            return str(self.affiliates[affiliate_id]["code"])

    def by_code(self, code: str) -> dict[str, Any] | None:
        """The stored affiliate with this code, or None."""
        with self._lock:
            return self._by_code(code)

    def _by_code(self, code: str) -> dict[str, Any] | None:
        return next((a for a in self.affiliates.values() if a["code"] == code), None)

    def _store(self, fields: dict[str, Any]) -> int:
        affiliate_id = next(self._ids)
        fields.pop("password", None)
        self.affiliates[affiliate_id] = {**fields, "id": affiliate_id, "code": f"c{next(self._codes):x}"}
        return affiliate_id

    def _link(self, affiliate: dict[str, Any]) -> str:
        # Refersion REST API v2 reference (OpenAPI, affiliate/new example): link
        # "https://site.refersion.com/c/a3y7".
        return f"{self.url}/c/{affiliate['code']}"

    def _handle(self, rec: Recorded) -> Response:
        # Refersion REST API v2 reference (OpenAPI, 401_Error): headers Refersion-Public-Key and
        # Refersion-Secret-Key, else 401 "Invalid API credentials (error 2)."
        keys = (rec.headers.get("refersion-public-key"), rec.headers.get("refersion-secret-key"))
        if keys != (self.public_key, self.secret_key):
            return _json(401, {"error": "Invalid API credentials (error 2)."})
        routes = {
            "/v2/affiliate/new": self._new,
            "/v2/affiliate/get": self._get,
            "/v2/affiliate/search": self._search,
            "/v2/affiliate/status_change": self._status_change,
        }
        # Refersion REST API v2 reference (OpenAPI): every call is a POST under /v2. An unknown path's answer
        # is not documented; chosen here: 404 with an empty body.
        route = routes.get(rec.path) if rec.method == "POST" else None
        if route is None:
            return 404, b"", {}
        # Refersion REST API v2 reference (OpenAPI, 404_Error): "Empty request body" -> "Bad request, no
        # body". Chosen here: a body that is not a JSON object counts as no body; `{}` is a body missing its
        # fields.
        if not isinstance(rec.json, dict):
            return _json(404, {"error": "Bad request, no body"})
        return route(rec.json)

    def _new(self, data: dict[str, Any]) -> Response:
        # Refersion REST API v2 reference (OpenAPI, affiliate/new; 400_Error "Missing required field X"):
        # required first_name, last_name, email, password, status.
        for name in ("first_name", "last_name", "email", "password", "status"):
            if not data.get(name):
                return _json(400, {"error": f"Missing required field {name}"})
        email = str(data["email"])
        # Refersion REST API v2 reference (OpenAPI, affiliate/new, password) / REFERENCE.md: 9-72 characters,
        # upper, lower, digit, special, no character more than 3 times in a row, not the email. The answer's
        # shape is not documented; chosen here: 400 with the ErrorResponse shape {"errors": [...]}.
        errors = _password_errors(str(data["password"]), email)
        if errors:
            return _json(400, {"errors": errors})
        # Refersion REST API v2 reference (OpenAPI, affiliate/new): status enum ACTIVE, PENDING. REFERENCE.md:
        # a 204 with a body means an invalid field, on every operation.
        if data["status"] not in ("ACTIVE", "PENDING"):
            return _json(204, {"errors": ["Invalid status"]})
        # Refersion REST API v2 reference (OpenAPI, affiliate/new): country, two-letter ISO code, minLength 2,
        # maxLength 2; invalid field -> 204 with a body (REFERENCE.md).
        if "country" in data and not re.fullmatch(r"[A-Za-z]{2}", str(data["country"])):
            return _json(204, {"errors": ["Invalid country"]})
        # Refersion REST API v2 reference (OpenAPI, 422_Error) / REFERENCE.md: the taken-email message.
        # Compared case-insensitively: chosen here (email addresses are matched that way in practice).
        if any(str(a.get("email", "")).casefold() == email.casefold() for a in self.affiliates.values()):
            return _json(422, {"errors": ["The email you have entered is taken by another Affiliate."]})
        affiliate_id = self._store({**data, "has_password": True})
        affiliate, status = self.affiliates[affiliate_id], data["status"]
        self.accepted[(data.get("unique_merchant_id") or email, "new")] += 1
        # Refersion REST API v2 reference (OpenAPI, affiliate/new 200): `id` is the affiliate's code (a
        # string); the numeric id is only in the message text.
        return _json(
            200,
            {
                "id": affiliate["code"],
                "link": self._link(affiliate),
                "message": f"The affiliate {affiliate_id} has been created with the status of {status}.",
            },
        )

    def _get(self, data: dict[str, Any]) -> Response:
        # Refersion REST API v2 reference (OpenAPI, affiliate/get): oneOf {"id": <integer>} or
        # {"affiliate_code": <string>}. Chosen here: id wins when both are sent; an id that is not an integer
        # (a string of digits included) finds nothing.
        if data.get("id") is not None:
            affiliate_id = data["id"]
            affiliate = self.affiliates.get(affiliate_id) if _is_int(affiliate_id) else None
        elif data.get("affiliate_code") is not None:
            affiliate = self._by_code(str(data["affiliate_code"]))
        else:
            return _json(400, {"error": "Missing required field id or affiliate_code"})
        # An unknown affiliate's answer is not documented; chosen here: 422 in the ErrorResponse shape.
        if affiliate is None:
            return _json(422, {"errors": ["Affiliate not found"]})
        # Refersion REST API v2 reference (OpenAPI, affiliate/get 200 example): numeric `id`, offer_id,
        # status, names, company_name, email, link, custom_fields.
        return _json(
            200,
            {
                "id": affiliate["id"],
                "offer_id": self._offer_id(affiliate),
                "status": affiliate["status"],
                "first_name": affiliate.get("first_name", ""),
                "last_name": affiliate.get("last_name", ""),
                "company_name": affiliate.get("company", ""),
                "email": affiliate["email"],
                "link": self._link(affiliate),
                "custom_fields": [],
            },
        )

    def _search(self, data: dict[str, Any]) -> Response:
        # Refersion REST API v2 reference (OpenAPI, affiliate/search): `keyword` required.
        keyword = data.get("keyword")
        if keyword is None or keyword == "":
            return _json(400, {"error": "Missing required field keyword"})
        # Refersion REST API v2 reference (OpenAPI, affiliate/search): `page` (a string, default "1"). An int
        # is accepted too; a page that is not a positive number is an invalid field: 204 with a body
        # (REFERENCE.md).
        page = data.get("page", 1)
        if isinstance(page, str) and page.strip().isdigit():
            page = int(page)
        if not _is_int(page) or page < 1:
            return _json(204, {"errors": ["Invalid page"]})
        # Refersion REST API v2 reference (OpenAPI, affiliate/search): "Affiliate ID must be exact; email can
        # be a partial match"; the results' `id` is the affiliate's code. Case-insensitive email match: chosen
        # here. first_name / last_name: their matching rule is not documented; chosen here: ignored.
        keyword = str(keyword)
        matches = [
            self.affiliates[n]
            for n in sorted(self.affiliates)
            if self.affiliates[n]["code"] == keyword
            or keyword.casefold() in str(self.affiliates[n].get("email", "")).casefold()
        ]
        start = (page - 1) * self.search_page_size
        # Refersion REST API v2 reference (OpenAPI, affiliate/search 200): total and results (id = code,
        # offer_id, status, first_name, last_name, email, custom_fields).
        results = [
            {
                "id": a["code"],
                "offer_id": self._offer_id(a),
                "status": a["status"],
                "first_name": a.get("first_name", ""),
                "last_name": a.get("last_name", ""),
                "email": a["email"],
                "custom_fields": [],
            }
            for a in matches[start : start + self.search_page_size]
        ]
        return _json(200, {"total": len(matches), "results": results})

    def _offer_id(self, affiliate: dict[str, Any]) -> str:
        # Refersion REST API v2 reference (OpenAPI, affiliate/get): offer_id is a string.
        return str(affiliate.get("offer") or self.default_offer)

    def _status_change(self, data: dict[str, Any]) -> Response:
        # Refersion REST API v2 reference (OpenAPI, affiliate/status_change): required ids (array of integers)
        # and status; 400_Error "Missing required field X".
        ids, status = data.get("ids"), data.get("status")
        if not isinstance(ids, list):
            return _json(400, {"error": "Missing required field ids"})
        # Refersion REST API v2 reference (OpenAPI, affiliate/status_change): "Limit of 50 IDs per call". The
        # answer to more is not documented; chosen here: 400.
        if len(ids) > 50:
            return _json(400, {"error": "A maximum of 50 ids is allowed"})
        if status is None or status == "":
            return _json(400, {"error": "Missing required field status"})
        # Refersion REST API v2 reference (OpenAPI, affiliate/status_change): status enum ACTIVE, DENIED,
        # DISABLED (PENDING cannot be set); an invalid field -> 204 with a body (REFERENCE.md).
        if status not in ("ACTIVE", "DENIED", "DISABLED"):
            return _json(204, {"errors": ["Invalid status"]})
        # Refersion REST API v2 reference (OpenAPI, affiliate/status_change 200): ids_changed /
        # ids_not_changed, answered 200 even when some were not changed. Only integer ids name an affiliate;
        # anything else (a code, a string of digits) is not changed and is echoed as given: chosen here.
        changed, not_changed = [], []
        for affiliate_id in ids:
            if (
                _is_int(affiliate_id)
                and affiliate_id in self.affiliates
                and affiliate_id not in self.not_changeable
            ):
                self.affiliates[affiliate_id]["status"] = status
                self.accepted[(affiliate_id, status)] += 1
                changed.append(affiliate_id)
            else:
                not_changed.append(affiliate_id)
        return _json(200, {"ids_changed": changed, "ids_not_changed": not_changed})


def _password_errors(password: str, email: str) -> list[str]:
    # Refersion REST API v2 reference (OpenAPI, affiliate/new, password) / REFERENCE.md; the messages are
    # chosen here.
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


# The call types each kind of SegmentServer takes (None: any).
# Segment docs, Everflow destination: Track calls. Segment docs, Refersion destination: Identify and delete.
_CALL_TYPES: dict[str | None, frozenset[str] | None] = {
    None: None,
    "everflow": frozenset({"track"}),
    "refersion": frozenset({"identify", "delete"}),
}


class SegmentServer(FakeServer):
    """A partner destination receiving Segment's JSON messages directly (`POST` to any path).

    `kind` narrows it to one destination's call types: "everflow", "refersion", or None for a generic partner.
    """

    def __init__(self, *, api_key: str = "key", kind: str | None = None, **kwargs: Any) -> None:
        if kind not in _CALL_TYPES:
            raise ValueError(f"kind must be one of {sorted(map(str, _CALL_TYPES))}, not {kind!r}")
        self.api_key = api_key
        self.kind = kind
        self.messages: list[dict[str, Any]] = []
        super().__init__(**kwargs)

    def _handle(self, rec: Recorded) -> Response:
        # Segment docs, "Building a Direct Destination", Response body: errors carry {"message": "..."}.
        # Authorization: Basic base64("<apiKey>:"); Status code 401: "The client's API key is malformed...".
        if not self._authorized(rec.headers.get("authorization", "")):
            return _json(401, {"message": "Invalid API key"})
        # Segment docs, "Building a Direct Destination", Headers: Content-Type is always application/json. The
        # answer to another type is not documented there; chosen here: 415.
        if rec.headers.get("content-type", "").partition(";")[0].strip().lower() != "application/json":
            return _json(415, {"message": "Content-Type must be application/json"})
        # Segment docs, "Building a Direct Destination", Headers: X-Segment-Settings is base64-encoded
        # settings (JSON); Status code 400: "The message is malformed".
        try:
            settings = rec.settings
        except ValueError:
            settings = False
        if settings is not None and not isinstance(settings, dict):
            return _json(400, {"message": "X-Segment-Settings must be a base64-encoded JSON object"})
        # Segment docs, Spec (common fields): every message has `type` and `messageId`.
        body = rec.json
        if not isinstance(body, dict) or "type" not in body or "messageId" not in body:
            return _json(400, {"message": "Body must be a JSON object with type and messageId"})
        # Segment docs, "Building a Direct Destination", Status code: 501 for an unsupported call type.
        supported = _CALL_TYPES[self.kind]
        if supported is not None and body["type"] not in supported:
            return _json(501, {"message": f"Unsupported call type {body['type']}"})
        # Segment docs, Everflow destination, TransactionId: context.referrer.id and context.referrer.type
        # ("everflow") are required; 400 for a message with an error that is the client's fault.
        if self.kind == "everflow" and not _has_everflow_referrer(body):
            return _json(400, {"message": "context.referrer.id and context.referrer.type are required"})
        self.messages.append(body)
        self.accepted[(body.get("userId"), body["messageId"])] += 1
        # Segment docs, "Building a Direct Destination": 200 accepted and processed; "You can normally send
        # back an empty body"; the {"ok": true} body is chosen here.
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


def _has_everflow_referrer(body: dict[str, Any]) -> bool:
    context = body.get("context")
    referrer = context.get("referrer") if isinstance(context, dict) else None
    return (
        isinstance(referrer, dict)
        and referrer.get("type") == "everflow"
        and isinstance(referrer.get("id"), str)
        and referrer["id"] != ""
    )
