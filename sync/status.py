"""`audience-sync status`: every connection's members, accepted state, last run and next run."""

from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from sync.connections import missing_destination
from sync.settings import Cadence, Settings
from sync.tables import sync_runs

# `enabled = true`: as the runner reads it (on SQLite a shell may have written 'false' or 'yes')
CONNECTIONS = sa.text("""
    SELECT a.id AS audience_id, a.name AS audience, a.schedule, a.enabled = true AS audience_enabled,
           ad.destination_id, d.name AS destination, d.enabled = true AS destination_enabled,
           ad.enabled = true AS connection_enabled,
           (SELECT count(*) FROM sync_state s
            WHERE s.audience_id = a.id AND s.destination_id = ad.destination_id AND s.member = true)
           AS accepted_members,
           (SELECT count(*) FROM sync_rejections r
            WHERE r.audience_id = a.id AND r.destination_id = ad.destination_id) AS rejected_users,
           c.initial_completed_at
    FROM audience_destinations ad
    JOIN audiences a ON a.id = ad.audience_id
    LEFT JOIN destinations d ON d.id = ad.destination_id
    LEFT JOIN sync_connections c ON c.audience_id = a.id AND c.destination_id = ad.destination_id
    ORDER BY a.name, d.name
""")

LATEST_RUN_IDS = sa.select(sa.func.max(sync_runs.c.id)).group_by(
    sync_runs.c.audience_id, sync_runs.c.destination_id
)


def connection_status(conn: sa.Connection, settings: Settings) -> list[dict[str, Any]]:
    """One dict per connection (and per audience whose last run had no connection to speak of)."""
    latest = conn.execute(sa.select(sync_runs).where(sync_runs.c.id.in_(LATEST_RUN_IDS)))
    last = {(r.audience_id, r.destination_id): r._asdict() for r in latest}
    rows = []
    for row in conn.execute(CONNECTIONS):
        # the connection's own last run, or a later one that failed the whole audience (an invalid row)
        runs = [
            r
            for r in (last.get((row.audience_id, row.destination_id)), last.get((row.audience_id, None)))
            if r
        ]
        run = max(runs, key=lambda r: r["id"]) if runs else None
        own_run = last.get((row.audience_id, row.destination_id))
        started = run and run["started_at"]
        next_run = None
        if started and row.audience_enabled:
            cadence = _cadence(row.schedule, settings)
            next_run = f"{started + timedelta(seconds=cadence.low):%Y-%m-%d %H:%M}"
            if cadence.high != cadence.low:
                next_run += f" to {started + timedelta(seconds=cadence.high):%H:%M}"
        rows.append(
            {
                "audience": str(row.audience),  # str(): a name of other data (bytes on SQLite) is shown
                "destination": row.destination or f"id {row.destination_id} (missing)",
                # a missing destination is not a disabled one: last_error says what it is
                "enabled": bool(
                    row.audience_enabled
                    and row.connection_enabled
                    and (row.destination is None or row.destination_enabled)
                ),
                "members": own_run and own_run["members"],  # as of its last run
                "accepted_members": row.accepted_members,
                "rejected_users": row.rejected_users,
                "initial_sync_completed": row.initial_completed_at is not None,
                "last_run": None
                if run is None
                else {
                    k: run[k]
                    for k in (
                        "started_at",
                        "finished_at",
                        "outcome",
                        "entered",
                        "exited",
                        "accepted",
                        "rejected",
                        "skipped",
                        "failed",
                        "pending",
                        "null_user_ids",
                        "duplicate_user_ids",
                        "long_user_ids",
                    )
                },
                "next_run": next_run,
                "last_error": (run and run["error"])
                if row.destination is not None
                else missing_destination(row.audience, row.destination_id),
            }
        )
    return rows


def _cadence(schedule: str | None, settings: Settings) -> Cadence:
    try:
        return Cadence.parse(schedule, "schedule") if schedule else settings.interval
    except Exception:
        return settings.interval
