"""Segment's partner endpoint for the Everflow and Refersion destinations."""

from __future__ import annotations

import base64
from typing import Any

from sync.sandbox.fake import FakeServer
from sync.sandbox.http import Recorded, Response, _json

# The call types each kind of SegmentServer takes (None: any).
# Segment docs, Everflow destination: Track calls. Segment docs, Refersion destination: Identify and delete.
_CALL_TYPES: dict[str | None, frozenset[str] | None] = {
    None: None,
    "everflow": frozenset({"track"}),
    "refersion": frozenset({"identify", "delete"}),
}

# segment-docs src/_data/catalog/destinations.yml: the settings each destination has, by name (Everflow:
# apiKey and eventMapping, both required; Refersion: apiKey, required). Segment sends these and no others in
# X-Segment-Settings; a partner reading another name reads nothing.
_SETTINGS: dict[str, frozenset[str]] = {
    "everflow": frozenset({"apiKey", "eventMapping"}),
    "refersion": frozenset({"apiKey"}),
}
# segment-docs, Everflow destination: the track properties mapped to the postback (its example: adv1, adv3,
# total, orderId; adv1..adv5 in all; `coupon`, Segment's spec name, as the coupon code); "Custom properties
# are not supported at this time": the others are dropped.
_EVERFLOW_PROPERTIES = frozenset({"total", "orderId", "coupon", *(f"adv{i}" for i in range(1, 6))})
# segment-docs, Everflow destination's event mapping: id 0 is the base conversion (REFERENCE.md, Everflow)
_BASE_CONVERSION = "0"


class SegmentServer(FakeServer):
    """A partner destination receiving Segment's JSON messages directly (`POST` to any path).

    `kind` narrows it to one destination's call types and settings: "everflow", "refersion", or None for a
    generic partner. As Everflow it turns each mapped track into a postback (`postbacks`: transaction_id,
    adv_event_id, None for the base conversion, and the mapped properties) and drops an unmapped event
    (`dropped`), as its event mapping says.
    """

    def __init__(self, *, api_key: str = "key", kind: str | None = None, **kwargs: Any) -> None:
        if kind not in _CALL_TYPES:
            raise ValueError(f"kind must be one of {sorted(map(str, _CALL_TYPES))}, not {kind!r}")
        self.api_key = api_key
        self.kind = kind
        self.messages: list[dict[str, Any]] = []
        self.postbacks: list[dict[str, Any]] = []
        self.dropped: list[dict[str, Any]] = []
        super().__init__(**kwargs)

    def _handle(self, rec: Recorded) -> Response:
        # Segment docs, "Building a Direct Destination", Response body: errors carry {"message": "..."}.
        # Authorization: Basic base64("<apiKey>:"); Status code 401: "The client's API key is malformed...".
        if not self._authorized(rec.headers.get("authorization", "")):
            return _json(401, {"message": "Invalid API key"})
        # Segment docs, "Building a Direct Destination", Headers: Content-Type is always application/json. The
        # answer to another type is not documented there; chosen here: 415.
        if rec.headers.get("content-type", "").partition(";")[0].strip().lower() != "application/json":
            return _json(415, {"message": "Content-Type must be application/json"})
        # Segment docs, "Building a Direct Destination", Headers: X-Segment-Settings is base64-encoded
        # settings (JSON); Status code 400: "The message is malformed".
        try:
            settings = rec.settings
        except ValueError:
            settings = False
        if settings is not None and not isinstance(settings, dict):
            return _json(400, {"message": "X-Segment-Settings must be a base64-encoded JSON object"})
        # Segment docs, Spec (common fields): every message has `type` and `messageId`.
        body = rec.json
        if not isinstance(body, dict) or "type" not in body or "messageId" not in body:
            return _json(400, {"message": "Body must be a JSON object with type and messageId"})
        # Segment docs, "Building a Direct Destination", Status code: 501 for an unsupported call type.
        supported = _CALL_TYPES[self.kind]
        if supported is not None and body["type"] not in supported:
            return _json(501, {"message": f"Unsupported call type {body['type']}"})
        # Segment docs, Everflow destination, TransactionId: context.referrer.id and context.referrer.type
        # ("everflow") are required; 400 for a message with an error that is the client's fault.
        if self.kind == "everflow" and not _has_everflow_referrer(body):
            return _json(400, {"message": "context.referrer.id and context.referrer.type are required"})
        problem = _settings_problem(self.kind, settings) or _identify_problem(self.kind, body)
        if problem:
            return _json(400, {"message": problem})
        if self.kind == "everflow":
            self._postback(body, (settings or {})["eventMapping"])
        self.messages.append(body)
        self.accepted[(body.get("userId"), body["messageId"])] += 1
        # Segment docs, "Building a Direct Destination": 200 accepted and processed; "You can normally send
        # back an empty body"; the {"ok": true} body is chosen here.
        return _json(200, {"ok": True})

    def _postback(self, body: dict[str, Any], mapping: dict[str, str]) -> None:
        event_id = mapping.get(body.get("event", ""))
        # not mapped: Everflow records nothing; the answer to it is not documented; chosen here: 200
        if event_id is None:
            self.dropped.append(body)
            return
        properties = body.get("properties") or {}
        self.postbacks.append(
            {
                "transaction_id": body["context"]["referrer"]["id"],
                "adv_event_id": None if event_id == _BASE_CONVERSION else event_id,
                **{k: v for k, v in properties.items() if k in _EVERFLOW_PROPERTIES},
            }
        )

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        try:
            return (
                scheme.lower() == "basic"
                and base64.b64decode(token, validate=True) == f"{self.api_key}:".encode()
            )
        except ValueError:
            return False


def _has_everflow_referrer(body: dict[str, Any]) -> bool:
    context = body.get("context")
    referrer = context.get("referrer") if isinstance(context, dict) else None
    return (
        isinstance(referrer, dict)
        and referrer.get("type") == "everflow"
        and isinstance(referrer.get("id"), str)
        and referrer["id"] != ""
    )


def _settings_problem(kind: str | None, settings: Any) -> str | None:
    """What is wrong with the settings a kind's endpoint received, by the catalog (`_SETTINGS`)."""
    if kind is None:
        return None
    names = _SETTINGS[kind]
    settings = settings or {}
    if set(settings) != names:
        held, named = sorted(settings), sorted(names)
        return f"X-Segment-Settings holds {held}; the {kind} destination's settings are {named}"
    # segment-docs catalog: eventMapping is a text-map, event name -> advertiser event id (text)
    mapping = settings.get("eventMapping", {})
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        return "eventMapping must map event names to advertiser event ids given as text"
    return None


def _identify_problem(kind: str | None, body: dict[str, Any]) -> str | None:
    """What a Refersion identify lacks (segment-docs, Refersion destination: it "must contain" `name` or
    first and last name, `email`, and an `address` object; one case style throughout)."""
    if kind != "refersion" or body["type"] != "identify":
        return None
    found = body.get("traits")
    traits: dict[str, Any] = found if isinstance(found, dict) else {}
    address = traits.get("address")
    named = (
        traits.get("name")
        or all(traits.get(n) for n in ("first_name", "last_name"))
        or all(traits.get(n) for n in ("firstName", "lastName"))
    )
    keys = set(traits) | set(address if isinstance(address, dict) else {})
    if not traits.get("email") or not named:
        return "traits must contain email and name (or first and last name)"
    if not isinstance(address, dict):
        return "traits must contain an address object"
    if keys & {"firstName", "lastName", "postalCode"} and keys & {"first_name", "last_name", "postal_code"}:
        return "traits mix camelCase and snake_case: use one case style throughout"
    return None
