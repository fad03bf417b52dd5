"""A configured destination account: its common settings (`Limits`) and what every kind does the same.

A destination turns changes into `Call`s (one HTTP request each, carrying one or more changes) and
outcomes known without a request (local rejections, skips). `delivery` sends the calls.
"""

import reprlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from sync.destinations.http import Call
from sync.destinations.segment import UNPROVABLE, SegmentTransport
from sync.errors import Problems
from sync.models import Change, Outcome
from sync.settings import secret_from_env

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
    segment_deletes = True  # its Segment destination takes `delete`
    no_deletion = ""  # what `forget` says when it has nothing to send
    settings_fields: frozenset[str] = frozenset()
    default_rate_limit = 10.0
    # run counts the kind's outcomes add to (`Outcome.noted`), each with its log line (one `%d`)
    count_notes: dict[str, str] = {}

    def __init__(self, row: sa.Row[Any], settings: dict[str, Any]) -> None:
        """Validate the row's key and settings (`load_destination` checked its kind, JSON and transport);
        raises one ConfigError carrying each independent problem, the kind's own settings' too."""
        self.id: int = row.id
        self.name: str = row.name
        self.where = f"destinations row id={row.id} ({row.name!r})"
        self.settings = settings
        self.warnings: list[str] = []  # what `check` reports without stopping a run
        problems = Problems()
        native = settings.get("transport") != "segment"
        unknown = set(settings) - COMMON_SETTINGS - self.settings_fields - {"transport"}
        if native and unknown:
            problems.add(f"{self.where}: settings has unknown field(s) {', '.join(sorted(unknown))}")
        self.key_from_env = bool(row.api_key_env)  # not the column: it may hold a key pasted there
        self.api_key = self._api_key(row, problems)
        self.limits = Limits(
            rate_limit=self._number(problems, "rate_limit", self.default_rate_limit, 1_000_000),
            max_in_flight=self._count(problems, "max_in_flight", 32, 1_000),
            timeout=self._number(problems, "timeout", 10, 3_600),
            max_attempts=self._count(problems, "max_attempts", 5, 100),
            backoff_initial=self._number(problems, "backoff_initial", 0.5, 3_600),
            backoff_max=self._number(problems, "backoff_max", 30, 3_600),
        )
        self.read_settings(problems, native)
        self.transport = None if native else self._segment_transport(problems)
        problems.raise_any()

    def read_settings(self, problems: Problems, native: bool) -> None:
        """The kind's own settings (those of its native API only when `native`), each wrong one noted."""

    def _api_key(self, row: sa.Row[Any], problems: Problems) -> str | None:
        """The key, without the blanks around it (a key pasted or read from a file often ends in a newline);
        None when none is set or api_key_env names no usable variable (a problem noted here)."""
        if row.api_key_env:
            with problems.gather():
                return secret_from_env(row.api_key_env, f"{self.where}: api_key_env", "the key")
            return None
        return (row.api_key or "").strip() or None

    def needed_key(self, problems: Problems, missing: str) -> str:
        """The key, for what cannot work without one; `missing` is noted when none is set (not when
        api_key_env names no usable variable: that is noted already)."""
        if self.api_key is None and not self.key_from_env:
            problems.add(f"{self.where}: {missing}")
        return self.api_key or ""

    def _segment_transport(self, problems: Problems) -> SegmentTransport | None:
        key = self.needed_key(problems, "the Segment transport needs an API key")
        with problems.gather():
            return SegmentTransport(self.where, self.settings, key, self.catalog_settings(key))
        return None

    def catalog_settings(self, api_key: str) -> dict[str, Any]:
        """The settings a partner endpoint reads from X-Segment-Settings, named as Segment's catalog names
        the kind's (segment-docs src/_data/catalog/destinations.yml): `apiKey`, and the kind's own."""
        return {"apiKey": api_key}

    def message(self, change: Change, message: dict[str, Any]) -> dict[str, Any]:
        """The Segment message as this destination sends it: over the Segment transport, shaped as the
        kind's Segment destination page asks (`segment_message`); natively, as built."""
        return message if self.transport is None else self.segment_message(change, message)

    def segment_message(self, change: Change, message: dict[str, Any]) -> dict[str, Any]:
        return message

    def page_size(self, value: bool) -> int:
        """How many entries (`value` True) or exits are planned, sent and recorded at a time."""
        return self.limits.max_in_flight

    def _number(self, problems: Problems, name: str, default: float, most: int) -> float:
        """A number setting; a wrong one is noted and its default stands in."""
        value = self.settings.get(name, default)
        # a range test, which also refuses NaN, infinities and integers too large for a float
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.001 <= value <= most:
            problems.add(
                f"{self.where}: settings.{name} must be a number from 0.001 to {most:,}, "
                f"not {reprlib.repr(value)}"
            )
            return default
        return float(value)

    def _count(self, problems: Problems, name: str, default: int, most: int) -> int:
        """A whole number setting; a wrong one is noted and its default stands in."""
        value = self.settings.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            problems.add(
                f"{self.where}: settings.{name} must be a whole number from 1 to {most}, "
                f"not {reprlib.repr(value)}"
            )
            return default
        return value

    def _choice(self, problems: Problems, name: str, allowed: tuple[str, ...]) -> str:
        """A setting with a closed set of values; the first is the default, and stands in for a wrong one."""
        value = self.settings.get(name, allowed[0])
        if value not in allowed:
            problems.add(
                f"{self.where}: settings.{name} must be {' or '.join(map(repr, allowed))}, not {value!r}"
            )
            return allowed[0]
        return str(value)

    def secrets(self) -> list[str]:
        """Values that must never be shown (scrubbed from any error text)."""
        sent = [self.transport.token] if self.transport else []
        return ([self.api_key] if self.api_key else []) + sent

    def check(self, change: Change, message: dict[str, Any]) -> str | None:
        """Why the destination would refuse this change, found before sending; None when fine."""
        return None

    def missing_columns(self, columns: Collection[str]) -> str | None:
        """Which column an audience query returning `columns` lacks, so that `check` would refuse every
        member (for `audience-sync check`); None when it has what the kind needs."""
        return None

    def plan(
        self, changes: list[Change], messages: dict[str, dict[str, Any]], event: Callable[[bool], str]
    ) -> tuple[list[Outcome], list[Call]]:
        """Outcomes known without a request, and the calls that carry the other changes."""
        if self.transport is not None:
            return [], self.transport.plan(changes, messages)
        return self.plan_native(changes, messages, event)

    def forget(self, change: Change, message: dict[str, Any]) -> Call | None:
        """The call that deletes (or disables) a user at the destination; None when it supports neither
        (`no_deletion` says why)."""
        if self.transport is None:
            return self.forget_native(change)
        if not self.segment_deletes:
            return None
        return self.transport.plan([change], {change.user_id: message})[0]

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
