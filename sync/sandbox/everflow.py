"""Everflow's postback endpoint, as its helpdesk documents it, and the reports of what it received."""

from __future__ import annotations

import collections
import time
from collections.abc import Collection
from datetime import datetime
from typing import Any

from sync.sandbox.everflow_reports import (
    DUPLICATE,
    INVALID_CLICK,
    INVALID_TOKEN,
    MANUALLY_REJECTED,
    UNMATCHING_EVENT,
    Reports,
)
from sync.sandbox.fake import FakeServer
from sync.sandbox.http import Recorded, Response

# the postback parameters a report row shows (amount as sale_amount)
REPORTED_PARAMS = frozenset({"amount", "order_id", "coupon_code", *(f"adv{i}" for i in range(1, 6))})


def _is_int(value: Any) -> bool:
    """A JSON integer: not a bool (a subclass of int in Python), not a string of digits."""
    return isinstance(value, int) and not isinstance(value, bool)


class EverflowServer(FakeServer):
    """Everflow server postbacks: `GET /?nid=&transaction_id=&adv_event_id=[&verification_token=]...`, and the
    Network API's reports of what they left (`/v1/networks/reporting/...`, see `Reports`).

    Every postback answers 200. `accepted` counts what the endpoint received, per (transaction_id,
    adv_event_id); `conversions` counts what Everflow would count; `report` lists the rejected ones with
    their reason. `reports.conversions` holds what the reports show: each postback of this network, counted
    or rejected with Everflow's error code; tests change it behind the product's back with
    `drop_conversions`, `reject_conversions` and `add_conversion`.
    """

    def __init__(
        self,
        *,
        network_id: str = "1",
        verification_token: str | None = None,
        allow_duplicates: bool | Collection[str] = False,
        events: dict[str, str] | None = None,
        clicks: Collection[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """`allow_duplicates`: every event, or the advertiser event ids ("" the base conversion) whose
        duplicates count; `events`: the offer's advertiser event ids and their names (None: any id, unnamed);
        `clicks`: the transaction ids of known clicks (None: any). The reporting API's key, page size and rate
        limit are `reports`' attributes."""
        self.network_id = network_id
        self.verification_token = verification_token
        # Everflow helpdesk, advertiser events / REFERENCE.md: "Allow Duplicate Conversion" is off by default.
        self.allow_duplicates = allow_duplicates
        self.events = events
        self.clicks = None if clicks is None else set(clicks)
        self.conversions: collections.Counter[tuple[str, str]] = collections.Counter()
        self.report: list[tuple[str, str, str]] = []  # (transaction_id, adv_event_id or "", reason)
        self.reports = Reports(events)
        super().__init__(**kwargs)

    def add_conversion(
        self,
        transaction_id: str,
        adv_event_id: str = "",
        *,
        at: datetime,
        error: tuple[int, str] | None = None,
    ) -> None:
        """Record a conversion (or, with `error`, a rejected one) as if a postback had arrived at `at`."""
        code, message = error or (0, "")
        with self._lock:
            if not code:
                self.conversions[(transaction_id, adv_event_id)] += 1
            self.reports.record(
                transaction_id,
                adv_event_id,
                at.timestamp(),
                error_code=code,
                error_message=message,
                status="invalid" if code else "approved",
            )

    def drop_conversions(self, transaction_id: str, adv_event_id: str | None = None) -> int:
        """Forget what the reports hold for a transaction (one event, or all); how many were dropped."""
        with self._lock:
            dropped = self.reports.matching(transaction_id, adv_event_id)
            self.reports.conversions = [c for c in self.reports.conversions if c not in dropped]
            return len(dropped)

    def reject_conversions(self, transaction_id: str, adv_event_id: str | None = None) -> int:
        """Reject a transaction's conversions by hand, as a network manager can; how many were rejected."""
        with self._lock:
            found = self.reports.matching(transaction_id, adv_event_id)
            for conversion in found:
                # developers.everflow.io, Update Conversion Status: conversion_status "rejected"; Everflow's
                # error code reference: 9 Manually Rejected.
                conversion.status = "rejected"
                conversion.error_code, conversion.error_message = MANUALLY_REJECTED
            return len(found)

    def _handle(self, rec: Recorded) -> Response:
        if rec.path.startswith("/v1/"):
            return self.reports.handle(rec)
        # Everflow helpdesk, server postbacks / REFERENCE.md: nid and transaction_id, optional adv_event_id,
        # aid, amount, adv1..adv5, order_id, coupon_code, email, verification_token. The extras are only
        # recorded.
        q = rec.query
        key = (q.get("transaction_id", ""), q.get("adv_event_id", ""))
        if q.get("nid") and q.get("transaction_id"):
            self.accepted[key] += 1
        reason, error = self._rejection(q, key)
        if reason:
            self.report.append((*key, reason))
        else:
            self.conversions[key] += 1
        # A postback without nid or transaction_id, or for another network, cannot show in this network's
        # reports (chosen here); the others do, rejected ones with their error code (Everflow helpdesk, error
        # code reference: "Always check the Conversion Report → Error Code column first").
        if reason is None or error is not None:
            code, message = error or (0, "")
            params = {k: v for k, v in q.items() if k in REPORTED_PARAMS}
            self.reports.record(
                *key,
                time.time(),
                status="invalid" if code else "approved",
                error_code=code,
                error_message=message,
                params=params,
            )
        # REFERENCE.md (Everflow helpdesk, server postbacks): a postback answers 200 even when the conversion
        # is rejected; the error codes appear only in Everflow's reports. Response format not documented (2xx
        # = received); the plain-text "OK" body is chosen here.
        return 200, b"OK", {"Content-Type": "text/plain"}

    def _rejection(
        self, q: dict[str, str], key: tuple[str, str]
    ) -> tuple[str | None, tuple[int, str] | None]:
        """Why Everflow would not count this conversion and the error code its reports give, or Nones."""
        # A postback without nid or transaction_id: the answer is not documented; chosen here: 200, and
        # reported.
        if not q.get("nid"):
            return "missing nid", None
        if not q.get("transaction_id"):
            return "missing transaction_id", None
        # Not documented how an unknown network id is reported; chosen here.
        if q["nid"] != self.network_id:
            return "invalid network id", None
        # REFERENCE.md (Everflow helpdesk): verification_token is required when the advertiser uses tokens;
        # "invalid verification token" is one of the report's error codes (21).
        if self.verification_token is not None and q.get("verification_token") != self.verification_token:
            return "invalid verification token", INVALID_TOKEN
        # Everflow's error code reference: 13 Invalid Click, "associated click not found"
        if self.clicks is not None and key[0] not in self.clicks:
            return "invalid click", INVALID_CLICK
        # Everflow's error code reference: 25 Unmatching Offer Event ID, "event ID does not belong to offer"
        if self.events is not None and key[1] not in ("", "0") and key[1] not in self.events:
            return "event not in the offer", UNMATCHING_EVENT
        # REFERENCE.md (Everflow helpdesk): the same transaction id and event twice is a duplicate conversion
        # (error code 8). Not documented whether a missing adv_event_id and adv_event_id=0 are the same
        # event; chosen here: they are compared as sent.
        if key in self.conversions and not self._allows_duplicates(key[1]):
            return "duplicate conversion", DUPLICATE
        return None, None

    def _allows_duplicates(self, adv_event_id: str) -> bool:
        if isinstance(self.allow_duplicates, bool):
            return self.allow_duplicates
        return adv_event_id in self.allow_duplicates
