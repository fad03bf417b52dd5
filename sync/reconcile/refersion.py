"""Refersion's side of reconcile: every affiliate of the account, read from `/affiliate/list` a page at a time
into a temporary table, then each connection's settled users matched to it by affiliate code (by email for a
user whose code is not known: a baselined one) and judged against membership.

Refersion REST API v2 reference (github.com/api-evangelist/refersion, openapi/refersion-rest-api-openapi.yml,
/affiliate/list; REFERENCE.md, Refersion): `POST /affiliate/list {"limit": "100", "page": "1"}`, at most 100
a call, answers `{"total": n, "results": [{"id": <code>, "status", "email", ...}]}`: every affiliate.

Transactions: the temporary table lives on the connection given, which is committed after each page.
"""

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from sync.delivery import Sender
from sync.destinations.http import Call, error_text, read_accepting
from sync.destinations.refersion import Refersion
from sync.errors import DestinationError
from sync.ratelimit import Interrupted
from sync.reconcile.store import CONFIRMED, DRIFTED, MISSING, Finding, Unreadable, settled_pages
from sync.tables import sync_state

LIMIT = 100  # the most /affiliate/list answers a call (its reference: "Maximum 100")
ACTIVE = ("ACTIVE", "PENDING")  # a member's affiliate; DISABLED and DENIED are not active

listed = sa.Table(
    "sync_reconcile_affiliates",
    sa.MetaData(),
    sa.Column("code", sa.Text),
    sa.Column("email", sa.Text),  # lower case
    sa.Column("status", sa.Text),
    sa.Column("ours", sa.Boolean),
    sa.Index("ix_sync_reconcile_affiliates_code", "code"),
    sa.Index("ix_sync_reconcile_affiliates_email", "email"),
    prefixes=["TEMPORARY"],
)


def read_list(conn: sa.Connection, destination: Refersion, sender: Sender) -> str | None:
    """Every affiliate into the temporary table (emptied first), pages requested ahead at the destination's
    rate limit (a window of `max_in_flight`, read in order). Returns None when the list read is whole, else
    why it is not: pages are numbered, so an affiliate added or deleted meanwhile shifts the rest, and one can
    be read twice or not at all. Raises Unreadable."""
    conn.execute(sa.schema.CreateTable(listed, if_not_exists=True))
    for index in listed.indexes:
        conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))
    conn.execute(sa.delete(listed))
    conn.commit()
    count, totals = 0, set()
    for number, (page, total) in enumerate(_pages(destination, sender)):
        if page:  # an account with no affiliate answers one empty page
            conn.execute(sa.insert(listed), page)
        count += len(page)
        totals.add(total)
        if number % 20 == 19:
            conn.commit()
    conn.commit()
    codes = conn.scalar(sa.select(sa.func.count(sa.distinct(listed.c.code))))
    if totals != {count} or codes != count:
        shown = ", ".join(str(t) for t in sorted(totals, key=str))
        return f"the list changed while it was read ({count} affiliates read, {codes} codes, total {shown})"
    return None


def _pages(destination: Refersion, sender: Sender) -> Iterator[tuple[list[dict[str, Any]], int | None]]:
    """The list's pages in order, each with the total it gave: the first alone (its `total` says how many
    follow), then the rest requested ahead, at most `max_in_flight` at once, and on one by one while a last
    page comes full (the list grew meanwhile)."""
    results, total = _page(destination, sender, 1)
    yield results, total
    last = max(1, -(-total // LIMIT)) if total is not None else 1
    window = sender.limits.max_in_flight
    number, ahead = 2, deque[tuple[int, Future[tuple[list[dict[str, Any]], int | None]]]]()
    try:
        while len(results) == LIMIT or ahead:
            while len(ahead) < window and (number <= last or not ahead):
                ahead.append((number, sender.pool.submit(_page, destination, sender, number)))
                number += 1
            results, shown = ahead.popleft()[1].result()
            if results:
                yield results, shown
            if len(results) < LIMIT:
                return
    finally:  # the end, or a page that could not be read: the requests still ahead are not needed
        for _, rest in ahead:
            rest.cancel()


def _page(destination: Refersion, sender: Sender, page: int) -> tuple[list[dict[str, Any]], int | None]:
    """One page of /affiliate/list: its affiliates' code, email (lower case) and status, and `total`."""
    call = Call(
        [],
        "POST",
        f"{destination.api_base}/affiliate/list",
        read_accepting,
        headers=destination.headers,
        json={"limit": str(LIMIT), "page": str(page)},
    )
    try:
        response = sender.fetch(call)
    except DestinationError as exc:
        raise Unreadable(f"reading /affiliate/list page {page}: {exc.reason}") from None
    except Interrupted:
        raise Unreadable("interrupted by shutdown") from None
    if not response.is_success or response.status_code == 204:  # 204: an invalid field
        raise Unreadable(f"reading /affiliate/list page {page}: {sender.scrub(error_text(response))}")
    try:
        body = response.json()
    except ValueError:
        body = None
    results = body.get("results") if isinstance(body, dict) else None
    total = body.get("total") if isinstance(body, dict) else None
    if not isinstance(results, list) or not all(isinstance(r, dict) and r.get("id") for r in results):
        raise Unreadable(f"/affiliate/list page {page} answered without a list of affiliates")
    found = [
        {
            "code": str(r["id"]),
            "email": str(r.get("email") or "").lower(),
            "status": str(r.get("status") or ""),
        }
        for r in results
    ]
    return found, int(total) if isinstance(total, int | str) and str(total).isdigit() else None


def _email(conn: sa.Connection) -> sa.ColumnElement[Any]:
    """The lower-case email in a state row's traits (JSON text)."""
    if conn.dialect.name == "postgresql":
        return sa.func.lower(sa.cast(sync_state.c.traits, sa.JSON)["email"].as_string())
    return sa.func.lower(sa.func.json_extract(sync_state.c.traits, "$.email"))


def not_ours(conn: sa.Connection, destination_id: int) -> int:
    """How many listed affiliates no user of any connection to the destination has (by code, or by email for
    a user whose code is not known): this product did not create or adopt them; they are never touched."""
    state = sa.select(sync_state.c.remote_code).where(sync_state.c.destination_id == destination_id)
    conn.execute(
        sa.update(listed)
        .where(listed.c.code.in_(state.where(sync_state.c.remote_code.is_not(None))))
        .values(ours=True)
    )
    emails = sa.select(_email(conn)).where(
        sync_state.c.destination_id == destination_id, sync_state.c.remote_code.is_(None)
    )
    conn.execute(
        sa.update(listed).where(listed.c.ours.is_(None), listed.c.email.in_(emails)).values(ours=True)
    )
    return conn.scalar(sa.select(sa.func.count()).select_from(listed).where(listed.c.ours.is_(None))) or 0


def findings(
    conn: sa.Connection, ids: dict[str, int], destination: Refersion, read_at: datetime, unsure: str | None
) -> Iterator[Finding]:
    """Each settled user of the connection judged against the listed affiliate that is theirs. A user a run
    changed after the list's reading began (`read_at`) is not judged, nor, when the list read is `unsure`
    (why), is an affiliate missing from it: it may have been shifted out of the pages read."""
    by_code, by_email = listed.alias("by_code"), listed.alias("by_email")
    status = sa.func.coalesce(
        sa.select(by_code.c.status)
        .where(by_code.c.code == sync_state.c.remote_code)
        .limit(1)
        .scalar_subquery(),
        sa.select(by_email.c.status)
        .where(sync_state.c.remote_code.is_(None), by_email.c.email == _email(conn))
        .limit(1)
        .scalar_subquery(),
    )
    columns = (
        sync_state.c.member,
        sync_state.c.remote_active,
        sync_state.c.remote_code,
        sync_state.c.accepted_at,
        status.label("status"),
        sa.select(sa.func.count())
        .where(sync_state.c.remote_code.is_(None), by_email.c.email == _email(conn))
        .scalar_subquery()
        .label("by_email"),
    )
    for page in settled_pages(conn, ids, *columns):
        for row in page:
            found = judge(row.user_id, row.member, row.remote_active, row.status, destination)
            if found.repair and row.remote_code is None:  # matched by email: a baselined user
                # a run knows no affiliate code to act on: it would create one, and adopt the one there
                found = Finding(
                    row.user_id,
                    found.outcome,
                    f"{found.reason}; not repaired: audience-sync knows this affiliate by email only (it was "
                    "there before the first sync): change it in Refersion",
                )
            if row.by_email > 1:  # which one is theirs? none is judged
                yield Finding(row.user_id, None, f"{row.by_email} affiliates in Refersion have this email")
            elif row.accepted_at >= read_at:
                yield Finding(row.user_id, None, "changed by a run while the list was read: judged next time")
            elif found.outcome == MISSING and unsure:
                yield Finding(row.user_id, None, f"not in the list read, but {unsure}: reconcile again")
            else:
                yield found


def judge(
    user_id: str, member: bool, remote_active: bool, status: str | None, destination: Refersion
) -> Finding:
    """A member's affiliate is ACTIVE or PENDING (DISABLED or DENIED when this product left it so); a
    leaver's, with on_exit disable, is DISABLED or DENIED (or gone); with on_exit ignore, anything."""
    if status is None:
        if not member:
            return Finding(user_id, CONFIRMED, "no affiliate in Refersion: nothing to disable")
        gone = "no such affiliate in Refersion (deleted by hand?)"
        return Finding(user_id, MISSING, gone, repair="re-create the affiliate")
    if member and status not in ACTIVE and remote_active:
        by_hand = f"{status.lower()} by hand in Refersion"
        if destination.status != "ACTIVE" and destination.on_reentry == "ignore":
            kept = "; not repaired: with status PENDING and on_reentry ignore a run leaves it disabled"
            return Finding(user_id, DRIFTED, by_hand + kept + " (set on_reentry activate)")
        return Finding(user_id, DRIFTED, by_hand, repair="re-activate the affiliate")
    if not member and destination.on_exit == "disable" and status in ACTIVE:
        left = f"{status} in Refersion although the user left (on_exit disable)"
        return Finding(user_id, DRIFTED, left, repair="disable the affiliate")
    ignored = not member and status in ACTIVE
    return Finding(user_id, CONFIRMED, f"{status} in Refersion" + (" (on_exit ignore)" if ignored else ""))
