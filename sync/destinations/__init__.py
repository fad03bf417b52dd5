"""Destinations: the kinds, and building one from its `destinations` row.

base.py       Destination (what every kind does) and Limits (the common settings)
http.py       Call (one request), reading answers (status mapping, error text, Retry-After), base URLs
segment.py    the Segment transport (the Segment message sent as Segment delivers to partners)
everflow.py   Everflow postbacks
refersion.py  Refersion affiliates (refersion_lookup.py: finding one by code or email)
"""

import json
from typing import Any

import sqlalchemy as sa

from sync.destinations.base import Destination
from sync.destinations.everflow import Everflow
from sync.destinations.refersion import Refersion
from sync.errors import ConfigError

KINDS: dict[str, type[Destination]] = {"everflow": Everflow, "refersion": Refersion}


def load_destination(row: sa.Row[Any], settings_text: str | None) -> Destination:
    """Validate a `destinations` row and build its destination; raises ConfigError naming the field (each
    independent problem of the row, once its kind, transport and settings JSON are known to be right)."""
    where = f"destinations row id={row.id} ({row.name!r})"
    settings = json_object(settings_text, f"{where}: settings")
    if row.kind not in KINDS:
        raise ConfigError(f"{where}: kind {row.kind!r} is unknown (use {' or '.join(map(repr, KINDS))})")
    transport = settings.get("transport", "native")
    if transport not in ("native", "segment"):  # it says which settings the row may hold
        raise ConfigError(f"{where}: settings.transport must be 'segment' or left out, not {transport!r}")
    return KINDS[row.kind](row, settings)


def json_object(text: str | None, where: str) -> dict[str, Any]:
    """Parse a JSON settings column; it must hold an object."""
    if text is None or text == "":
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{where} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a JSON object, not {type(value).__name__}")
    return value
