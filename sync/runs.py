"""What a run is asked to do, how each connection fared, and the run history it leaves (`sync_runs`).

Transactions: `RunLog.finish` commits on the connection it is given (or uses one of its own); audience-level
rows the state database cannot take yet are kept and written with the next run's records.
"""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TextIO

import sqlalchemy as sa

from sync import metrics, state
from sync.errors import StateError, first_line

log = logging.getLogger(__name__)

# `progress(label, total)` at a connection's start returns `advance(n, counted)`, called as each page is
# recorded with the connection's failed changes and its destination's requests and retries so far
Progress = Callable[[str, int], Callable[[int, dict[str, int]], None]]


def utc_now() -> datetime:
    return datetime.now(UTC)


class RunOutcome(StrEnum):
    """How a connection's (or an audience's) run ended, as stored in `sync_runs.outcome`."""

    OK = "ok"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    HELD = "held"
    INVALID = "invalid"
    BUSY = "busy"  # another process holds the audience's lease: nothing recorded
    BASELINE = "baseline"  # `initial --baseline`: the members recorded as accepted, nothing sent
    REJECTED = "rejected"  # every change answered, but more than SYNC_REJECTED_SHARE of them rejected


# a run that did not end well is logged with its reason at these levels; the others at INFO
_LEVELS = {
    RunOutcome.FAILED: logging.ERROR,
    RunOutcome.INVALID: logging.ERROR,
    RunOutcome.REJECTED: logging.ERROR,
    RunOutcome.HELD: logging.WARNING,
    RunOutcome.INTERRUPTED: logging.WARNING,
}


@dataclass
class Options:
    audiences: list[str] = field(default_factory=list)  # names; empty means all
    destinations: list[str] = field(default_factory=list)
    dry_run: bool = False
    allow_mass_exit: bool = False
    initial_only: bool = False  # `initial`: only connections whose initial sync has not completed
    resend: bool = False
    baseline: bool = False  # record the members as accepted without sending (the destination holds them)
    out: TextIO | None = None  # where --dry-run writes its JSON lines
    progress: Progress | None = None  # a progress bar per connection (the CLI, on a terminal)


@dataclass
class Result:
    """How one connection (or an audience with no usable connection) fared in a run."""

    audience: str
    destination: str | None
    outcome: RunOutcome
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def good(self) -> bool:
        return self.outcome in (RunOutcome.OK, RunOutcome.BASELINE)


@dataclass(frozen=True)
class Finished:
    """A connection's run as it ended, to be logged and recorded."""

    audience_id: int
    label: str  # the audience as logs name it
    destination_id: int
    destination: str
    started: datetime
    result: Result


class RunLog:
    """Writes run history, logs each run's end and feeds the metrics."""

    def __init__(self, engine: sa.Engine, now: Callable[[], datetime] = utc_now) -> None:
        self.engine = engine
        self.now = now
        self.unrecorded: list[dict[str, Any]] = []  # audience runs the state database could not take yet
        self.lock = threading.Lock()

    def finish(self, run: Finished, dry_run: bool, conn: sa.Connection | None = None) -> Result:
        """Log the connection's run and, unless dry, record it (committing `conn`, or on a connection of its
        own) and observe it in the metrics."""
        result = run.result
        if not (dry_run and result.outcome == RunOutcome.BASELINE):  # a preview: the recorded run logs it
            log.log(
                _LEVELS.get(result.outcome, logging.INFO),
                "%s -> %s: %s",
                run.label,
                run.destination,
                result.outcome,
                extra={
                    "action": "run_finished",
                    "audience": result.audience,
                    "audience_id": run.audience_id,
                    "destination": run.destination,
                    "destination_id": run.destination_id,
                    "outcome": str(result.outcome),
                    **result.counts,
                    "reason": result.error,
                },
            )
        if dry_run:
            return result
        finished = self.now()
        seconds = (finished - run.started).total_seconds()
        metrics.observe_run(
            run.audience_id, run.destination_id, result.outcome, result.counts, seconds, finished.timestamp()
        )
        row = {
            "audience_id": run.audience_id,
            "destination_id": run.destination_id,
            "started_at": run.started,
            "finished_at": finished,
            "outcome": str(result.outcome),
            "error": result.error,
            **result.counts,
        }
        try:
            if conn is not None:
                state.record_run(conn, row)
                conn.commit()
            else:
                with self.engine.begin() as own:
                    state.record_run(own, row)
        except sa.exc.OperationalError as exc:
            raise StateError(f"cannot record the run of {run.label}: {exc.orig}") from exc
        return result

    def audience_run(self, audience_id: int, outcome: RunOutcome, error: str) -> None:
        """Record a run of the audience as a whole (no destination); if the state database cannot take it
        now, at the next chance: with the next run's records."""
        now = self.now()
        metrics.observe_audience_run(audience_id, outcome, now.timestamp())
        row = {"audience_id": audience_id, "destination_id": None, "started_at": now, "finished_at": now}
        with self.lock:
            self.unrecorded.append({**row, "outcome": str(outcome), "error": error})
        self.record_deferred()

    def record_deferred(self) -> None:
        with self.lock:
            rows, self.unrecorded = self.unrecorded, []
        if not rows:
            return
        try:
            with self.engine.begin() as conn:
                for row in rows:
                    state.record_run(conn, row)
        except sa.exc.DBAPIError as exc:
            log.error(
                "cannot record %d run(s) yet (%s); trying again with the next run",
                len(rows),
                first_line(exc),
                extra={"action": "record_deferred"},
            )
            with self.lock:
                self.unrecorded[:0] = rows
