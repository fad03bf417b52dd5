"""The Segment messages that carry changes (identify by default, track per connection), and delete."""

import hashlib
from datetime import datetime
from typing import Any

from sync import __version__
from sync.connections import Link
from sync.models import Change


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def build_message(link: Link, change: Change, now: datetime) -> dict[str, Any]:
    """The Segment message for `change`, computed at `now` (UTC)."""
    context: dict[str, Any] = {
        "personas": {
            "computation_class": "audience",
            "computation_id": f"aud_{link.audience_id}",
            "computation_key": link.audience_key,
            "namespace": "spa_default",
            "space_id": "spa_default",
        },
        "library": {"name": "audience-sync", "version": __version__},
    }
    transaction_id = change.traits.get("transaction_id")
    if transaction_id not in (None, ""):
        context["referrer"] = {"type": "everflow", "id": str(transaction_id)}
    message: dict[str, Any] = {"type": link.type, "userId": change.user_id}
    if link.type == "identify":
        message["traits"] = {link.audience_key: change.value, **_without(change.traits, link)}
    else:
        message["event"] = link.event(change.value)
        message["properties"] = {
            "audience_key": link.audience_key,
            link.audience_key: change.value,
        }
        context["traits"] = _without(change.traits, link)
    message["context"] = context
    message["integrations"] = {"All": False, link.destination_name: True}
    message["messageId"] = link.message_id(change)
    message["timestamp"] = _iso(now)
    return message


def _without(traits: dict[str, Any], link: Link) -> dict[str, Any]:
    return {name: value for name, value in traits.items() if name != link.audience_key}


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
