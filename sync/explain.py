"""`audience-sync explain USER_ID`: one user's membership and what each destination last accepted."""

import json
from typing import Any

import sqlalchemy as sa

from sync.audiences import is_member, load_audiences
from sync.errors import ConfigError, SourceError
from sync.sources import Sources
from sync.tables import audience_destinations, audiences, destinations, sync_rejections, sync_state


def membership(conn: sa.Connection, sources: Sources, user_id: str, timeout: float) -> dict[int, bool | str]:
    """Per audience id: whether its query (on the audience's source) returns the user now, or why that is
    not known."""
    valid, problems = load_audiences(conn)
    found: dict[int, bool | str] = dict(problems)
    for audience in valid:
        try:
            found[audience.id] = is_member(sources.engine(conn, audience), audience, user_id, timeout)
        except (ConfigError, SourceError) as exc:
            found[audience.id] = str(exc)
    return found


def explain_user(conn: sa.Connection, sources: Sources, user_id: str, timeout: float) -> list[dict[str, Any]]:
    """One entry per connection: whether it syncs, member now (the audience's query, run for this user),
    what the destination last accepted, any rejection."""
    members = membership(conn, sources, user_id, timeout)
    return [
        _entry(row, members.get(row.audience_id, "the audience is disabled")) for row in _rows(conn, user_id)
    ]


def _rows(conn: sa.Connection, user_id: str) -> list[sa.Row[Any]]:
    """Per connection: its names and kind, whether it syncs, the user's accepted state and rejection."""
    ad, s, r = audience_destinations, sync_state, sync_rejections
    rows = conn.execute(
        sa.select(
            audiences.c.id.label("audience_id"),
            audiences.c.name.label("audience"),
            destinations.c.name.label("destination"),
            destinations.c.kind,
            sa.cast(destinations.c.settings, sa.Text).label("settings_text"),
            sa.and_(*(t.c.enabled == sa.true() for t in (audiences, ad, destinations))).label("enabled"),
            s.c.member.label("accepted_member"),
            s.c.accepted_at,
            s.c.in_doubt_since,
            s.c.changes,
            s.c.reconciled,
            s.c.reconciled_reason,
            s.c.reconciled_at,
            s.c.remote_at,
            r.c.value.label("rejected_value"),
            r.c.reason.label("rejection_reason"),
            r.c.rejected_at,
        )
        .select_from(ad)
        .join(audiences, audiences.c.id == ad.c.audience_id)
        .join(destinations, destinations.c.id == ad.c.destination_id)
        .outerjoin(
            s,
            (s.c.audience_id == ad.c.audience_id)
            & (s.c.destination_id == ad.c.destination_id)
            & (s.c.user_id == user_id),
        )
        .outerjoin(
            r,
            (r.c.audience_id == ad.c.audience_id)
            & (r.c.destination_id == ad.c.destination_id)
            & (r.c.user_id == user_id),
        )
        .order_by(audiences.c.name, destinations.c.name)
    )
    return list(rows)


def _entry(row: sa.Row[Any], member: bool | str) -> dict[str, Any]:
    known = isinstance(member, bool)
    return {
        "audience": row.audience,
        "destination": row.destination,
        # a postback's 200 says the endpoint received it; Everflow may still reject the conversion
        "accepted_means": "received" if _postback(row.kind, row.settings_text) else "accepted",
        "enabled": bool(row.enabled),  # the audience, the connection and the destination
        "member": member if known else None,
        "member_unknown": None if known else member,
        "accepted": None if row.accepted_at is None else bool(row.accepted_member),
        "accepted_at": row.accepted_at,
        # a change sent without an answer: the destination may hold the other value
        "in_doubt_since": row.in_doubt_since,
        "accepted_changes": row.changes or 0,
        # what the last `reconcile` found in the destination's own records, since which reconcile
        "reconciled": None
        if row.reconciled is None
        else {
            "outcome": row.reconciled,
            "reason": row.reconciled_reason,
            "since": row.reconciled_at,
            "destination_time": row.remote_at,
        },
        "rejection": None
        if row.rejection_reason is None
        else {
            "value": bool(row.rejected_value),
            "reason": row.rejection_reason,
            "at": row.rejected_at,
        },
    }


def _postback(kind: str, settings_text: str | None) -> bool:
    """Whether a destination sends Everflow postbacks (not the Segment transport); unreadable settings: no."""
    try:
        settings = json.loads(settings_text or "{}")
    except ValueError:
        return False
    return kind == "everflow" and isinstance(settings, dict) and settings.get("transport") != "segment"
