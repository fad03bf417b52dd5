"""A configured destination account: its common settings (`Limits`) and what every kind does the same.

A destination turns changes into `Call`s (one HTTP request each, carrying one or more changes) and
outcomes known without a request (local rejections, skips). `delivery` sends the calls.
"""

import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from sync.destinations.http import Call
from sync.destinations.segment import UNPROVABLE, SegmentTransport
from sync.errors import ConfigError
from sync.models import Change, Outcome

COMMON_SETTINGS = {"rate_limit", "max_in_flight", "timeout", "max_attempts", "backoff_initial", "backoff_max"}


@dataclass(frozen=True)
class Limits:
    """How hard to press the destination: requests per second, in flight, timeout, retries and backoff."""

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
        segment = settings.get("transport") == "segment"
        self.transport = SegmentTransport(self.where, settings, api_key) if segment else None

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
        sent = [self.transport.token] if self.transport else []
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

    def probe(self) -> Call | str:
        """One harmless authenticated call that proves the credentials (read by `http.read_probe`), or the
        sentence that says why this destination's cannot be proved."""
        return UNPROVABLE if self.transport is not None else self.probe_native()

    def probe_native(self) -> Call | str:
        raise NotImplementedError

    def plan_native(
        self, changes: list[Change], messages: dict[str, dict[str, Any]], event: Callable[[bool], str]
    ) -> tuple[list[Outcome], list[Call]]:
        raise NotImplementedError
