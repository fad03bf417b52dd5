"""Everflow's postback endpoint, as its helpdesk documents it."""

from __future__ import annotations

import collections
from typing import Any

from sync.sandbox.fake import FakeServer
from sync.sandbox.http import Recorded, Response


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
