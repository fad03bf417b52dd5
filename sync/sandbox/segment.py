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


class SegmentServer(FakeServer):
    """A partner destination receiving Segment's JSON messages directly (`POST` to any path).

    `kind` narrows it to one destination's call types: "everflow", "refersion", or None for a generic partner.
    """

    def __init__(self, *, api_key: str = "key", kind: str | None = None, **kwargs: Any) -> None:
        if kind not in _CALL_TYPES:
            raise ValueError(f"kind must be one of {sorted(map(str, _CALL_TYPES))}, not {kind!r}")
        self.api_key = api_key
        self.kind = kind
        self.messages: list[dict[str, Any]] = []
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
        self.messages.append(body)
        self.accepted[(body.get("userId"), body["messageId"])] += 1
        # Segment docs, "Building a Direct Destination": 200 accepted and processed; "You can normally send
        # back an empty body"; the {"ok": true} body is chosen here.
        return _json(200, {"ok": True})

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
