"""What reconcile reads of the state and keeps in it: the users to check, each one's outcome, the repairs it
queues (by marking users in doubt), and the record of each reconcile (`sync_reconcile_runs`).

Transactions: each function takes a Connection and never commits; the caller does.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from sync.tables import sync_reconcile_runs, sync_state

PAGE = 2_000  # state rows read at a time: memory stays flat however many users a connection has
CONFIRMED, DRIFTED, MISSING, REJECTED, NOT_FOUND = "confirmed", "drifted", "missing", "rejected", "not_found"
OUTCOMES = (CONFIRMED, DRIFTED, MISSING, REJECTED, NOT_FOUND)
REPAIRABLE = (DRIFTED, MISSING, NOT_FOUND)  # a rejection is the destination's word: never sent again


class Unreadable(Exception):
    """The destination's records could not be read to their end: str() says why, for the operator."""


@dataclass(frozen=True)
class Finding:
    """What reconcile found of one user: an outcome of OUTCOMES, or None when it cannot tell yet (a
    conversion inside Everflow's grace period, a user without a transaction id), and why."""

    user_id: str
    outcome: str | None
    reason: str | None = None
    remote_at: datetime | None = None  # the destination's own time of its record (Everflow's conversion)
    repair: str | None = None  # what a repair does, when the outcome has one (shown with the reason)


def _connection(ids: dict[str, int]) -> sa.ColumnElement[bool]:
    return sa.and_(
        sync_state.c.audience_id == ids["audience_id"], sync_state.c.destination_id == ids["destination_id"]
    )


# what reconcile checks: a change the destination accepted (not one sent without an answer: the next run
# settles it first)
SETTLED = sa.and_(sync_state.c.accepted_at.is_not(None), sync_state.c.in_doubt_since.is_(None))


def settled_pages(
    conn: sa.Connection, ids: dict[str, int], *columns: sa.ColumnElement[Any], by_time: bool = False
) -> Iterator[list[Any]]:
    """The connection's settled users, `columns` of each (user_id first), a keyset page at a time; each page's
    transaction is ended before it is handed out, so nothing holds a snapshot between pages. `by_time`: in
    the order of `accepted_at` (then user_id), as Everflow's report is read window by window of sends."""
    order = (sync_state.c.accepted_at, sync_state.c.user_id) if by_time else (sync_state.c.user_id,)
    read = [sync_state.c.user_id, *columns]
    read += [c for c in order if not any(c is r for r in read)]  # the keyset's columns, read once
    after: tuple[Any, ...] | None = None
    while True:
        query = sa.select(*read).where(_connection(ids), SETTLED)
        if after is not None:
            last = (sa.literal(value, column.type) for column, value in zip(order, after, strict=True))
            query = query.where(sa.tuple_(*order) > sa.tuple_(*last))
        page = list(conn.execute(query.order_by(*order).limit(PAGE)))
        conn.rollback()
        if page:
            yield page
        if len(page) < PAGE:
            return
        after = tuple(getattr(page[-1], column.name) for column in order)


def record_findings(
    conn: sa.Connection, ids: dict[str, int], findings: Iterable[Finding], now: datetime
) -> None:
    """Keep each user's outcome; `reconciled_at` stays the time of the first reconcile that found it."""
    rows = [
        {
            "u": f.user_id,
            "outcome": f.outcome,
            "reason": f.reason,
            "remote_at": f.remote_at,
            "now": now,
        }
        for f in findings
    ]
    if not rows:
        return
    same = sync_state.c.reconciled == sa.bindparam("outcome")
    conn.execute(
        sa.update(sync_state)
        .where(_connection(ids), sync_state.c.user_id == sa.bindparam("u"))
        .values(
            reconciled=sa.bindparam("outcome"),
            reconciled_reason=sa.bindparam("reason"),
            remote_at=sa.bindparam("remote_at"),
            reconciled_at=sa.case(
                (sa.bindparam("outcome").is_(None), None),
                (same, sa.func.coalesce(sync_state.c.reconciled_at, sa.bindparam("now"))),
                else_=sa.bindparam("now"),
            ),
        ),
        rows,
    )


def settled_count(conn: sa.Connection, ids: dict[str, int]) -> int:
    """How many users of the connection reconcile checks (the share a repair may touch is of these)."""
    return conn.scalar(sa.select(sa.func.count()).where(_connection(ids), SETTLED)) or 0


def queue_repairs(
    conn: sa.Connection, ids: dict[str, int], found: Iterable[str], forget_ids: Iterable[str], now: datetime
) -> None:
    """Mark the `found` users in doubt: the destination may not hold what the state says, so the next run
    sends whichever change membership calls for, looked up first as for any change in doubt. `forget_ids`:
    users whose affiliate is gone, whose ids are forgotten too, so that the entry creates one again."""
    # the ids first: once in doubt, a user is not settled
    for users, values in ((forget_ids, {"remote_id": None, "remote_code": None}), (found, {})):
        chosen = list(users)
        for start in range(0, len(chosen), 500):
            conn.execute(
                sa.update(sync_state)
                .where(
                    _connection(ids),
                    SETTLED,
                    sync_state.c.reconciled.in_(REPAIRABLE),  # no run changed the user since
                    sync_state.c.user_id.in_(chosen[start : start + 500]),
                )
                .values(in_doubt_since=now, **values)
            )


def record_run(conn: sa.Connection, row: dict[str, Any]) -> None:
    conn.execute(sa.insert(sync_reconcile_runs), row)
