"""Destinations: configuration, the requests a batch of changes becomes, and how answers are read.

A destination turns changes into `Call`s (one HTTP request each, carrying one or more changes) and
outcomes known without a request (local rejections, skips). `delivery` sends the calls.
"""

import base64
import json
import logging
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import sqlalchemy as sa

from sync.errors import AuthError, ConfigError, FatalError, RetriableError
from sync.messages import Change
from sync.settings import secret_from_env

log = logging.getLogger(__name__)

COMMON_SETTINGS = {"rate_limit", "max_in_flight", "timeout", "max_attempts", "backoff_initial", "backoff_max"}
LOOPBACK = {"localhost", "127.0.0.1", "::1"}
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Outcome:
    """What became of one change: accepted, rejected, skipped or failed (still pending)."""

    change: Change
    status: str
    reason: str | None = None
    remote_id: str | None = None
    remote_active: bool | None = None
    remote_code: str | None = None
    # a rejection by the destination's answer to the request, which may be about its settings, not the user
    refused: bool = False


def accepted(change: Change, **extra: Any) -> Outcome:
    return Outcome(change, "accepted", **extra)


def rejected(change: Change, reason: str, refused: bool = False) -> Outcome:
    return Outcome(change, "rejected", reason, refused=refused)


@dataclass
class Call:
    """One HTTP request carrying `changes`; `read` turns a non-retriable answer into outcomes, or into the
    call to send next for the same changes (a lookup before the request that carries them)."""

    changes: list[Change]
    method: str
    url: str
    read: Callable[["Call", httpx.Response], "list[Outcome] | Call"]
    params: dict[str, str] | None = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    masked: tuple[str, ...] = ()  # params or body fields never to show

    def masked_values(self) -> list[str]:
        """The values of the masked fields (a generated password), longest first."""
        fields = {**(self.params or {}), **(self.json if isinstance(self.json, dict) else {})}
        return sorted((str(fields[k]) for k in self.masked if fields.get(k)), key=len, reverse=True)

    def describe(self) -> dict[str, Any]:
        """The request for a dry run, without credentials or generated passwords."""
        shown: dict[str, Any] = {"method": self.method, "url": self.url}
        if self.params:
            shown["params"] = {k: "***" if k in self.masked else v for k, v in self.params.items()}
        if self.json is not None:
            body = self.json
            if isinstance(body, dict):
                body = {k: "***" if k in self.masked else v for k, v in body.items()}
            shown["json"] = body
        return shown


def read_accepting(call: Call, response: httpx.Response) -> list[Outcome] | Call:
    """The plain rule: 2xx accepts every change of the call, anything else rejects them."""
    if response.is_success:
        return [accepted(change) for change in call.changes]
    raise FatalError(error_text(response), response.status_code)


def error_text(response: httpx.Response) -> str:
    """A short reason from a documented error body (`{"error": ...}`, `{"errors": [...]}`, `{"message": ...}`)
    or the text."""
    reason = response.text.strip()  # shortened only after secrets are scrubbed (Sender.scrub)
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("error"), str):
            reason = body["error"]
        elif isinstance(body.get("errors"), list):
            reason = "; ".join(str(e) for e in body["errors"])
        elif isinstance(body.get("message"), str):  # Segment's partner destinations
            reason = body["message"]
    return f"HTTP {response.status_code}" + (f": {reason}" if reason else "")


def raise_for_retry_or_auth(response: httpx.Response) -> None:
    """Raise for the answers that are about the request, not about the changes in it."""
    status = response.status_code
    if status in (401, 403):
        raise AuthError(f"credentials refused ({error_text(response)})", status)
    if response.is_redirect:  # the URL in settings is wrong or moved: no change of it was looked at
        moved = response.headers.get("Location", "nowhere given")
        raise AuthError(f"the destination answered {status}, a redirect to {moved}: fix the URL in settings")
    if status in (408, 429) or (status >= 500 and status != 501):
        raise RetriableError(error_text(response), status, _retry_after(response))


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds, given as seconds or as an HTTP date."""
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def base_url(value: Any, where: str) -> str:
    """A validated base URL: scheme + host (+ path); a bare host means https; http only on loopback."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} is required: a base URL such as https://example.com")
    text = value.strip().rstrip("/")
    if "://" not in text:
        text = "https://" + text
    if "@" in text.split("://", 1)[1].split("/", 1)[0]:  # said before the value is ever shown
        raise ConfigError(f"{where}: the URL holds a user or password; remove it (the key goes in api_key)")
    try:
        parts = urlsplit(text)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        httpx.URL(text)
    except (ValueError, httpx.InvalidURL):  # a port that is not a number, an unclosed [IPv6 address
        valid = False
    if not valid or parts.query or parts.fragment or any(char.isspace() for char in text):
        raise ConfigError(f"{where}: {value!r} is not a base URL (scheme, host and optional path)")
    if parts.scheme != "https" and parts.hostname not in LOOPBACK:
        raise ConfigError(f"{where}: {value!r} must use https:// (http is allowed only for loopback hosts)")
    return text


@dataclass(frozen=True)
class Limits:
    rate_limit: float
    max_in_flight: int
    timeout: float
    max_attempts: int
    backoff_initial: float
    backoff_max: float


class Destination:
    """One configured destination account. Subclasses turn changes into calls."""

    kind = ""
    segment_type = ""  # the only message type the kind's Segment destination takes
    settings_fields: frozenset[str] = frozenset()
    default_rate_limit = 10.0

    def __init__(self, row: sa.Row[Any], settings: dict[str, Any], api_key: str | None) -> None:
        self.id: int = row.id
        self.name: str = row.name
        self.where = f"destinations row id={row.id} ({row.name!r})"
        self.settings = settings
        self.api_key = api_key
        self.warnings: list[str] = []  # what `check` reports without stopping a run
        self.limits = Limits(
            rate_limit=self._number("rate_limit", self.default_rate_limit, 1_000_000),
            max_in_flight=self._count("max_in_flight", 32, 1_000),
            timeout=self._number("timeout", 10, 3_600),
            max_attempts=self._count("max_attempts", 5, 100),
            backoff_initial=self._number("backoff_initial", 0.5, 3_600),
            backoff_max=self._number("backoff_max", 30, 3_600),
        )
        self.transport = SegmentTransport(self) if settings.get("transport") == "segment" else None

    def _number(self, name: str, default: float, most: int) -> float:
        value = self.settings.get(name, default)
        # a range test, which also refuses NaN, infinities and integers too large for a float
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.001 <= value <= most:
            raise ConfigError(
                f"{self.where}: settings.{name} must be a number from 0.001 to {most:,}, "
                f"not {reprlib.repr(value)}"
            )
        return float(value)

    def _count(self, name: str, default: int, most: int) -> int:
        value = self.settings.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise ConfigError(
                f"{self.where}: settings.{name} must be a whole number from 1 to {most}, "
                f"not {reprlib.repr(value)}"
            )
        return value

    def secrets(self) -> list[str]:
        """Values that must never be shown (scrubbed from any error text)."""
        sent = [self.transport.headers["Authorization"].removeprefix("Basic ")] if self.transport else []
        return ([self.api_key] if self.api_key else []) + sent

    def check(self, change: Change, message: dict[str, Any]) -> str | None:
        """Why the destination would refuse this change, found before sending; None when fine."""
        return None

    def plan(
        self, changes: list[Change], messages: dict[str, dict[str, Any]], event: Callable[[bool], str]
    ) -> tuple[list[Outcome], list[Call]]:
        """Outcomes known without a request, and the calls that carry the other changes."""
        if self.transport is not None:
            return [], self.transport.plan(changes, messages)
        return self.plan_native(changes, messages, event)

    def forget(self, change: Change, message: dict[str, Any]) -> Call | None:
        """The call that deletes (or disables) a user at the destination; None when it supports neither."""
        if self.transport is not None:
            return self.transport.plan([change], {change.user_id: message})[0]
        return self.forget_native(change)

    def forget_native(self, change: Change) -> Call | None:
        return None

    def plan_native(
        self, changes: list[Change], messages: dict[str, dict[str, Any]], event: Callable[[bool], str]
    ) -> tuple[list[Outcome], list[Call]]:
        raise NotImplementedError


class SegmentTransport:
    """Sends the Segment message itself, as Segment delivers to partner destinations."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self.endpoint = base_url(
            destination.settings.get("endpoint"), f"{destination.where}: settings.endpoint"
        )
        if not destination.api_key:
            raise ConfigError(f"{destination.where}: the Segment transport needs an API key")
        forwarded = {k: v for k, v in destination.settings.items() if k not in ("transport", "endpoint")}
        token = base64.b64encode(f"{destination.api_key}:".encode()).decode()
        self.headers = {
            "Authorization": f"Basic {token}",
            "Content-Type": "application/json",
            "X-Segment-Settings": base64.b64encode(json.dumps(forwarded).encode()).decode(),
        }

    def plan(self, changes: list[Change], messages: dict[str, dict[str, Any]]) -> list[Call]:
        return [
            Call([c], "POST", self.endpoint, read_accepting, json=messages[c.user_id], headers=self.headers)
            for c in changes
        ]


def load_destination(row: sa.Row[Any], settings_text: str | None) -> Destination:
    """Validate a `destinations` row and build its destination; raises ConfigError naming the field."""
    from sync.destinations.everflow import Everflow
    from sync.destinations.refersion import Refersion

    where = f"destinations row id={row.id} ({row.name!r})"
    settings = json_object(settings_text, f"{where}: settings")
    kinds: dict[str, type[Destination]] = {"everflow": Everflow, "refersion": Refersion}
    if row.kind not in kinds:
        raise ConfigError(f"{where}: kind {row.kind!r} is unknown (use 'everflow' or 'refersion')")
    cls = kinds[row.kind]
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
        if not (isinstance(row.api_key_env, str) and ENV_NAME.fullmatch(row.api_key_env)):
            # no part of it is shown: it is often the key itself, pasted into the wrong column
            raise ConfigError(
                f"{where}: api_key_env does not hold an environment variable name; put the key itself in the "
                "environment, not in this column"
            )
        value = (secret_from_env(row.api_key_env) or "").strip()
        if not value:
            raise ConfigError(f"{where}: api_key_env names {row.api_key_env!r}, which is not set or empty")
        return value
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
