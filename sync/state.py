"""Sync state in the state database: what each destination accepted or rejected, and run history.

Transactions: each function takes a Connection and never commits; the caller does.
"""

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from sync.models import Change, Outcome, Status
from sync.tables import (
    audiences,
    sync_connections,
    sync_rejections,
    sync_runs,
    sync_stage,
    sync_state,
    upsertable_insert,
)


def _upsert(
    conn: sa.Connection,
    table: sa.Table,
    rows: list[dict[str, Any]],
    update: Iterable[str],
    keep: Iterable[str] = (),
) -> None:
    """Insert `rows`; a row already there takes their `update` columns, and their `keep` columns where it
    holds NULL."""
    if not rows:
        return
    statement = upsertable_insert(conn, table)
    keys = [c.name for c in table.primary_key.columns]
    set_ = {c: statement.excluded[c] for c in update}
    set_ |= {c: sa.func.coalesce(table.c[c], statement.excluded[c]) for c in keep}
    conn.execute(statement.on_conflict_do_update(index_elements=keys, set_=set_), rows)


def record(
    conn: sa.Connection, audience_id: int, destination_id: int, outcomes: list[Outcome], now: datetime
) -> None:
    """Advance the state for accepted and skipped changes, and log rejections; failed ones stay pending,
    marked in doubt when a request carrying them went unanswered."""
    ids = {"audience_id": audience_id, "destination_id": destination_id}
    states: list[dict[str, Any]] = []
    rejections: list[dict[str, Any]] = []
    doubts: list[dict[str, Any]] = []
    for outcome in outcomes:
        change = outcome.change
        if outcome.status == Status.FAILED or (outcome.status == Status.REJECTED and change.value):
            if outcome.status == Status.REJECTED:
                rejections.append(_rejection(ids, outcome, now))
            if change.in_doubt:
                doubts.append(_doubt(ids, change, now))
            continue
        states.append(
            {
                **ids,
                "user_id": change.user_id,
                "member": change.value and outcome.status != Status.REJECTED,
                "traits": change.traits_text,
                "changes": change.settled_before + 1,
                "remote_id": outcome.remote_id or change.remote_id,
                "remote_code": outcome.remote_code or change.remote_code,
                "remote_active": change.remote_active
                if outcome.remote_active is None
                else outcome.remote_active,
                "accepted_at": now,
                "in_doubt_since": None,
                **UNVERIFIED,
            }
        )
        if outcome.status == Status.REJECTED:
            rejections.append(_rejection(ids, outcome, now))
    _upsert(
        conn,
        sync_state,
        states,
        (
            "member",
            "traits",
            "changes",
            "remote_id",
            "remote_code",
            "remote_active",
            "accepted_at",
            "in_doubt_since",
            *UNVERIFIED,
        ),
    )
    # a row there keeps what was accepted, and the time its doubt began
    _upsert(conn, sync_state, doubts, ("traits",), keep=("in_doubt_since",))
    accepted_entries = [
        o.change.user_id for o in outcomes if o.change.value and o.status in (Status.ACCEPTED, Status.SKIPPED)
    ]
    if accepted_entries:
        conn.execute(
            sa.delete(sync_rejections).where(
                sync_rejections.c.audience_id == audience_id,
                sync_rejections.c.destination_id == destination_id,
                sync_rejections.c.user_id.in_(accepted_entries),
            )
        )
    _upsert(conn, sync_rejections, rejections, ("value", "traits", "reason", "rejected_at"))


# what a reconcile found of a user is of the change before: the one just accepted is not verified yet
UNVERIFIED = dict.fromkeys(("reconciled", "reconciled_reason", "reconciled_at", "remote_at"))


def _doubt(ids: dict[str, int], change: Change, now: datetime) -> dict[str, Any]:
    """A state row for a change that may have arrived: membership as last accepted (none for a first entry),
    the traits it carried (an exit needs them), the same change count (its re-send keeps its messageId)."""
    return {
        **ids,
        "user_id": change.user_id,
        "member": not change.value,
        "traits": change.traits_text,
        "changes": change.settled_before,
        "remote_id": change.remote_id,
        "remote_code": change.remote_code,
        "remote_active": change.remote_active,
        "accepted_at": None,
        "in_doubt_since": now,
    }


def _rejection(ids: dict[str, int], outcome: Outcome, now: datetime) -> dict[str, Any]:
    return {
        **ids,
        "user_id": outcome.change.user_id,
        "value": outcome.change.value,
        "traits": outcome.change.traits_text,
        "reason": outcome.reason or "rejected",
        "rejected_at": now,
    }


def synced_key(conn: sa.Connection, audience_id: int, destination_id: int) -> str | None:
    """The key a connection was synced under, if it ever was."""
    return conn.scalar(
        sa.select(sync_connections.c.key).where(
            sync_connections.c.audience_id == audience_id, sync_connections.c.destination_id == destination_id
        )
    )


def never_synced(conn: sa.Connection, audience_id: int, destination_id: int) -> bool:
    """Whether a connection has never begun a sync: no key recorded for it and no state of its users."""
    return not any(
        conn.scalar(
            sa.select(
                sa.exists().where(
                    table.c.audience_id == audience_id, table.c.destination_id == destination_id
                )
            )
        )
        for table in (sync_connections, sync_state)
    )


def initial_completed(conn: sa.Connection, audience_id: int, destination_id: int) -> bool:
    return (
        conn.scalar(
            sa.select(sync_connections.c.initial_completed_at).where(
                sync_connections.c.audience_id == audience_id,
                sync_connections.c.destination_id == destination_id,
            )
        )
        is not None
    )


def begin_connection(conn: sa.Connection, audience_id: int, destination_id: int, key: str) -> None:
    """Remember the key a connection syncs under (from its first run on, it may not change)."""
    row = {"audience_id": audience_id, "destination_id": destination_id, "key": key}
    conn.execute(upsertable_insert(conn, sync_connections).on_conflict_do_nothing(), row)


def complete_initial(conn: sa.Connection, audience_id: int, destination_id: int, now: datetime) -> None:
    conn.execute(
        sa.update(sync_connections)
        .where(
            sync_connections.c.audience_id == audience_id,
            sync_connections.c.destination_id == destination_id,
            sync_connections.c.initial_completed_at.is_(None),
        )
        .values(initial_completed_at=now)
    )


def forget_connection(conn: sa.Connection, audience_id: int, destination_id: int) -> None:
    """For `initial --resend`: mark every staged member as not accepted, so every member is sent again.

    On the connection holding the staged members. Accepted members who left stay accepted: their exits
    are still to send. The rows stay: their change counts keep later messageIds new, and Refersion
    affiliate ids stay known.
    """
    where = (sync_state.c.audience_id == audience_id, sync_state.c.destination_id == destination_id)
    staged = sa.select(sync_stage.c.user_id)
    conn.execute(sa.update(sync_state).where(*where, sync_state.c.user_id.in_(staged)).values(member=False))
    for table in (sync_rejections, sync_connections):
        conn.execute(
            sa.delete(table).where(
                table.c.audience_id == audience_id, table.c.destination_id == destination_id
            )
        )


def record_run(conn: sa.Connection, run: dict[str, Any]) -> None:
    conn.execute(sa.insert(sync_runs), run)


def last_run_times(conn: sa.Connection) -> dict[int, datetime]:
    """When each audience last started a run (the daemon resumes its cadence from there).

    An `invalid` row is no run: nothing was staged or sent, so an audience whose row is fixed runs at the
    next cycle, not a cadence after the problem was recorded. A `failed` row is a run that started (its
    query or a destination failed), and the cadence counts from it as from any other."""
    last_start = (  # per audience, an index lookup; a GROUP BY would read the whole history each reload
        sa.select(sa.func.max(sync_runs.c.started_at))
        .where(sync_runs.c.audience_id == audiences.c.id, sync_runs.c.outcome != "invalid")
        .scalar_subquery()
    )
    rows = conn.execute(sa.select(audiences.c.id, last_start)).all()
    return {audience_id: started for audience_id, started in rows if started is not None}
