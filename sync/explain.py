"""`audience-sync explain USER_ID`: one user's membership and what each destination last accepted."""

from typing import Any

import sqlalchemy as sa

from sync.tables import (
    audience_destinations,
    audiences,
    destinations,
    sync_members,
    sync_rejections,
    sync_state,
)


def explain_user(conn: sa.Connection, user_id: str) -> list[dict[str, Any]]:
    """One entry per connection: member as of the audience's last evaluation, accepted value, rejection."""
    ad, s, r, m = audience_destinations, sync_state, sync_rejections, sync_members
    rows = conn.execute(
        sa.select(
            audiences.c.name.label("audience"),
            destinations.c.name.label("destination"),
            m.c.user_id.is_not(None).label("member"),
            s.c.member.label("accepted_member"),
            s.c.accepted_at,
            s.c.changes,
            r.c.value.label("rejected_value"),
            r.c.reason.label("rejection_reason"),
            r.c.rejected_at,
        )
        .select_from(ad)
        .join(audiences, audiences.c.id == ad.c.audience_id)
        .join(destinations, destinations.c.id == ad.c.destination_id)
        .outerjoin(m, (m.c.audience_id == ad.c.audience_id) & (m.c.user_id == user_id))
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
    return [
        {
            "audience": row.audience,
            "destination": row.destination,
            "member": bool(row.member),
            "accepted": None if row.accepted_member is None else bool(row.accepted_member),
            "accepted_at": row.accepted_at,
            "accepted_changes": row.changes or 0,
            "rejection": None
            if row.rejection_reason is None
            else {"value": bool(row.rejected_value), "reason": row.rejection_reason, "at": row.rejected_at},
        }
        for row in rows
    ]
