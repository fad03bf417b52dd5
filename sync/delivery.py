"""Sending calls to one destination: shared rate limit, bounded concurrency, retries with backoff."""

import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from urllib.parse import quote, quote_plus

import httpx
from tenacity import Retrying

from sync import metrics, ratelimit
from sync.destinations.base import Destination
from sync.destinations.http import CREDENTIALS_ACCEPTED, Call, raise_for_retry_or_auth
from sync.errors import AuthError, DestinationError, FatalError, RetriableError
from sync.models import Outcome, Status, failed, rejected
from sync.ratelimit import Interrupted, RateLimiter
from sync.values import dumps

log = logging.getLogger(__name__)
REASON_MAX = 300
ANSWER_MAX = 1024 * 1024  # bytes of an answer read; the documented APIs answer with small JSON bodies
UNREAD = ", not read"  # ends the note that stands for a body not read: it tells nothing about the refusal
TOO_LARGE = f"answer of more than {ANSWER_MAX // 1024 // 1024} MiB{UNREAD}"
SAME_REFUSALS = 10  # requests refused alike, none accepted: the destination is misconfigured, not the users
FRAMING = ("content-encoding", "content-length", "transfer-encoding")  # of the body as it came, not as read
INTERRUPTED = "interrupted by shutdown"
# Failures after the request was written: the connection dropped, or no answer came in time. Connecting
# (ConnectError, ConnectTimeout, PoolTimeout) and writing (WriteError, WriteTimeout) fail before the
# destination has the whole request.
UNANSWERED = (httpx.ReadError, httpx.ReadTimeout, httpx.RemoteProtocolError)


def _unconnected(call: Call, exc: httpx.TransportError) -> str:
    """Why the connection failed, naming the host and port only (the URL's query may hold a token)."""
    url = httpx.URL(call.url)
    where = f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return f"connection refused by {where}"
        cause = cause.__cause__ or cause.__context__
    return f"connection to {where} failed ({type(exc).__name__})"


class Sender:
    """The process-wide sending machinery of one destination, shared by all runs and audiences."""

    def __init__(
        self,
        destination: Destination,
        client: httpx.Client | None = None,
        stopping: threading.Event | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        limits = destination.limits
        self.limits = limits
        self.destination_id = destination.id
        self.stopping = stopping or threading.Event()  # set on SIGTERM: cuts short every wait
        # as sent in a query string or JSON body, a secret may come back encoded
        self.secrets = sorted(
            {
                form
                for secret in destination.secrets()
                if secret
                for form in (secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1])
            },
            key=len,
            reverse=True,
        )
        self.client = client or httpx.Client(
            transport=transport,  # None: the network; tests may hand in an in-process emulation
            headers={"Accept-Encoding": "identity"},  # a compressed answer could inflate far past ANSWER_MAX
            timeout=limits.timeout,
            limits=httpx.Limits(
                max_connections=limits.max_in_flight, max_keepalive_connections=limits.max_in_flight
            ),
        )
        self.limiter = RateLimiter(limits.rate_limit, stopping=self.stopping)
        self.counted = {"requests": 0, "retried": 0}  # for the progress bars; the metrics count too
        self.counted_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(limits.max_in_flight, thread_name_prefix=f"send-{destination.id}")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()

    def scrub(self, text: str, call: Call | None = None) -> str:
        """`text` without any secret (nor a generated password `call` carries), shortened for run history."""
        for secret in self.secrets + (call.masked_values() if call else []):
            text = text.replace(secret, "***")
        return text[:REASON_MAX]

    def _sleep(self, seconds: float) -> None:
        """A retry's wait (backoff or Retry-After), ended by the process stopping."""
        metrics.RETRIES.labels(self.destination_id).inc()
        self._count("retried")
        if self.stopping.wait(seconds):
            raise Interrupted

    def _count(self, what: str) -> None:
        with self.counted_lock:
            self.counted[what] += 1

    def _attempt(self, call: Call) -> list[Outcome] | Call:
        return call.read(call, self._answer(call))

    def _answer(self, call: Call) -> httpx.Response:
        """One request of `call`, paced; its answer unless it is one to retry, or refuses the credentials."""
        self.limiter.wait()
        self._count("requests")
        try:
            response = self._request(call)
        except httpx.TransportError as exc:
            metrics.observe_request(self.destination_id, None)
            if isinstance(exc, UNANSWERED):  # the request went out: the destination may have taken it
                for change in call.changes:
                    change.in_doubt = True
            if isinstance(exc, httpx.TimeoutException):
                raise RetriableError(f"no answer within {self.limits.timeout:g}s") from None
            raise RetriableError(_unconnected(call, exc)) from None
        except httpx.HTTPError as exc:  # e.g. a body that cannot be decoded; its text may hold the URL
            raise RetriableError(f"unreadable answer ({type(exc).__name__})") from None
        except ValueError as exc:  # a message JSON cannot carry; the value rules should have made it null
            raise FatalError(f"the message cannot be sent as JSON ({exc})") from None
        raise_for_retry_or_auth(response, self.limiter)
        return response

    def _request(self, call: Call) -> httpx.Response:
        """The answer to `call`, its body read up to ANSWER_MAX bytes and until `timeout` after the request.

        An answer longer, or slower, stands as unreadable: its body is replaced by a note saying so, which the
        readers show as the reason of an error status and cannot take for the body of a success.
        """
        # `timeout` bounds each read; this bounds the body too, which could come a byte at a time forever
        deadline = time.monotonic() + self.limits.timeout
        unread = None
        content = None if call.json is None else dumps(call.json).encode()  # numerics with their digits
        sent = call.headers if content is None else {"Content-Type": "application/json", **call.headers}
        with self.client.stream(
            call.method, call.url, params=call.params, content=content, headers=sent
        ) as streamed:
            body = bytearray()
            for chunk in streamed.iter_bytes():
                body += chunk
                if len(body) > ANSWER_MAX:  # leaving the block closes the response and drops its connection
                    unread = TOO_LARGE
                    break
                if time.monotonic() > deadline:
                    unread = f"answer still arriving after {self.limits.timeout:g}s{UNREAD}"
                    break
        metrics.observe_request(self.destination_id, streamed.status_code)
        headers = [(k, v) for k, v in streamed.headers.multi_items() if k.lower() not in FRAMING]
        if unread:
            headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
            headers.append(("Content-Type", "text/plain"))
            body = bytearray(unread.encode())
        return httpx.Response(
            streamed.status_code, headers=headers, content=bytes(body), request=streamed.request
        )

    def send(self, call: Call) -> list[Outcome]:
        """Send one call, and the calls its answer leads to, with retries; AuthError propagates, other
        errors become outcomes."""
        while True:
            result = self._send_one(call)
            if isinstance(result, Call):
                call = result
                continue
            return result

    def prove(self, call: Call) -> str:
        """Send a destination's probe once: "credentials accepted", else raises the error that says why not
        (AuthError: "credentials refused (...)"), its text scrubbed."""
        try:
            self._attempt(call)
        except DestinationError as exc:
            raise type(exc)(self.scrub(exc.reason, call), exc.status) from None
        return CREDENTIALS_ACCEPTED

    def fetch(self, call: Call) -> httpx.Response:
        """A read (a call carrying no change) paced and retried as a change is: its answer, or the error
        (AuthError, RetriableError after the last attempt) with its text scrubbed; raises Interrupted when
        the process stops."""
        try:
            return self._retrying()(self._answer, call)
        except DestinationError as exc:
            raise type(exc)(self.scrub(exc.reason, call), exc.status) from None

    def _retrying(self) -> Retrying:
        limits = self.limits
        return ratelimit.retrying(
            limits.max_attempts, limits.backoff_initial, limits.backoff_max, self._sleep
        )

    def _send_one(self, call: Call) -> list[Outcome] | Call:
        try:
            return self._retrying()(self._attempt, call)
        except Interrupted:  # not sent, or not accepted yet: pending
            return [failed(change, INTERRUPTED) for change in call.changes]
        except RetriableError as exc:
            attempts = f"{self.limits.max_attempts} attempt" + ("s" if self.limits.max_attempts > 1 else "")
            reason = self.scrub(f"gave up after {attempts}: {exc.reason}", call)
            return [failed(change, reason) for change in call.changes]
        except AuthError as exc:
            raise AuthError(self.scrub(exc.reason, call), exc.status) from None
        except FatalError as exc:
            return [rejected(change, self.scrub(exc.reason, call), refused=True) for change in call.changes]


class Why(Enum):
    """Why a delivery stopped before its end."""

    INTERRUPTED = "interrupted"  # the process is stopping
    REFUSED = "refused"  # the destination refused the credentials, or redirected (AuthError)
    FAILING = "failing"  # most of the recent requests failed
    REFUSED_ALIKE = "refused alike"  # the first requests were all refused alike: its settings look wrong


@dataclass(frozen=True)
class Stop:
    """A delivery's stop: `why` for the code, `reason` for people (every change it cut short carries it)."""

    why: Why
    reason: str


class Delivery:
    """One run's delivery to one connection: stops on refused credentials, when most recent calls fail, or
    when the first requests are all refused alike (a misconfigured destination, not refused users).

    Until the destination accepted a request, its refusals are held back: a refusal is taken as one about
    its user only once the destination accepted something or refused differently. A refusal shared by the
    first SAME_REFUSALS requests (whole batches) is the destination's: the delivery stops and they stay
    pending, as do those still held when the delivery ends (`held()`).
    """

    def __init__(self, sender: Sender) -> None:
        self.sender = sender
        self.stopped: Stop | None = None
        self.recent: deque[bool] = deque(maxlen=max(8, sender.limits.max_in_flight))  # True: the call failed
        self.trusted = False  # a request was accepted, or refusals differed: refusals are about users
        self.suspects: list[Outcome] = []
        self.suspect_calls = 0

    def send_all(self, calls: list[Call]) -> list[Outcome]:
        if self.sender.stopping.is_set() and not self.stopped:
            self.stopped = Stop(Why.INTERRUPTED, INTERRUPTED)
        if self.stopped:
            return [failed(c, self.stopped.reason) for call in calls for c in call.changes]
        futures = [(call, self.sender.pool.submit(self.sender.send, call)) for call in calls]
        batch: list[list[Outcome]] = []
        for call, future in futures:
            try:
                results = future.result()
            except AuthError as exc:
                self.stopped = Stop(Why.REFUSED, f"stopped: {exc.reason}")
                results = [failed(c, self.stopped.reason) for c in call.changes]
            batch.append(results)
            self.recent.append(all(o.status == Status.FAILED for o in results))
        outcomes = self._judge(batch)
        # the calls the stop cut short failed because of it, not the destination: not counted as giving up
        if self.sender.stopping.is_set() and not self.stopped:
            self.stopped = Stop(Why.INTERRUPTED, INTERRUPTED)
        failures = sum(self.recent)
        if not self.stopped and len(self.recent) >= 4 and failures * 2 > len(self.recent):
            last = next((o.reason for o in reversed(outcomes) if o.status == Status.FAILED), None)
            window = len(self.recent)
            reason = f"gave up for this run: {failures} of the last {window} requests failed (last: {last})"
            self.stopped = Stop(Why.FAILING, reason)
        return outcomes

    def held(self) -> list[Outcome]:
        """The refusals still held back when the delivery ends: nothing was accepted, so they cannot be told
        from a refusal of the destination's settings; they stay pending rather than rejected."""
        held, self.suspects = self.suspects, []
        return [
            failed(
                o.change,
                f"refused ({o.reason}) while nothing was accepted: kept for the next run, as a refusal of "
                "the destination's settings cannot be told from one about this user",
            )
            for o in held
        ]

    def _judge(self, batch: list[list[Outcome]]) -> list[Outcome]:
        """The outcomes of a batch of requests, refusals held back while they may be the destination's."""
        outcomes = [o for results in batch for o in results]
        if self.trusted:
            return outcomes
        refused = [o for o in outcomes if o.refused]
        # an answer whose body was not read is no sign that the destination refused differently
        reasons = {o.reason for o in refused + self.suspects[:1] if UNREAD not in (o.reason or "")}
        if any(o.status == Status.ACCEPTED for o in outcomes) or len(reasons) > 1:
            self.trusted = True
            suspects, self.suspects = self.suspects, []
            return suspects + outcomes
        self.suspects += refused
        self.suspect_calls += sum(1 for results in batch if any(o.refused for o in results))
        others = [o for o in outcomes if not o.refused]
        if self.suspect_calls < SAME_REFUSALS:
            return others
        reason = (
            f"stopped: the first {self.suspect_calls} requests were all refused alike "
            f"({self.suspects[0].reason}) and none was accepted: the destination's settings look wrong "
            "(an endpoint path, a network id, an offer?)"
        )
        self.stopped = Stop(Why.REFUSED_ALIKE, reason)
        suspects, self.suspects = self.suspects, []
        return others + [failed(o.change, reason) for o in suspects]
