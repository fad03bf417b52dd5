"""Everflow's side of reconcile: the postback each settled user's last accepted change was, as the destination
builds it (`Everflow.plan_native`), handed to `sync.destinations.everflow_reports`, which reads Everflow's
conversion report (a Network API key, `settings.reporting_api_key_env`) and answers a verdict per postback.

A postback's 200 means received: only that report says whether Everflow recorded the conversion.
"""

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from sync.connections import Link
from sync.destinations import everflow_reports as reader
from sync.destinations.everflow import Everflow
from sync.models import Change
from sync.ratelimit import Interrupted
from sync.reconcile.store import CONFIRMED, NOT_FOUND, REJECTED, Finding, Unreadable, settled_pages
from sync.tables import sync_state

# the reader's outcomes as stored; None: not known yet (inside the grace period, older than the report)
VERDICTS = {reader.CONFIRMED: CONFIRMED, reader.REJECTED: REJECTED, reader.NOT_FOUND: NOT_FOUND}


def cannot_verify(destination: Everflow) -> str | None:
    """Why the destination's postbacks cannot be checked, or None when its reporting key is configured."""
    return reader.reporting_configured(destination)


def findings(
    conn: sa.Connection,
    ids: dict[str, int],
    destination: Everflow,
    link: Link,
    now: datetime,
    grace: timedelta,
    **reading: Any,
) -> Iterator[Finding]:
    """A finding per settled user: Everflow's verdict on the postback of their last accepted change, or why
    there is none to look up; `reading` goes to the reader (its transport, the event that stops it). Raises
    Unreadable when the report cannot be read."""
    unsent: list[Finding] = []

    def sent() -> Iterator[reader.Sent]:
        columns = (sync_state.c.member, sync_state.c.traits, sync_state.c.changes, sync_state.c.accepted_at)
        for page in settled_pages(conn, ids, *columns, by_time=True):  # the reader's windows
            for row in page:
                change = Change(row.user_id, row.member, row.traits, row.changes)
                if destination.check(change, {}):
                    unsent.append(Finding(row.user_id, None, "no transaction_id: nothing to look up"))
                    continue
                skipped, calls = destination.plan_native([change], {}, link.event)
                if calls:  # an unmapped event sent nothing (skipped on purpose)
                    params = calls[0].params or {}
                    event = params.get("adv_event_id")
                    yield reader.Sent(row.user_id, params["transaction_id"], event, row.accepted_at)

    try:
        for verdict in reader.verify(destination, sent(), now=now, grace=grace, **reading):
            outcome = VERDICTS.get(verdict.outcome)
            reason = verdict.reason or ("inside the grace period" if outcome is None else None)
            repair = "re-send the postback" if outcome == NOT_FOUND else None
            yield Finding(verdict.user_id, outcome, reason, verdict.at, repair)
    except reader.CannotVerify as exc:
        raise Unreadable(str(exc)) from None
    except Interrupted:
        raise Unreadable("interrupted by shutdown") from None
    yield from unsent
