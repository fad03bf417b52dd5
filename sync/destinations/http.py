"""The HTTP side of a destination: the request a batch of changes becomes (`Call`), how an answer is read
(status mapping, error text, Retry-After), and which base URLs are allowed."""

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from sync.errors import AuthError, ConfigError, FatalError, RetriableError
from sync.models import Change, Outcome, accepted
from sync.ratelimit import RETRY_AFTER_CAP, RateLimiter

LOOPBACK = {"localhost", "127.0.0.1", "::1"}
CREDENTIALS_ACCEPTED = "credentials accepted"


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


def read_probe(call: Call, response: httpx.Response) -> list[Outcome] | Call:
    """The answer to a probe (`Destination.probe`, a call carrying no change): 2xx proves the credentials
    (401 and 403 were raised before, as AuthError "credentials refused ..."); anything else proves nothing."""
    if response.is_success:
        return []
    raise FatalError(f"the credentials could not be checked: {error_text(response)}", response.status_code)


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


def raise_for_retry_or_auth(response: httpx.Response, limiter: RateLimiter) -> None:
    """Raise for the answers that are about the request, not about the changes in it; a Retry-After holds
    back every request `limiter` paces (at most RETRY_AFTER_CAP seconds)."""
    status = response.status_code
    if status in (401, 403):
        raise AuthError(f"credentials refused ({error_text(response)})", status)
    if response.is_redirect:  # the URL in settings is wrong or moved: no change of it was looked at
        moved = response.headers.get("Location", "nowhere given")
        raise AuthError(f"the destination answered {status}, a redirect to {moved}: fix the URL in settings")
    if status in (408, 429) or (status >= 500 and status != 501):
        retry_after = _retry_after(response)
        if retry_after is not None:
            limiter.pause(min(retry_after, RETRY_AFTER_CAP))
        raise RetriableError(error_text(response), status, retry_after)


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
