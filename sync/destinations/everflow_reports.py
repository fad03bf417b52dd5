"""Verifying Everflow postbacks against Everflow's own records, for `reconcile`: the Network API's conversion
report (`POST /networks/reporting/conversions`) and the events of one transaction
(`GET /networks/reporting/events/{transactionId}`), read with the key `settings.reporting_api_key_env` names.

A postback's 200 says only that it was received (REFERENCE.md, Everflow): each one the state counts as sent
is looked up, by transaction id and event, near the time it was sent, and comes out confirmed, rejected
(Everflow's error code and message), not found once the grace period has passed, or pending inside it; one
older than the report reaches back cannot be verified (`CANNOT_VERIFY`, without a request). The sends are
read in windows of consecutive sends (`WINDOW_SENDS` at most) and each window's report page by page: memory
holds one window and one page, whatever the number of sends.

Report rows are matched by transaction id and event: a base conversion by `is_event` false; an event by its
advertiser event id when a row carries one (`adv_event_id`, not in the published rows), else by the
published `event`, the event's name, through `settings.event_mapping` (or a name that is one of its ids).
"""

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote

import httpx

from sync import ratelimit
from sync.destinations.http import error_text, raise_for_retry_or_auth
from sync.errors import AuthError, RetriableError
from sync.ratelimit import Interrupted, RateLimiter

if TYPE_CHECKING:
    import threading

    from sync.destinations.everflow import Everflow

CONFIRMED, REJECTED, NOT_FOUND, PENDING = "confirmed", "rejected", "not_found", "pending"
CANNOT_VERIFY = "cannot_verify"  # older than the report reaches back
# REFERENCE.md (Everflow, Reporting): the conversion report covers the prior 365 days only; a day is kept
# for the clocks and the length of a reconcile, so that no window asks for more.
REPORT_DAYS = 364
# How far Everflow's conversion time may be from the time the postback was answered (clocks, retries): a
# row further away is another postback of the same transaction and event (a re-entry's).
MATCH_WITHIN = timedelta(minutes=10)
WINDOW_SENDS = 10_000  # sends held at once
SPLIT_GAP = timedelta(hours=1)  # sends further apart start a new window: the report between them is skipped
# A window of at most this many transactions, all advertiser events, is looked up transaction by
# transaction: a report, even minutes long, holds every conversion of the network in them. The events
# endpoint lists post-conversion events only (developers.everflow.io, Get Events Per Transaction: "Returns
# all post-conversion events for a specific transaction"): base conversions are always read in the report.
LOOKUP_MAX = 3
# developers.everflow.io, Paging: page 1-based, default page_size 50, "the maximum page size is typically
# 2000 although some endpoints enforce a smaller maximum": the answer's paging.total_count is followed.
PAGE_SIZE = 500
MAX_PAGES = 10_000  # 5 million rows for one window of sends: past it the answer is not a report that ends
# developers.everflow.io, Rate Limiting / REFERENCE.md: 30 requests per second per network, one bucket
# shared by every key and user of the network; reconcile takes a third of it, one request at a time (the
# reporting endpoints allow 10 concurrent).
REQUESTS_PER_SECOND = 10.0
# developers.everflow.io, Rate Limiting / REFERENCE.md: the quota resets every 30 seconds; once spent (the
# answer's X-RateLimit-Remaining is 0) every request answers 429 until then.
QUOTA_WINDOW = 30.0
REPORT_TIMEOUT = 60.0  # a report page is computed, not looked up: longer than a postback's answer
API_KEY_HEADER = "X-Eflow-API-Key"  # REFERENCE.md (Everflow, REST API)
UTC_TIMEZONE_ID = 67  # REFERENCE.md (Everflow, Reporting): timezone_id 67 is UTC
DUPLICATE = 8  # Everflow's conversion error code reference: 8 Duplicate Conversion
# statuses of a row that Everflow did not count, when it gives no error code (developers.everflow.io,
# Conversion Summary: pending, approved, invalid, rejected_scrub, rejected_manual; Update Conversion Status
# example: "rejected")
NOT_COUNTED = {"invalid", "rejected", "rejected_manual", "rejected_scrub"}


class Sent(NamedTuple):
    """One postback the state says Everflow accepted (answered 2xx)."""

    user_id: str
    transaction_id: str
    adv_event_id: str | None  # None: the base conversion
    accepted_at: datetime  # UTC


class Verdict(NamedTuple):
    user_id: str
    outcome: str  # CONFIRMED, REJECTED, NOT_FOUND, PENDING (inside the grace period) or CANNOT_VERIFY
    at: datetime | None  # Everflow's conversion time, when confirmed or rejected
    error_code: int | None
    reason: str | None


class CannotVerify(Exception):
    """Everflow's reports cannot be read (no key, a refused key, unreachable); str(e) says why, for people."""


class _Row(NamedTuple):
    at: datetime | None
    error_code: int | None
    error_message: str
    status: str


def reporting_configured(destination: "Everflow") -> str | None:
    """None when a reporting key is configured, else why the destination's postbacks cannot be verified."""
    return destination.unverifiable


def verify(
    destination: "Everflow",
    sent: Iterable[Sent],
    *,
    now: datetime,
    grace: timedelta,
    transport: httpx.BaseTransport | None = None,
    stopping: "threading.Event | None" = None,
) -> Iterator[Verdict]:
    """A verdict for each send, window by window (in the order of `sent` within a window: give it in the
    order of accepted_at, or each jump in time starts a window and its requests of its own), reading `sent` as
    it goes. Raises CannotVerify here when no key is configured, or while iterating when Everflow refuses
    the key or cannot be reached (the verdicts given before it stand); Interrupted when `stopping` is set."""
    reason = reporting_configured(destination)
    if reason is not None:
        raise CannotVerify(reason)
    return _verdicts(destination, sent, now, grace, transport, stopping)


def _verdicts(
    destination: "Everflow",
    sent: Iterable[Sent],
    now: datetime,
    grace: timedelta,
    transport: httpx.BaseTransport | None,
    stopping: "threading.Event | None",
) -> Iterator[Verdict]:
    timeout = max(destination.limits.timeout, REPORT_TIMEOUT)
    with httpx.Client(transport=transport, timeout=timeout) as client:
        yield from _Reader(destination, client, stopping).verdicts(sent, now, grace)


class _Reader:
    """Everflow's reporting API for one destination, paced and retried like its postbacks."""

    def __init__(
        self,
        destination: "Everflow",
        client: httpx.Client,
        stopping: "threading.Event | None",
    ) -> None:
        self.key = destination.reporting_api_key or ""
        self.key_env = destination.reporting_key_env
        self.base = destination.reporting_api_base
        self.limits = destination.limits
        self.limiter = RateLimiter(REQUESTS_PER_SECOND, stopping=stopping)
        self.client = client
        mapping = destination.event_mapping if isinstance(destination.event_mapping, dict) else {}
        self.event_ids = {str(id_).strip() for id_ in mapping.values()}
        self.ids_by_name: dict[str, set[str]] = {}
        for name, id_ in mapping.items():
            self.ids_by_name.setdefault(name.strip().casefold(), set()).add(str(id_).strip())

    def verdicts(self, sent: Iterable[Sent], now: datetime, grace: timedelta) -> Iterator[Verdict]:
        oldest = now - timedelta(days=REPORT_DAYS)
        window: list[Sent] = []
        for send in sent:
            if send.accepted_at < oldest:
                yield Verdict(send.user_id, CANNOT_VERIFY, None, None, _too_old(send))
                continue
            if window and (
                len(window) >= WINDOW_SENDS or abs(send.accepted_at - window[-1].accepted_at) > SPLIT_GAP
            ):
                yield from self._judge(window, now, grace)
                window = []
            window.append(send)
        if window:
            yield from self._judge(window, now, grace)

    def _judge(self, window: list[Sent], now: datetime, grace: timedelta) -> Iterator[Verdict]:
        """The window's verdicts: each send takes the closest unclaimed row of its transaction and event."""
        rows: dict[tuple[str, str], list[_Row]] = {(s.transaction_id, _event(s)): [] for s in window}
        transactions = {s.transaction_id for s in window}
        unnamed: dict[str, set[str]] = {}  # events of the window's transactions that no mapping names
        for raw in self._rows(window):
            tid = str(raw.get("transaction_id") or "")
            ids = self._event_ids(raw)
            if ids is not None and not ids and tid in transactions:
                unnamed.setdefault(tid, set()).add(str(raw.get("event") or ""))
            for event in [""] if ids is None else sorted(ids):
                if (tid, event) in rows:
                    rows[(tid, event)].append(_row(raw))
        for send in window:
            candidates = rows[(send.transaction_id, _event(send))]
            row = _closest(candidates, send.accepted_at)
            if row is not None:
                candidates.remove(row)  # one row answers for one send
                yield self._found(send, row)
            elif send.accepted_at > now - grace:
                yield Verdict(send.user_id, PENDING, None, None, _pending(send, now, grace))
            else:
                yield Verdict(send.user_id, NOT_FOUND, None, None, _missing(send, unnamed))

    def _found(self, send: Sent, row: _Row) -> Verdict:
        if row.error_code:
            reason = f"error {row.error_code}: {row.error_message or 'no message'}"
            if row.error_code == DUPLICATE:
                where = "the offer" if _event(send) == "" else f"advertiser event {send.adv_event_id}"
                reason += (
                    f" (Everflow already holds this transaction and event: a re-entry sends it again; if "
                    f're-entries should count, turn on "Allow Duplicate Conversion" on {where} in Everflow; '
                    "not repaired, as sending it again is another duplicate)"
                )
            return Verdict(send.user_id, REJECTED, row.at, row.error_code, reason)
        if row.status.casefold() in NOT_COUNTED:
            return Verdict(
                send.user_id, REJECTED, row.at, None, f"Everflow shows the conversion as {row.status}"
            )
        return Verdict(send.user_id, CONFIRMED, row.at, None, None)

    def _event_ids(self, raw: dict[str, Any]) -> set[str] | None:
        """The advertiser event ids a report row may stand for; None for a base conversion. Published rows
        name the event (`event`); its id is taken when a row carries one, and a name that is an id counts."""
        if not raw.get("is_event"):
            return None
        if raw.get("adv_event_id") not in (None, ""):
            return {str(raw["adv_event_id"]).strip()}
        event = str(raw.get("event") or "").strip()
        return ({event} & self.event_ids) | self.ids_by_name.get(event.casefold(), set())

    def _rows(self, window: list[Sent]) -> Iterator[dict[str, Any]]:
        """Everflow's rows that may hold the window's sends: looked up by transaction, or the report."""
        transactions = {s.transaction_id for s in window}
        if len(transactions) <= LOOKUP_MAX and all(_event(s) for s in window):
            found = self._lookups(transactions)
            if found is not None:
                yield from found
                return
        start = min(s.accepted_at for s in window) - MATCH_WITHIN
        end = max(s.accepted_at for s in window) + MATCH_WITHIN
        yield from self._report(start, end)

    def _lookups(self, transactions: set[str]) -> list[dict[str, Any]] | None:
        """The events of each transaction; None when one is answered 404 (an unknown transaction, or a wrong
        reporting_api_base: the report tells them apart)."""
        found: list[dict[str, Any]] = []
        for tid in sorted(transactions):
            answer = self._request("GET", f"/networks/reporting/events/{quote(tid, safe='')}")
            if answer is None:
                return None
            events = answer.get("events")
            rows = events if isinstance(events, list) else []
            found += [{"transaction_id": tid} | e for e in rows if isinstance(e, dict)]
        return found

    def _report(self, start: datetime, end: datetime) -> Iterator[dict[str, Any]]:
        """The conversion report's rows from `start` to `end`, page by page."""
        # developers.everflow.io, Raw Conversions Report: from, to ("YYYY-mm-DD hh:mm:ss"), timezone_id,
        # show_conversions and show_events are required; the published example adds currency_id.
        body: dict[str, Any] = {
            "from": _when(start),
            "to": _when(end + timedelta(seconds=1)),
            "timezone_id": UTC_TIMEZONE_ID,
            "show_conversions": True,
            "show_events": True,
            "currency_id": "USD",
            "query": {"filters": []},
        }
        page, seen, first_ids = 1, 0, set()
        while True:
            # Paging: the query string (developers.everflow.io, Paging, and REFERENCE.md); POST reports are
            # also documented to take them in the body: both are sent.
            paging = {"page": page, "page_size": PAGE_SIZE}
            answer = self._request(
                "POST", "/networks/reporting/conversions", params=paging, json=body | paging
            )
            if answer is None:
                raise CannotVerify(
                    f"Everflow has no conversion report at {self.base}: check reporting_api_base"
                )
            rows = answer.get("conversions")
            if not isinstance(rows, list):
                raise CannotVerify("Everflow's conversion report answered without a list of conversions")
            # REFERENCE.md gives the answer as {"conversions": [...]} alone: a report that ignores `page`
            # answers the same page again, and a short page is the last one, whatever `paging` says
            first_id = rows[0].get("conversion_id") if rows and isinstance(rows[0], dict) else None
            if first_id is not None and first_id in first_ids:
                return
            first_ids.add(first_id)
            yield from (row for row in rows if isinstance(row, dict))
            seen += len(rows)
            shown = answer.get("paging") or {}
            total, size = shown.get("total_count"), shown.get("page_size")
            if len(rows) < (size if isinstance(size, int) and size > 0 else PAGE_SIZE):
                return
            if isinstance(total, int) and seen >= total:
                return
            if page >= MAX_PAGES:
                raise CannotVerify(
                    f"Everflow's conversion report from {_when(start)} to {_when(end)} goes on past "
                    f"{MAX_PAGES} pages of {PAGE_SIZE}"
                )
            page += 1

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any] | None:
        """The JSON object answered, or None for a 404; raises CannotVerify for anything else."""
        limits = self.limits
        retrying = ratelimit.retrying(
            limits.max_attempts, limits.backoff_initial, limits.backoff_max, self._sleep
        )
        try:
            response = retrying(self._attempt, method, self.base + path, **kwargs)
        except AuthError as exc:
            raise CannotVerify(
                f"Everflow refused the reporting key in {self.key_env} ({self._scrub(exc.reason)}): it must "
                "be a Network API key"
            ) from None
        except RetriableError as exc:
            raise CannotVerify(
                f"Everflow's reporting API gave no answer after {self.limits.max_attempts} attempt(s): "
                f"{self._scrub(exc.reason)}"
            ) from None
        if response.status_code == 404:
            return None
        if not response.is_success:
            raise CannotVerify(f"Everflow refused the report request: {self._scrub(error_text(response))}")
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise CannotVerify("Everflow's reporting API answered with something other than a JSON object")
        return answer

    def _attempt(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        self.limiter.wait()
        try:
            response = self.client.request(method, url, headers={API_KEY_HEADER: self.key}, **kwargs)
        except httpx.TransportError as exc:
            raise RetriableError(f"{type(exc).__name__} reaching {httpx.URL(url).host}") from None
        if response.headers.get("X-RateLimit-Remaining", "").strip() == "0":  # others share the quota
            self.limiter.pause(QUOTA_WINDOW)
        raise_for_retry_or_auth(response, self.limiter)
        return response

    def _sleep(self, seconds: float) -> None:
        if self.limiter.stopping.wait(seconds):
            raise Interrupted

    def _scrub(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text


def _event(send: Sent) -> str:
    """The send's advertiser event id; "" for the base conversion (no adv_event_id, or Everflow's 0)."""
    event = (send.adv_event_id or "").strip()
    return "" if event == "0" else event


def _closest(rows: list[_Row], moment: datetime) -> _Row | None:
    """The row whose conversion time is closest to `moment`, within MATCH_WITHIN; a counted row before one
    Everflow refused: a postback whose first answer was lost and that was sent again is counted once and
    refused once as a duplicate, and the state holds the time of the second."""
    near = [
        (bool(row.error_code) or row.status.casefold() in NOT_COUNTED, abs(row.at - moment), i)
        for i, row in enumerate(rows)
        if row.at and abs(row.at - moment) <= MATCH_WITHIN
    ]
    return rows[min(near)[2]] if near else None


def _row(raw: dict[str, Any]) -> _Row:
    stamp = raw.get("conversion_unix_timestamp")
    at = datetime.fromtimestamp(stamp, UTC) if isinstance(stamp, int | float) else None
    code = raw.get("error_code")
    try:
        error_code = int(code) if code not in (None, "") else None
    except (TypeError, ValueError):
        error_code = None
    return _Row(at, error_code or None, str(raw.get("error_message") or ""), str(raw.get("status") or ""))


def _when(moment: datetime) -> str:
    """A time as the report takes it in timezone 67 (UTC): "YYYY-mm-DD hh:mm:ss"."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _what(send: Sent) -> str:
    event = _event(send)
    return f"transaction {send.transaction_id}" + (
        f", advertiser event {event}" if event else ", base conversion"
    )


def _too_old(send: Sent) -> str:
    return (
        f"{_what(send)} was sent {send.accepted_at:%Y-%m-%d}, before the {REPORT_DAYS + 1} days Everflow's "
        "conversion report covers: it cannot be verified"
    )


def _pending(send: Sent, now: datetime, grace: timedelta) -> str:
    return (
        f"Everflow's report shows no conversion for {_what(send)} yet: it was sent "
        f"{_span(now - send.accepted_at)} ago, inside the {_span(grace)} grace period"
    )


def _span(duration: timedelta) -> str:
    """A duration for people, in whole minutes."""
    return f"{max(0, round(duration.total_seconds() / 60))} min"


def _missing(send: Sent, unnamed: dict[str, set[str]]) -> str:
    reason = f"Everflow holds no conversion for {_what(send)} within {_span(MATCH_WITHIN)} of its sending"
    names = sorted(unnamed.get(send.transaction_id, set()))
    if names and _event(send):
        shown = ", ".join(repr(n) for n in names[:5])
        reason += (
            f"; it shows event(s) {shown} for this transaction, which settings.event_mapping does not name: "
            "name the events there as Everflow does"
        )
    return reason
