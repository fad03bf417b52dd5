"""`audience-sync audiences`, `destinations` and `runs`: what is configured, and what ran."""

import json
from typing import Any

import sqlalchemy as sa

from sync.audiences import derive_key
from sync.tables import (
    audience_destinations,
    audiences,
    destinations,
    readable_columns,
    sync_reconcile_runs,
    sync_runs,
)

ad = audience_destinations


def _connections(link: sa.ColumnElement[bool]) -> sa.Label[int]:
    """How many enabled connections a row has (`enabled` read as the runner reads it)."""
    count = sa.select(sa.func.count()).where(link, ad.c.enabled == sa.true()).scalar_subquery()
    return count.label("connections")


def audience_rows(conn: sa.Connection) -> list[dict[str, Any]]:
    """Every audience: id, name, key (derived from the name until the first sync stores it), schedule,
    whether it is enabled, and its enabled connections."""
    columns = [c for c in readable_columns(audiences) if c.name != "query"]
    connections = _connections(ad.c.audience_id == audiences.c.id)
    rows = conn.execute(sa.select(*columns, connections).order_by(audiences.c.name))
    return [
        {
            "id": row.id,
            "name": str(row.name),
            "key": row.key if row.key is not None else _derived(row.name),
            "key_stored": row.key is not None,
            "schedule": row.schedule,
            "enabled": bool(row.enabled),
            "connections": row.connections,
        }
        for row in rows
    ]


def _derived(name: Any) -> str | None:
    return derive_key(name) if isinstance(name, str) else None


def destination_rows(conn: sa.Connection) -> list[dict[str, Any]]:
    """Every destination: id, name, kind, transport, where its key comes from (never the key), whether it is
    enabled, and its enabled connections."""
    d = destinations
    settings = sa.cast(d.c.settings, sa.Text).label("settings_text")
    enabled = (d.c.enabled == sa.true()).label("enabled")
    rows = conn.execute(
        sa.select(d.c.id, d.c.name, d.c.kind, d.c.api_key_env, (d.c.api_key.is_not(None)).label("has_key"))
        .add_columns(settings, enabled, _connections(ad.c.destination_id == d.c.id))
        .order_by(d.c.name)
    )
    return [
        {
            "id": row.id,
            "name": str(row.name),
            "kind": row.kind,
            "transport": _transport(row.settings_text),
            "api_key": f"env {row.api_key_env}" if row.api_key_env else "in the row" if row.has_key else None,
            "enabled": bool(row.enabled),
            "connections": row.connections,
        }
        for row in rows
    ]


def _transport(settings_text: str | None) -> str:
    try:
        settings = json.loads(settings_text or "{}")
    except ValueError:
        return "unreadable settings"
    return str(settings.get("transport", "native")) if isinstance(settings, dict) else "unreadable settings"


def run_rows(conn: sa.Connection, audience: str | None, limit: int) -> list[dict[str, Any]]:
    """The last `limit` runs and reconciles (`kind` says which), newest first, of one audience or of all."""
    found = []
    for kind, table in (("sync", sync_runs), ("reconcile", sync_reconcile_runs)):
        query = (
            sa.select(table, audiences.c.name.label("audience"), destinations.c.name.label("destination"))
            .join(audiences, audiences.c.id == table.c.audience_id)
            .outerjoin(destinations, destinations.c.id == table.c.destination_id)
            .order_by(table.c.started_at.desc(), table.c.id.desc())
            .limit(limit)
        )
        if audience is not None:
            query = query.where(audiences.c.name == audience)
        found += [
            {**row._asdict(), "kind": kind, "audience": str(row.audience)} for row in conn.execute(query)
        ]
    found.sort(key=lambda row: row["started_at"], reverse=True)
    return found[:limit]
