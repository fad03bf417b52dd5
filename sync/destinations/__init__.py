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

from sync.destinations.base import COMMON_SETTINGS, Destination
from sync.destinations.everflow import Everflow
from sync.destinations.refersion import Refersion
from sync.errors import ConfigError
from sync.settings import secret_from_env

KINDS: dict[str, type[Destination]] = {"everflow": Everflow, "refersion": Refersion}


def load_destination(row: sa.Row[Any], settings_text: str | None) -> Destination:
    """Validate a `destinations` row and build its destination; raises ConfigError naming the field."""
    where = f"destinations row id={row.id} ({row.name!r})"
    settings = json_object(settings_text, f"{where}: settings")
    if row.kind not in KINDS:
        raise ConfigError(f"{where}: kind {row.kind!r} is unknown (use {' or '.join(map(repr, KINDS))})")
    cls = KINDS[row.kind]
    transport = settings.get("transport", "native")
    if transport not in ("native", "segment"):
        raise ConfigError(f"{where}: settings.transport must be 'segment' or left out, not {transport!r}")
    if transport == "native":
        unknown = set(settings) - COMMON_SETTINGS - cls.settings_fields - {"transport"}
        if unknown:
            raise ConfigError(f"{where}: settings has unknown field(s) {', '.join(sorted(unknown))}")
    return cls(row, settings, _api_key(row, where))


def _api_key(row: sa.Row[Any], where: str) -> str | None:
    """The key, without the blanks around it (a key pasted or read from a file often ends in a newline)."""
    if row.api_key_env:
        return secret_from_env(row.api_key_env, f"{where}: api_key_env", "the key")
    return (row.api_key or "").strip() or None


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
