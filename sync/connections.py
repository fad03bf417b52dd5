"""Connections: the `audience_destinations` rows of an audience, validated with their destinations into
`Link`s (an audience linked to a destination, with its settings)."""

import dataclasses
import hashlib
import shlex
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from sync import state
from sync.audiences import Audience
from sync.destinations import json_object, load_destination
from sync.destinations.base import Destination
from sync.errors import ConfigError, Problems
from sync.models import Change
from sync.tables import audience_destinations, destination_columns, destinations

TYPES = ("identify", "track")
SETTINGS = {"type", "entered_event", "exited_event"}


@dataclass(frozen=True)
class Link:
    """An audience linked to a destination, with its validated `audience_destinations.settings`."""

    audience_id: int
    audience_key: str
    destination_id: int
    destination_name: str
    type: str = "identify"
    entered_event: str = "Audience Entered"
    exited_event: str = "Audience Exited"

    @classmethod
    def from_settings(cls, settings: dict[str, Any], where: str, **ids: Any) -> "Link":
        """Validate `audience_destinations.settings`; raises one ConfigError carrying each wrong field."""
        problems = Problems()
        unknown = set(settings) - SETTINGS
        if unknown:
            problems.add(f"{where}: settings has unknown field(s) {', '.join(sorted(unknown))}")
        link = cls(**ids, **{name: value for name, value in settings.items() if name in SETTINGS})
        if link.type not in TYPES:
            problems.add(f"{where}: settings.type must be 'identify' or 'track', not {link.type!r}")
        for name in ("entered_event", "exited_event"):
            if not isinstance(getattr(link, name), str) or not getattr(link, name):
                problems.add(f"{where}: settings.{name} must be a non-empty text")
        problems.raise_any()
        return link

    def event(self, value: bool) -> str:
        return self.entered_event if value else self.exited_event

    def message_id(self, change: Change) -> str:
        """Stable for the same change: every re-send carries it, a later re-entry gets a new one."""
        ids = f"{self.audience_id}:{self.destination_id}:{change.user_id}"
        seed = f"{ids}:{change.value}:{change.settled_before}"
        return "as-" + hashlib.sha256(seed.encode()).hexdigest()[:40]


def connection_rows(conn: sa.Connection, audience_id: int) -> list[sa.Row[Any]]:
    """The enabled connections of an audience, each with its destination's columns (settings as text; all
    None when the destination row is missing, deleted while SQLite's foreign keys were off)."""
    ad = audience_destinations
    return list(
        conn.execute(
            sa.select(
                ad.c.destination_id,
                sa.cast(ad.c.settings, sa.Text).label("connection_settings"),
                *destination_columns(),
            )
            .outerjoin(destinations, destinations.c.id == ad.c.destination_id)
            .where(ad.c.audience_id == audience_id, ad.c.enabled)
            .order_by(destinations.c.name)
        ).all()
    )


def missing_destination(audience_name: str, destination_id: int) -> str:
    """The problem of a connection whose destination row is gone (SQLite, foreign keys off)."""
    return (
        f"audience_destinations row ({audience_name!r}, destination_id={destination_id}): no destinations "
        "row has that id (deleted while foreign keys were off?); delete this row"
    )


def connection_where(audience: Audience, row: sa.Row[Any]) -> str:
    return f"audience_destinations row ({audience.name!r}, {row.name!r})"


def full_send_warning(audience: Audience, destination: str) -> str:
    """What to say of a connection that has never synced, of an audience whose key is stored (it synced,
    or its key was set by hand): its first run sends every member. The destination may hold them already:
    one deleted and re-inserted under the same name has a new id and none of the old one's state (the
    foreign keys cascade), or the audience moved from Segment Engage."""
    baseline = f"audience-sync initial --baseline --audience {shlex.quote(audience.name)} --destination "
    return (
        f"{audience} -> {destination!r}: this connection has never synced, but the audience's key "
        f"{audience.key!r} is stored (at its first sync, or by hand when moving from Segment Engage): its "
        f"first run sends every member as an entry. If {destination!r} "
        "already holds them (a destination deleted and re-inserted under the same name gets a new id and "
        f"none of the old one's state), record them as accepted instead: {baseline}"
        f"{shlex.quote(destination)}"
    )


def type_warning(audience: Audience, row: sa.Row[Any], destination: Destination) -> str | None:
    """Why a connection's `type` is not what is sent: over the Segment transport the kind decides it."""
    where = connection_where(audience, row)
    asked = json_object(row.connection_settings, f"{where}: settings").get("type")
    if destination.transport is None or asked in (None, destination.segment_type):
        return None
    return (
        f"{where}: settings.type is {asked!r}, but Segment's {destination.kind.capitalize()} destination "
        f"takes {destination.segment_type} calls only; {destination.segment_type} is sent"
    )


def load_connection(
    conn: sa.Connection, audience: Audience, row: sa.Row[Any], allow_new_key: bool = False
) -> tuple[Link, Destination]:
    """Validate one connection row and its destination; raises ConfigError naming the row and field (each
    independent problem: the destination's, the settings', a changed key)."""
    if row.id is None:
        raise ConfigError(missing_destination(audience.name, row.destination_id))
    problems = Problems()
    with problems.gather():
        destination = load_destination(row, row.settings_text)
    where = connection_where(audience, row)
    with problems.gather():
        link = Link.from_settings(
            json_object(row.connection_settings, f"{where}: settings"),
            where,
            audience_id=audience.id,
            audience_key=audience.key,
            destination_id=row.id,
            destination_name=row.name,
        )
    synced = state.synced_key(conn, audience.id, row.id)
    if synced is not None and synced != audience.key and not allow_new_key:
        problems.add(
            f"{audience}: key changed from {synced!r} to {audience.key!r} after syncing to "
            f"{row.name!r}; set audiences.key back to {synced!r} (a new key orphans the trait)"
        )
    problems.raise_any()
    if destination.transport is not None:  # the kind's Segment destination takes one message type
        link = dataclasses.replace(link, type=destination.segment_type)
    return link, destination
