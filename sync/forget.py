"""`audience-sync forget USER_ID`: privacy deletion at each destination, then in the state tables."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from sync.delivery import Sender
from sync.destinations import load_destination
from sync.errors import AuthError, ConfigError
from sync.messages import delete_message
from sync.models import Change, Status
from sync.tables import destination_columns, destinations, sync_rejections, sync_state

NEAR_MATCHES = 5  # ids named when none matches exactly


@dataclass
class Forgotten:
    """What `forget` did (or, in a dry run, would do) at each destination and in the state tables."""

    report: list[dict[str, Any]]  # per destination: outcome, detail (and in a dry run the request)
    removed: dict[str, int]  # rows per state table
    state_failure: str | None = None  # why the state tables could not be changed
    unknown: list[str] | None = None  # no state row holds the user: the ids that differ only in case


def forget_user(engine: sa.Engine, user_id: str, now: datetime, dry_run: bool = False) -> Forgotten:
    """Tell every destination that knows the user what it supports, then remove the user's state; in a dry
    run, say what would be sent and removed, and do neither.

    A destination whose deletion failed keeps the user's state (and affiliate id): run `forget` again. A user
    no state row holds is `unknown`: nothing is sent.
    """
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                *destination_columns(),
                sync_state.c.traits,
                sync_state.c.remote_id,
                sync_state.c.remote_code,
            )
            .join(sync_state, sync_state.c.destination_id == destinations.c.id)
            .where(sync_state.c.user_id == user_id)
            .order_by(destinations.c.name)
        ).all()
        if not rows and not _rejected(conn, user_id):  # a typo must not look like a deletion done
            return Forgotten([], {}, unknown=_near(conn, user_id))
    report: list[dict[str, Any]] = []
    failed: set[int] = set()
    for row in rows:
        if any(line["destination_id"] == row.id for line in report):  # one per destination
            continue
        outcome = _forget_at(row, user_id, now, dry_run)
        if outcome["outcome"] == "failed":
            failed.add(row.id)
        report.append({"destination": row.name, "destination_id": row.id, **outcome})
    try:
        with engine.begin() as conn:
            removed = _remove(conn, user_id, failed, dry_run)
    except sa.exc.DBAPIError as exc:  # a read-only or locked file, a read-only Postgres, a lost connection
        return Forgotten(report, {}, f"the state database failed: {exc.orig}")
    return Forgotten(report, removed)


def _rejected(conn: sa.Connection, user_id: str) -> bool:
    return (
        conn.scalar(sa.select(sync_rejections.c.user_id).where(sync_rejections.c.user_id == user_id).limit(1))
        is not None
    )


def _near(conn: sa.Connection, user_id: str) -> list[str]:
    """The user ids in the state tables that differ from `user_id` only in case."""
    held = sa.union(
        *(
            sa.select(t.c.user_id).where(sa.func.lower(t.c.user_id) == user_id.lower())
            for t in (sync_state, sync_rejections)
        )
    )
    return sorted(conn.scalars(held.limit(NEAR_MATCHES)))


def _remove(conn: sa.Connection, user_id: str, failed: set[int], dry_run: bool) -> dict[str, int]:
    """Remove (or in a dry run count) the user's rows but at the destinations that failed."""
    removed = {}
    for table in (sync_state, sync_rejections):
        where = (table.c.user_id == user_id, table.c.destination_id.not_in(failed))
        if dry_run:
            removed[table.name] = (
                conn.scalar(sa.select(sa.func.count()).select_from(table).where(*where)) or 0
            )
        else:
            removed[table.name] = conn.execute(sa.delete(table).where(*where)).rowcount
    return removed


def _forget_at(row: Any, user_id: str, now: datetime, dry_run: bool) -> dict[str, Any]:
    try:
        destination = load_destination(row, row.settings_text)
    except ConfigError as exc:
        return {"outcome": "failed", "detail": str(exc)}
    change = Change(user_id, False, row.traits, 0, row.remote_id, True, row.remote_code)
    # Segment's Refersion destination finds the affiliate of a delete by its email
    email = change.traits.get("email") if destination.kind == "refersion" else None
    call = destination.forget(change, delete_message(user_id, row.name, now, email=email))
    what = "delete message" if destination.transport else "affiliate disabled"
    if call is None:
        return {"outcome": "nothing to send", "detail": destination.no_deletion}
    if dry_run:
        # the answer to a lookup leads to the request that disables: only the first is known now
        return {
            "outcome": "would send",
            "detail": f"{what}, starting with this request",
            "request": call.describe(),
        }
    sender = Sender(destination)
    try:
        outcomes = sender.send(call)
    except AuthError as exc:
        return {"outcome": "failed", "detail": exc.reason}
    finally:
        sender.close()
    outcome = outcomes[0]
    if outcome.status == Status.ACCEPTED:
        return {"outcome": "sent", "detail": f"{what} accepted"}
    if outcome.status == Status.REJECTED and not outcome.refused:  # a lookup that found no affiliate
        return {"outcome": "nothing to send", "detail": outcome.reason}
    return {"outcome": "failed", "detail": outcome.reason or outcome.status}
