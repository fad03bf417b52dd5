"""Refersion's `/affiliate/list`: every affiliate of the account, a page at a time, as its OpenAPI reference
documents it (github.com/api-evangelist/refersion, openapi/refersion-rest-api-openapi.yml, /affiliate/list;
REFERENCE.md, Refersion)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sync.sandbox.http import Response, _json

# Refersion REST API v2 reference (OpenAPI, /affiliate/list): `limit` "Number of results to return per call.
# Maximum 100." (a string, default "3"); `page` "Page offset for pagination" (a string, default "1").
MAX_LIMIT = 100
DEFAULT_LIMIT = 3


def _whole(value: Any, default: int) -> int | None:
    """A string (or integer) of digits as a number; None for anything else."""
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value)
    return None


def list_page(
    data: dict[str, Any], order: Sequence[dict[str, Any]], offer_id: Callable[[dict[str, Any]], str]
) -> Response:
    """The page `data` asks for of the affiliates in `order` (oldest first)."""
    limit, page = _whole(data.get("limit"), DEFAULT_LIMIT), _whole(data.get("page"), 1)
    # More than 100, 0, or text: an invalid field, which Refersion answers 204 with a body on every operation
    # (REFERENCE.md, Refersion: Errors). Its message is not documented; chosen here.
    if limit is None or not 1 <= limit <= MAX_LIMIT:
        return _json(204, {"errors": [f"Invalid field limit (at most {MAX_LIMIT})"]})
    if page is None or page < 1:
        return _json(204, {"errors": ["Invalid field page"]})
    start = (page - 1) * limit
    # Refersion REST API v2 reference (OpenAPI, /affiliate/list 200): total, and results of id (the
    # affiliate's code), offer_id, status, first_name, last_name, email, custom_fields. A page past the end:
    # not documented; chosen here: no results.
    results = [
        {
            "id": a["code"],
            "offer_id": offer_id(a),
            "status": a["status"],
            "first_name": a.get("first_name", ""),
            "last_name": a.get("last_name", ""),
            "email": a["email"],
            "custom_fields": [],
        }
        for a in order[start : start + limit]
    ]
    return _json(200, {"total": len(order), "results": results})
