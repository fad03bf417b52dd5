"""Everflow's Network API reports: the conversions the postbacks left, as the conversion report and the events
of one transaction show them."""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

from sync.sandbox.http import Recorded, Response, _json

# Everflow helpdesk, Error Code Reference Guide - Conversions: code and error message
DUPLICATE = (8, "Duplicate Conversion")
MANUALLY_REJECTED = (9, "Manually Rejected")
INVALID_CLICK = (13, "Invalid Click")  # "Associated click not found"
INVALID_TOKEN = (21, "Invalid Verification Token")
UNMATCHING_EVENT = (25, "Unmatching Offer Event ID")  # "Event ID does not belong to offer"
# REFERENCE.md (Everflow, Reporting) / developers.everflow.io, Raw Conversions Report: the prior 365 days
# only, at most one year long
REPORT_REACH = timedelta(days=365)
UTC_TIMEZONE_ID = 67  # REFERENCE.md: 67 = UTC
REPORT_PATH = "/v1/networks/reporting/conversions"
EVENTS_PATH = re.compile(r"/v1/networks/reporting/events/([^/]+)")
# developers.everflow.io, Raw Conversions Report: "from and to dates (format can be YYYY-mm-DD or YYYY-mm-DD
# hh:mm:ss)"
DATE_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d")


@dataclass
class Conversion:
    """One conversion or post-conversion event Everflow recorded, counted or not (`error_code`)."""

    conversion_id: str
    transaction_id: str
    adv_event_id: str  # "" (or "0"): the base conversion
    at: float  # unix seconds
    status: str = "approved"
    error_code: int = 0
    error_message: str = ""
    params: dict[str, str] = field(default_factory=dict)

    @property
    def is_event(self) -> bool:
        return self.adv_event_id not in ("", "0")

    def row(self, names: dict[str, str] | None) -> dict[str, Any]:
        """The report row: the published fields (developers.everflow.io, Get Conversion Report and Get Events
        Per Transaction: conversion_id, conversion_unix_timestamp, status, transaction_id, is_event, event,
        error_code, error_message, sale_amount, order_id, coupon_code, adv1..adv5). `event` is the event's
        name (developers.everflow.io, Conversion & Event Webhooks: "the event field which contains the event
        name"); an event the sandbox was given no name for is named "event <id>" (chosen here). The values
        of a counted conversion's error_code and error_message are not documented; chosen here: 0 and ""."""
        event = (names or {}).get(self.adv_event_id, f"event {self.adv_event_id}") if self.is_event else ""
        return {
            "conversion_id": self.conversion_id,
            "conversion_unix_timestamp": int(self.at),
            "status": self.status,
            "transaction_id": self.transaction_id,
            "is_event": self.is_event,
            "event": event,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "sale_amount": float(self.params.get("amount") or 0),
            "order_id": self.params.get("order_id", ""),
            "coupon_code": self.params.get("coupon_code", ""),
            **{f"adv{i}": self.params.get(f"adv{i}", "") for i in range(1, 6)},
        }


class Reports:
    """The network's recorded conversions and the two reporting endpoints that read them, with the API's key,
    rate limit and errors. Not thread-safe: its server calls it with its lock held."""

    def __init__(self, names: dict[str, str] | None) -> None:
        self.names = names  # advertiser event id -> the event's name in Everflow
        self.api_key = "network-key"
        # developers.everflow.io, Paging: "the maximum page size is typically 2000"
        self.page_max = 2000
        # developers.everflow.io, Rate Limiting / REFERENCE.md: 30 requests per second for network keys, the
        # quota resetting every 30 seconds
        self.quota = 30 * 30
        self.window = 30.0
        self.conversions: list[Conversion] = []
        self.api_requests = 0
        self.over_quota = 0  # requests answered 429 for the quota
        self._ids = itertools.count(1)
        self._window_start = 0.0
        self._window_used = 0

    def record(self, transaction_id: str, adv_event_id: str, at: float, **fields: Any) -> Conversion:
        # The form of conversion ids is not documented beyond "<string>" (the Update Conversion Status example
        # shows 32 hex digits): chosen here.
        conversion = Conversion(f"{next(self._ids):032x}", transaction_id, adv_event_id, at, **fields)
        self.conversions.append(conversion)
        return conversion

    def matching(self, transaction_id: str, adv_event_id: str | None) -> list[Conversion]:
        """The conversions of a transaction, those of one event (None: every one)."""
        return [
            c
            for c in self.conversions
            if c.transaction_id == transaction_id and adv_event_id in (None, c.adv_event_id)
        ]

    def handle(self, rec: Recorded) -> Response:
        self.api_requests += 1
        # developers.everflow.io, Errors: 401 for a missing X-Eflow-API-Key header ("No Authentication Method
        # Found") and for an invalid or revoked key; every error body is {"error": "..."}. Headers are
        # case-insensitive. The invalid key's message is not documented; chosen here.
        key = rec.headers.get("x-eflow-api-key")
        if not key:
            return _json(401, {"error": "No Authentication Method Found"})
        if key != self.api_key:
            return _json(401, {"error": "Invalid API key"})
        limited = self._rate_limit()
        if limited:
            return limited
        match = EVENTS_PATH.fullmatch(rec.path)
        if rec.method == "POST" and rec.path == REPORT_PATH:
            status, body, headers = self._report(rec)
        elif rec.method == "GET" and match:
            status, body, headers = self._events(unquote(match[1]))
        else:  # developers.everflow.io, Errors: 404 when "the URL path is incorrect"
            status, body, headers = _json(404, {"error": "Not Found"})
        return status, body, headers | self._quota_headers()

    def _rate_limit(self) -> Response | None:
        # developers.everflow.io, Rate Limiting / REFERENCE.md: network keys get 30 requests per second, the
        # quota resets every 30 seconds, every response carries X-RateLimit-Limit (requests per window) and
        # X-RateLimit-Remaining; past it every request answers 429 until the window resets. No Retry-After is
        # documented; the 429's message is chosen here.
        now = time.monotonic()
        if now - self._window_start >= self.window:
            self._window_start, self._window_used = now, 0
        self._window_used += 1
        if self._window_used > self.quota:
            self.over_quota += 1
            status, body, headers = _json(429, {"error": "Too Many Requests"})
            return status, body, headers | self._quota_headers()
        return None

    def _quota_headers(self) -> dict[str, str]:
        remaining = max(0, self.quota - self._window_used)
        return {"X-RateLimit-Limit": str(self.quota), "X-RateLimit-Remaining": str(remaining)}

    def _report(self, rec: Recorded) -> Response:
        body = rec.json
        # developers.everflow.io, Errors: 400 for "missing or malformed parameters, invalid JSON body,
        # unsupported field values". The messages are chosen here.
        if not isinstance(body, dict):
            return _json(400, {"error": "Invalid JSON body"})
        # developers.everflow.io, Raw Conversions Report: each request must contain from, to, timezone_id,
        # show_conversions and show_events.
        for name in ("from", "to", "timezone_id", "show_conversions", "show_events"):
            if name not in body:
                return _json(400, {"error": f"Missing required field {name}"})
        start, end = _moment(body["from"], end=False), _moment(body["to"], end=True)
        if start is None or end is None:
            return _json(400, {"error": "from and to must be YYYY-mm-DD or YYYY-mm-DD hh:mm:ss"})
        # Only UTC is emulated: another timezone's offsets would be the sandbox's invention.
        if body["timezone_id"] != UTC_TIMEZONE_ID:
            return _json(400, {"error": "the sandbox knows timezone_id 67 (UTC) only"})
        # developers.everflow.io, Raw Conversions Report: "limited to the prior 365 days only and ... to a
        # maximum duration of one year. Requests outside of this range will result in an error" (its status
        # is not documented; chosen here: 400).
        if start < time.time() - REPORT_REACH.total_seconds() or end - start > REPORT_REACH.total_seconds():
            return _json(400, {"error": "The conversion report is limited to the prior 365 days"})
        # developers.everflow.io, Paging: `page` (1-based) and `page_size` in the query string; page 1 of 50
        # when not given; "the maximum page size is typically 2000 although some endpoints enforce a smaller
        # maximum". How a larger page_size is answered is not documented; chosen here: cut to the maximum,
        # as the answer's paging.page_size shows.
        page, size = _whole(rec.query.get("page", "1")), _whole(rec.query.get("page_size", "50"))
        if page is None or size is None:
            return _json(400, {"error": "page and page_size must be positive whole numbers"})
        size = min(size, self.page_max)
        shown = [
            c
            for c in self.conversions
            if start <= c.at <= end and (body["show_events"] if c.is_event else body["show_conversions"])
        ]
        shown.sort(key=lambda c: c.at, reverse=True)  # the order is not documented; chosen here: newest first
        rows = [c.row(self.names) for c in shown[(page - 1) * size : page * size]]
        # developers.everflow.io, Get Conversion Report: {"conversions": [...]}, with the paging object of
        # paginated endpoints (Paging: page, page_size, total_count).
        return _json(
            200, {"conversions": rows, "paging": {"page": page, "page_size": size, "total_count": len(shown)}}
        )

    def _events(self, transaction_id: str) -> Response:
        conversions = self.matching(transaction_id, None)
        # developers.everflow.io, Errors: 404 when "the resource ID does not exist": a transaction Everflow
        # recorded nothing for (chosen here; an unknown click's answer is not documented).
        if not conversions:
            return _json(404, {"error": "Transaction not found"})
        # developers.everflow.io, Get Events Per Transaction: {"events": [...]}, "Post-conversion events for
        # the transaction. Empty if there are no events."
        return _json(200, {"events": [c.row(self.names) for c in conversions if c.is_event]})


def _moment(value: Any, *, end: bool) -> float | None:
    """Unix seconds of a report bound in UTC; a date alone as `to` takes in the whole day (chosen here)."""
    for form in DATE_FORMATS:
        try:
            moment = datetime.strptime(str(value), form).replace(tzinfo=UTC)
        except ValueError:
            continue
        if end and form == "%Y-%m-%d":
            moment += timedelta(days=1, seconds=-1)
        return moment.timestamp()
    return None


def _whole(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None
