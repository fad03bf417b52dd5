"""What the daemon reads for its metrics (connections, the last runs, accepted members) and the pruning of
old run history (`sync_runs`).

Transactions: each function takes a Connection and never commits (the caller does), except `prune`, which
takes the engine and commits each audience's deletions in a transaction of their own.
"""

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from sync.audiences import derive_key
from sync.tables import (
    UTCDateTime,
    audience_destinations,
    audiences,
    destinations,
    sync_reconcile_runs,
    sync_runs,
    sync_state,
)


def connections(conn: sa.Connection) -> list[sa.Row[Any]]:
    """Every enabled connection to an enabled destination: audience_id, destination_id, destination."""
    ad = audience_destinations
    return list(
        conn.execute(
            sa.select(ad.c.audience_id, ad.c.destination_id, destinations.c.name.label("destination"))
            .join(destinations, destinations.c.id == ad.c.destination_id)
            .where(ad.c.enabled == sa.true(), destinations.c.enabled == sa.true())
        )
    )


def last_runs(conn: sa.Connection) -> list[sa.Row[Any]]:
    """Each connection's last run, with the end of its last ok run (`last_success`), and each audience's
    last run as a whole (`destination_id` None)."""
    latest = sa.select(sa.func.max(sync_runs.c.id)).group_by(
        sync_runs.c.audience_id, sync_runs.c.destination_id
    )
    ok = sync_runs.alias("ok")
    last_ok = (
        sa.select(sa.func.max(ok.c.finished_at))
        .where(
            ok.c.audience_id == sync_runs.c.audience_id,
            ok.c.destination_id == sync_runs.c.destination_id,
            ok.c.outcome == "ok",
        )
        .scalar_subquery()
    )
    return list(
        conn.execute(
            sa.select(
                sync_runs.c.id,
                sync_runs.c.audience_id,
                sync_runs.c.destination_id,
                sync_runs.c.outcome,
                sync_runs.c.started_at,
                sync_runs.c.finished_at,
                sync_runs.c.members,
                sync_runs.c.pending,
                sync_runs.c.rejected,
                sa.type_coerce(last_ok, UTCDateTime).label("last_success"),
            ).where(sync_runs.c.id.in_(latest))
        )
    )


def invalid_audiences(conn: sa.Connection, problems: dict[int, str], taken: set[str]) -> list[Any]:
    """The audiences whose rows are invalid (ids in `problems`) as `(id, key, name)`, for their connections'
    series: the stored key, else the one derived from the name. One whose key is `taken` (a valid
    audience's) or is no text is left out: it must not take over another audience's series."""
    rows = conn.execute(
        sa.select(audiences.c.id, audiences.c.key, audiences.c.name)
        .where(audiences.c.id.in_(problems))
        .order_by(audiences.c.id)
    )
    found = []
    for audience_id, stored, name in rows:
        key = derive_key(name) if stored is None and isinstance(name, str) else stored
        if isinstance(key, str) and key not in taken:
            found.append((audience_id, key, str(name)))
            taken = taken | {key}
    return found


def last_reconcile(conn: sa.Connection) -> datetime | None:
    """When the last reconcile began, if one ever did."""
    started: datetime | None = conn.scalar(sa.select(sa.func.max(sync_reconcile_runs.c.started_at)))
    return started


def last_reconciles(conn: sa.Connection) -> list[sa.Row[Any]]:
    """Each connection's last reconcile that could read the destination, then (where it could not) its last
    one: what the reconcile gauges showed before the daemon stopped."""
    runs = sync_reconcile_runs
    connection = (runs.c.audience_id, runs.c.destination_id)
    readable = (
        sa.select(sa.func.max(runs.c.id)).where(runs.c.outcome != "cannot verify").group_by(*connection)
    )
    latest = sa.select(sa.func.max(runs.c.id)).group_by(*connection)
    return list(
        conn.execute(
            sa.select(runs)
            .where(runs.c.id.in_(readable) | (runs.c.id.in_(latest) & (runs.c.outcome == "cannot verify")))
            .order_by(runs.c.id)
        )
    )


def accepted_members(conn: sa.Connection, audience_id: int | None = None) -> dict[tuple[int, int], int]:
    """Accepted members by (audience id, destination id), of one audience or of all."""
    query = (
        sa.select(sync_state.c.audience_id, sync_state.c.destination_id, sa.func.count())
        .where(sync_state.c.member == sa.true())
        .group_by(sync_state.c.audience_id, sync_state.c.destination_id)
    )
    if audience_id is not None:
        query = query.where(sync_state.c.audience_id == audience_id)
    return {(a, d): n for a, d, n in conn.execute(query)}


def prune(engine: sa.Engine, before: datetime) -> int:
    """Delete the runs started before `before`, audience by audience, keeping each connection's last run
    and last ok run (and each audience's last audience-level row); returns how many were deleted."""
    with engine.connect() as conn:
        audience_ids = list(conn.scalars(sa.select(audiences.c.id)))
    deleted = 0
    for (
        audience_id
    ) in audience_ids:  # short transactions, each read through the (audience_id, started_at) index
        with engine.begin() as conn:
            deleted += _prune_audience(conn, audience_id, before)
    return deleted


def _prune_audience(conn: sa.Connection, audience_id: int, before: datetime) -> int:
    runs = sync_runs.c
    mine = runs.audience_id == audience_id
    last = sa.select(sa.func.max(runs.id)).where(mine).group_by(runs.destination_id)
    last_ok = sa.select(sa.func.max(runs.id)).where(mine, runs.outcome == "ok").group_by(runs.destination_id)
    deleted = conn.execute(
        sa.delete(sync_runs).where(mine, runs.started_at < before, runs.id.not_in(sa.union(last, last_ok)))
    )
    reconciles = sync_reconcile_runs.c
    ours = reconciles.audience_id == audience_id
    last_reconcile = sa.select(sa.func.max(reconciles.id)).where(ours).group_by(reconciles.destination_id)
    old = conn.execute(
        sa.delete(sync_reconcile_runs).where(
            ours, reconciles.started_at < before, reconciles.id.not_in(last_reconcile)
        )
    )
    return deleted.rowcount + old.rowcount
