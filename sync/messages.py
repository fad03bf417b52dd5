"""The Segment messages that carry changes (identify by default, track per connection)."""

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sync import __version__
from sync.errors import ConfigError
from sync.models import Change

TYPES = ("identify", "track")


@dataclass(frozen=True)
class Connection:
    """An audience linked to a destination, with its validated `audience_destinations.settings`."""

    audience_id: int
    audience_key: str
    destination_id: int
    destination_name: str
    type: str = "identify"
    entered_event: str = "Audience Entered"
    exited_event: str = "Audience Exited"

    @classmethod
    def from_settings(cls, settings: dict[str, Any], where: str, **ids: Any) -> "Connection":
        unknown = set(settings) - {"type", "entered_event", "exited_event"}
        if unknown:
            raise ConfigError(f"{where}: settings has unknown field(s) {', '.join(sorted(unknown))}")
        connection = cls(**ids, **settings)
        if connection.type not in TYPES:
            raise ConfigError(
                f"{where}: settings.type must be 'identify' or 'track', not {connection.type!r}"
            )
        for name in ("entered_event", "exited_event"):
            if not isinstance(getattr(connection, name), str) or not getattr(connection, name):
                raise ConfigError(f"{where}: settings.{name} must be a non-empty text")
        return connection

    def event(self, value: bool) -> str:
        return self.entered_event if value else self.exited_event

    def message_id(self, change: Change) -> str:
        """Stable for the same change: every re-send carries it, a later re-entry gets a new one."""
        ids = f"{self.audience_id}:{self.destination_id}:{change.user_id}"
        seed = f"{ids}:{change.value}:{change.settled_before}"
        return "as-" + hashlib.sha256(seed.encode()).hexdigest()[:40]


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def build_message(connection: Connection, change: Change, now: datetime) -> dict[str, Any]:
    """The Segment message for `change`, computed at `now` (UTC)."""
    context: dict[str, Any] = {
        "personas": {
            "computation_class": "audience",
            "computation_id": f"aud_{connection.audience_id}",
            "computation_key": connection.audience_key,
            "namespace": "spa_default",
            "space_id": "spa_default",
        },
        "library": {"name": "audience-sync", "version": __version__},
    }
    transaction_id = change.traits.get("transaction_id")
    if transaction_id not in (None, ""):
        context["referrer"] = {"type": "everflow", "id": str(transaction_id)}
    message: dict[str, Any] = {"type": connection.type, "userId": change.user_id}
    if connection.type == "identify":
        message["traits"] = {connection.audience_key: change.value, **_without(change.traits, connection)}
    else:
        message["event"] = connection.event(change.value)
        message["properties"] = {
            "audience_key": connection.audience_key,
            connection.audience_key: change.value,
        }
        context["traits"] = _without(change.traits, connection)
    message["context"] = context
    message["integrations"] = {"All": False, connection.destination_name: True}
    message["messageId"] = connection.message_id(change)
    message["timestamp"] = _iso(now)
    return message


def _without(traits: dict[str, Any], connection: Connection) -> dict[str, Any]:
    return {name: value for name, value in traits.items() if name != connection.audience_key}


def traits_json(traits: dict[str, Any]) -> str:
    """Canonical JSON for a member's traits (values JSON cannot hold become text; NaN and infinities too,
    as "NaN", "Infinity" and "-Infinity", as Postgres's to_jsonb writes them)."""
    try:
        return json.dumps(traits, sort_keys=True, default=str, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(traits), sort_keys=True, default=str, ensure_ascii=False, allow_nan=False)


def _finite(value: Any) -> Any:
    """`value` with every non-finite float, however deep in lists and objects, as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def delete_message(user_id: str, destination_name: str, now: datetime, email: Any = None) -> dict[str, Any]:
    """A Segment `delete` message: the user asked to be forgotten (with the user's email when given)."""
    seed = f"delete:{destination_name}:{user_id}"
    return {
        "type": "delete",
        "userId": user_id,
        **({"email": str(email)} if email not in (None, "") else {}),
        "context": {"library": {"name": "audience-sync", "version": __version__}},
        "integrations": {"All": False, destination_name: True},
        "messageId": "as-" + hashlib.sha256(seed.encode()).hexdigest()[:40],
        "timestamp": _iso(now),
    }
