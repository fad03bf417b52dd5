"""The exceptions audience-sync raises on purpose.

SyncError                  root: the CLI prints one line for these, no traceback
├── ConfigError            a bad SYNC_* value or a bad row in a configuration table
├── StateError             the state database is unreachable or not migrated
├── SourceError            an audience query failed, timed out or broke its contract
│   └── SourceInterrupted  stopped because the process is stopping
└── DestinationError       a destination did not accept a request (status, scrubbed text)
    ├── RetriableError     408, 429, 5xx but 501, timeouts, connection errors
    └── FatalError         anything else that is not 2xx: the message is rejected
        └── AuthError      401/403 or a redirect: stop the whole destination for this run

A configuration row's independent problems are gathered (`Problems`) into one ConfigError, so `check` can
list each of them; its text joins them with "; ".
"""

from collections.abc import Iterator
from contextlib import contextmanager


class SyncError(Exception):
    """Root of every expected error."""


class ConfigError(SyncError):
    """A SYNC_* value or a configuration row is invalid; `problems` holds each of its problems."""

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class Problems:
    """The independent problems of one configuration row, gathered to be raised as one ConfigError."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, problem: str) -> None:
        self.found.append(problem)

    @contextmanager
    def gather(self) -> Iterator[None]:
        """Note the ConfigError raised inside and go on with the next independent check."""
        try:
            yield
        except ConfigError as exc:
            self.found += exc.problems

    def raise_any(self) -> None:
        """Raise one ConfigError carrying every problem found, when there is one."""
        if self.found:
            raise ConfigError(*self.found)


class StateError(SyncError):
    """The state database cannot be used."""


class SourceError(SyncError):
    """An audience query failed; its run must not change anything."""


class SourceInterrupted(SourceError):
    """An audience query stopped because the process is stopping (a signal): the run is interrupted."""


class DestinationError(SyncError):
    """A destination refused or failed a request."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class RetriableError(DestinationError):
    """Worth trying again, after `retry_after` seconds when the destination said so."""

    def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(reason, status)
        self.retry_after = retry_after


class FatalError(DestinationError):
    """Trying again will not help: the message is rejected."""


class AuthError(FatalError):
    """The destination refused the request as a whole (credentials, a moved URL): stop it for this run."""


def first_line(error: BaseException | None) -> str:
    """The first line of an error's text (a driver error's own, not SQLAlchemy's wrapping), or its type."""
    cause = getattr(error, "orig", None) or error
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]
