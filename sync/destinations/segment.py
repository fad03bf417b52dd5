"""The Segment transport: the Segment message itself, sent as Segment delivers to partner destinations."""

import base64
import json
from typing import Any

from sync.destinations.http import Call, base_url, read_accepting
from sync.models import Change

# REFERENCE.md (Segment Engage: partner destinations) documents one request, the POST of a message: the
# endpoint has no call that checks the key alone, and any request to it is data delivered to it
UNPROVABLE = (
    "the Segment transport cannot be checked without sending a message: a partner endpoint takes only "
    "Segment messages, and has no call that checks the API key alone"
)


class SegmentTransport:
    """POSTs each message to `settings.endpoint` with the key as Basic auth and the kind's catalog settings
    in X-Segment-Settings (REFERENCE.md, Segment Engage: partner destinations)."""

    def __init__(self, where: str, settings: dict[str, Any], api_key: str, catalog: dict[str, Any]) -> None:
        self.endpoint = base_url(settings.get("endpoint"), f"{where}: settings.endpoint")
        # a partner endpoint reads the catalog's names only (segment-docs src/_data/catalog/destinations.yml):
        # the row's own names (event_mapping, rate_limit, ...) would reach it as settings it does not know
        self.token = base64.b64encode(f"{api_key}:".encode()).decode()
        self.headers = {
            "Authorization": f"Basic {self.token}",
            "Content-Type": "application/json",
            "X-Segment-Settings": base64.b64encode(json.dumps(catalog).encode()).decode(),
        }

    def plan(self, changes: list[Change], messages: dict[str, dict[str, Any]]) -> list[Call]:
        return [
            Call([c], "POST", self.endpoint, read_accepting, json=messages[c.user_id], headers=self.headers)
            for c in changes
        ]
