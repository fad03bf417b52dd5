"""`audience-sync status`: every connection's state, members, accepted state, last run and next run."""

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from sync import leases, state
from sync.audiences import load_audiences
from sync.connections import missing_destination
from sync.settings import Cadence, Settings
from sync.tables import sync_runs, sync_state

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
# what `last_run` shows of a run: all but the keys, members (shown per connection) and error (last_error)
RUN_FIELDS = [
    c.name for c in sync_runs.c if c.name not in ("id", "audience_id", "destination_id", "members", "error")
]
# the last run's outcomes that make `status` exit 1: someone should look
ATTENTION = ("failed", "held", "invalid", "interrupted", "rejected")


def connection_status(conn: sa.Connection, settings: Settings) -> list[dict[str, Any]]:
    """One dict per connection: its state, counts, last run (and the audience's later run that failed it as
    a whole), and the window of its next run on the daemon's cadence."""
    latest = conn.execute(sa.select(sync_runs).where(sync_runs.c.id.in_(LATEST_RUN_IDS)))
    last = {(r.audience_id, r.destination_id): r._asdict() for r in latest}
    starts = state.last_run_times(conn)
    running = leases.holders(conn)
    _, invalid = load_audiences(conn)  # rows no run has met yet are invalid too, and no daemon runs them
    verified = _reconciled(conn)
    rows = []
    for row in conn.execute(CONNECTIONS):
        own_run = last.get((row.audience_id, row.destination_id))
        # the connection's own last run, or a later one that failed the whole audience (an invalid row)
        runs = [r for r in (own_run, last.get((row.audience_id, None))) if r]
        run = max(runs, key=lambda r: r["id"]) if runs else None
        entry = _entry(row, run, own_run)
        entry["running_on"] = running.get(row.audience_id) if entry["enabled"] else None
        problem = invalid.get(row.audience_id)
        entry["state"] = _state(entry, invalid=row.destination is None or problem is not None)
        entry["last_error"] = problem or entry["last_error"]
        last_start = None if problem or not entry["enabled"] else starts.get(row.audience_id)
        earliest, latest_ = _next_run(row.schedule, last_start, settings)
        entry["reconciled"] = verified.get((row.audience_id, row.destination_id), dict.fromkeys(VERIFIED, 0))
        rows.append({**entry, "next_run_earliest": earliest, "next_run_latest": latest_})
    return rows


VERIFIED = ("confirmed", "drifted", "unverified")


def _reconciled(conn: sa.Connection) -> dict[tuple[int, int], dict[str, int]]:
    """Per connection, its accepted users by what the last reconcile found: confirmed, drifted (anything
    else it found: drifted, missing, rejected, not found) and unverified (not reconciled since accepted)."""
    s = sync_state.c
    verdict = sa.case(
        (s.reconciled.is_(None), "unverified"), (s.reconciled == "confirmed", "confirmed"), else_="drifted"
    )
    query = (
        sa.select(s.audience_id, s.destination_id, verdict.label("verdict"), sa.func.count())
        .where(s.accepted_at.is_not(None))
        .group_by(s.audience_id, s.destination_id, verdict)
    )
    found: dict[tuple[int, int], dict[str, int]] = {}
    for audience_id, destination_id, name, count in conn.execute(query):
        found.setdefault((audience_id, destination_id), dict.fromkeys(VERIFIED, 0))[name] = count
    return found


def _entry(row: sa.Row[Any], run: dict[str, Any] | None, own_run: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "audience_id": row.audience_id,
        "audience": str(row.audience),  # str(): a name of other data (bytes on SQLite) is shown
        "destination_id": row.destination_id,
        "destination": row.destination or f"id {row.destination_id} (missing)",
        # a missing destination is not a disabled one: it is invalid, and last_error says why
        "enabled": bool(
            row.audience_enabled
            and row.connection_enabled
            and (row.destination is None or row.destination_enabled)
        ),
        "members": own_run and own_run["members"],  # as of its last run
        "accepted_members": row.accepted_members,
        "rejected_users": row.rejected_users,
        "initial_sync_completed": row.initial_completed_at is not None,
        "last_run": None if run is None else {k: run[k] for k in RUN_FIELDS},
        "last_error": (run and run["error"])
        if row.destination is not None
        else missing_destination(row.audience, row.destination_id),
    }


def _state(entry: dict[str, Any], invalid: bool) -> str:
    """disabled, running, invalid, held, failed, interrupted, busy, ok, or never run."""
    run = entry["last_run"]
    if not entry["enabled"]:
        return "disabled"
    if entry["running_on"]:
        return "running"
    if invalid:  # a missing destination, or an audience row the daemon does not run
        return "invalid"
    return str(run["outcome"]) if run else "never run"


def needs_attention(entry: dict[str, Any]) -> bool:
    """An enabled connection whose last run failed, was held, invalid, interrupted or rejected most of its
    changes (`status` exits 1)."""
    if not entry["enabled"]:
        return False
    run = entry["last_run"]
    return entry["state"] == "invalid" or (run is not None and run["outcome"] in ATTENTION)


def _next_run(
    schedule: str | None, last_start: datetime | None, settings: Settings
) -> tuple[datetime | None, datetime | None]:
    """When the daemon runs the audience next: its cadence (a range) after the audience's last start.
    None: at once when a daemon runs (never run), or never (the audience, the connection or the
    destination disabled, or an invalid row: no last start)."""
    if last_start is None:
        return None, None
    cadence = _cadence(schedule, settings)
    return last_start + timedelta(seconds=cadence.low), last_start + timedelta(seconds=cadence.high)


def _cadence(schedule: str | None, settings: Settings) -> Cadence:
    try:
        return Cadence.parse(schedule, "schedule") if schedule else settings.interval
    except Exception:
        return settings.interval
