"""`audience-sync forget USER_ID`: privacy deletion at each destination, then in the state tables."""

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from sync.delivery import Sender
from sync.destinations import load_destination
from sync.errors import AuthError, ConfigError
from sync.messages import delete_message
from sync.models import Change, Status
from sync.tables import destination_columns, destinations, sync_rejections, sync_state


def forget_user(engine: sa.Engine, user_id: str, now: datetime) -> tuple[list[dict[str, Any]], str | None]:
    """Tell every destination that knows the user what it supports, then remove the user's state.

    Returns each destination's outcome, and why the state tables could not be changed (None if they were).
    A destination whose deletion failed keeps the user's state (and affiliate id): run `forget` again.
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
    report: list[dict[str, Any]] = []
    done: set[int] = set()
    failed: set[int] = set()
    for row in rows:
        if row.id in done | failed:
            continue
        outcome = _forget_at(row, user_id, now)
        (failed if outcome["outcome"] == "failed" else done).add(row.id)
        report.append({"destination": row.name, **outcome})
    try:
        with engine.begin() as conn:
            for table in (sync_state, sync_rejections):
                conn.execute(
                    sa.delete(table).where(table.c.user_id == user_id, table.c.destination_id.not_in(failed))
                )
    except sa.exc.DBAPIError as exc:  # a read-only or locked file, a read-only Postgres, a lost connection
        return report, f"the state database failed: {exc.orig}"
    return report, None


def _forget_at(row: Any, user_id: str, now: datetime) -> dict[str, Any]:
    try:
        destination = load_destination(row, row.settings_text)
    except ConfigError as exc:
        return {"outcome": "failed", "detail": str(exc)}
    change = Change(user_id, False, row.traits, 0, row.remote_id, True, row.remote_code)
    # Segment's Refersion destination finds the affiliate of a delete by its email
    email = change.traits.get("email") if destination.kind == "refersion" else None
    call = destination.forget(change, delete_message(user_id, row.name, now, email=email))
    if call is None:
        return {
            "outcome": "nothing to send",
            "detail": f"{destination.kind} supports no deletion"
            + ("" if destination.kind != "refersion" else " for a user without a known affiliate or email"),
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
        what = "delete message" if destination.transport else "affiliate disabled"
        return {"outcome": "sent", "detail": f"{what} accepted"}
    return {"outcome": "failed", "detail": outcome.reason or outcome.status}
