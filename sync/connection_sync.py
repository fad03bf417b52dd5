"""One connection's run: its diff, the mass-exit guard, sending page by page through a Sink while recording
each page's outcomes, and how the run ended.

Transactions: `sync_connection` commits on the state connection it is given, after each page it records
(a dry run's sink writes nothing, and nothing is recorded).
"""

import logging
import threading
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from sync import state
from sync.audiences import Audience
from sync.connections import Link, full_send_warning
from sync.delivery import INTERRUPTED
from sync.destinations.base import Destination
from sync.diff import Counts, Diff
from sync.errors import SourceError
from sync.models import Outcome, Status
from sync.runs import Finished, Options, Result, RunLog, RunOutcome
from sync.sinks import Sink
from sync.staging import SharedReads

log = logging.getLogger(__name__)
MASS_EXIT_MIN = 100
REJECTED_MIN = 10  # fewer changes in a run are too few to tell a broken configuration from a few bad rows
LEASE_LOST = "stopped: the audience's lease was lost"


@dataclass(frozen=True)
class ConnectionRun:
    """What one connection's run works with."""

    audience: Audience
    link: Link
    destination: Destination
    options: Options
    started: datetime
    staged: dict[str, int]  # the audience's staging counts: members, null/duplicate/long user ids
    lost: threading.Event  # set when the audience's lease was lost
    stopping: threading.Event  # set on a signal: stop after the page in flight
    rejected_share: float  # SYNC_REJECTED_SHARE


def mass_exit_hold(counts: Counts) -> str | None:
    """Why the connection's changes look like a broken query rather than real exits, if they do."""
    if counts.members == 0 and counts.accepted_members > 0:
        return f"the query returned no rows while {counts.accepted_members} members are accepted"
    if counts.exits > MASS_EXIT_MIN and counts.exits * 2 > counts.accepted_members:
        return f"it would send false to {counts.exits} of {counts.accepted_members} accepted members"
    return None


class _Pages:
    """Sends a connection's diff page by page through the sink, counting and (when the sink writes)
    recording each page's outcomes before the next."""

    def __init__(self, run: ConnectionRun, conn: sa.Connection, sink: Sink, history: RunLog) -> None:
        self.run, self.conn, self.sink, self.history = run, conn, sink, history
        self.counts = dict(run.staged, entered=0, exited=0, rejected=0, skipped=0, failed=0)
        self.counts[Status.ACCEPTED if sink.writes else Status.TO_SEND] = 0
        self.last_failure: str | None = None  # the reason of the last change not accepted
        self.last_rejection: str | None = None
        self.nothing_to_do = 0  # rejections that refused nothing (an exit with no affiliate to disable)

    def account(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            for name in (outcome.status, *outcome.noted):
                self.counts[name] = self.counts.get(name, 0) + 1
            if outcome.status == Status.FAILED:
                self.last_failure = outcome.reason
            elif outcome.nothing_to_do:
                self.nothing_to_do += 1
            elif outcome.status == Status.REJECTED:
                self.last_rejection = outcome.reason
        if self.sink.writes:
            ids = (self.run.audience.id, self.run.link.destination_id)
            state.record(self.conn, *ids, outcomes, self.history.now())
            self.conn.commit()

    def send_all(self, diff: Diff, total: int) -> str | None:
        """Entries, then exits; returns why sending stopped early, if it did."""
        run = self.run
        progress = run.options.progress
        advance = progress(f"{run.audience.name} -> {run.destination.name}", total) if progress else None
        for value in (True, False):
            for page in diff.batches(value, run.destination.page_size(value)):
                self.counts["entered" if value else "exited"] += len(page)
                self.account(self.sink.send(run.link, run.destination, page))
                if advance is not None:
                    advance(len(page), {"failed": self.counts[Status.FAILED], **self.sink.counted()})
                stopped = self.stop_reason()
                if stopped:
                    return stopped
        return None

    def finish(self, outcome: RunOutcome, error: str | None) -> Result:
        """Log and (unless dry) record how the connection's run ended."""
        run = self.run
        _log_notes(run, self.counts)
        result = Result(run.audience.name, run.destination.name, outcome, self.counts, error)
        ended = Finished(
            run.audience.id,
            str(run.audience),
            run.link.destination_id,
            run.destination.name,
            run.started,
            result,
        )
        return self.history.finish(ended, dry_run=not self.sink.writes, conn=self.conn)

    def stop_reason(self) -> str | None:
        if reason := self.sink.stop_reason():
            return reason
        if self.run.stopping.is_set():
            return INTERRUPTED
        return LEASE_LOST if self.run.lost.is_set() else None


def _log_notes(run: ConnectionRun, counts: dict[str, int]) -> None:
    """One line per run for each count the destination notes (`Destination.count_notes`) that is not 0."""
    for name, note in run.destination.count_notes.items():
        if counts.get(name):
            log.warning(
                "%s -> %s: %s",
                run.audience,
                run.destination.name,
                note % counts[name],
                extra={"action": name, "audience_id": run.audience.id, "destination_id": run.destination.id},
            )


def sync_connection(
    run: ConnectionRun, conn: sa.Connection, reads: SharedReads, sink: Sink, history: RunLog
) -> Result:
    """Send one connection's pending changes (read through `reads`), recording them with `conn`."""
    diff = Diff(reads, run.audience.id, run.link.destination_id, resend=run.options.resend)
    numbers = diff.counts()
    pages = _Pages(run, conn, sink, history)
    if run.options.baseline and not diff.fresh:
        return _not_baselined(run, history)
    hold = mass_exit_hold(numbers)
    if hold and not run.options.allow_mass_exit:
        held = f"held: {hold}; run `audience-sync run --allow-mass-exit` if that is right"
        if sink.writes:
            pages.counts["pending"] = numbers.entries + numbers.exits
        return pages.finish(RunOutcome.HELD, held)
    _warn_full_send(run, conn, numbers)
    if sink.writes:
        state.begin_connection(conn, run.audience.id, run.link.destination_id, run.audience.key)
        conn.commit()
    error: str | None = None
    try:
        stopped = pages.send_all(diff, numbers.entries + numbers.exits)
    except SourceError as exc:  # a staged row the driver cannot read: the pages before it are recorded
        stopped, error = None, str(exc)
    counts = pages.counts
    unread = numbers.entries + numbers.exits - counts["entered"] - counts["exited"]
    if sink.writes:
        pages.account(sink.held())
        counts["pending"] = counts[Status.FAILED] + unread
    if stopped == INTERRUPTED and not unread and not counts[Status.FAILED]:
        stopped = None  # the signal came with the last page: nothing was cut short
    error = error or _ending_error(stopped, counts, unread, pages.last_failure)
    if not error and sink.writes:
        state.complete_initial(conn, run.audience.id, run.link.destination_id, history.now())
    rejections = None if error else _too_many_rejections(pages, run.rejected_share)
    return pages.finish(_outcome(stopped, error, run.options.baseline, rejections), error or rejections)


def _warn_full_send(run: ConnectionRun, conn: sa.Connection, numbers: Counts) -> None:
    """Log, at the first run of a connection (not a baseline, not a resend), that it sends every member
    although its audience's key is stored (it synced before): the destination may hold them already."""
    options, audience = run.options, run.audience
    if options.baseline or options.resend or not numbers.entries or not audience.key_stored:
        return
    if state.never_synced(conn, audience.id, run.link.destination_id):
        log.warning(
            "%s",
            full_send_warning(audience, run.destination.name),
            extra={
                "action": "full_send_planned",
                "audience": audience.name,
                "audience_id": audience.id,
                "destination": run.destination.name,
                "destination_id": run.destination.id,
                "entered": numbers.entries,
            },
        )


def _outcome(stopped: str | None, error: str | None, baseline: bool, rejections: str | None) -> RunOutcome:
    if stopped == INTERRUPTED:
        return RunOutcome.INTERRUPTED
    if error:
        return RunOutcome.FAILED
    if rejections:
        return RunOutcome.REJECTED
    return RunOutcome.BASELINE if baseline else RunOutcome.OK


def _too_many_rejections(pages: _Pages, share: float) -> str | None:
    """Why a run that sent everything is not ok: more than `share` of at least REJECTED_MIN changes were
    rejected (a column the destination needs missing from the query, as a rule); None when they were not.
    Rejections that refused nothing (an exit with no affiliate to disable) count neither way."""
    counts = pages.counts
    changes = counts["entered"] + counts["exited"] - pages.nothing_to_do
    rejected = counts[Status.REJECTED] - pages.nothing_to_do
    if changes < REJECTED_MIN or rejected <= share * changes:
        return None
    return (
        f"{rejected} of {changes} changes were rejected, more than SYNC_REJECTED_SHARE ({share:.0%}); "
        f"they are not sent again until the users' traits change (last: {pages.last_rejection})"
    )


def _ending_error(
    stopped: str | None, counts: dict[str, int], unread: int, last_failure: str | None
) -> str | None:
    """The run's error: why it stopped early, or which changes were not accepted."""
    if stopped:
        pending = counts.get("pending", unread)
        stay = "1 change stays" if pending == 1 else f"{pending} changes stay"
        return f"{stopped}; {stay} pending for the next run"
    if counts[Status.FAILED]:
        failed = "1 change was" if counts[Status.FAILED] == 1 else f"{counts[Status.FAILED]} changes were"
        return f"{failed} not accepted and will be sent again on the next run (last: {last_failure})"
    return None


def _not_baselined(run: ConnectionRun, history: RunLog) -> Result:
    """A connection that has sent before (an initial sync cut short) is not baselined: only a run can tell
    the destination about the members who left since. Nothing is recorded."""
    error = (
        f"not baselined: {run.audience} has synced to {run.destination.name!r} before; "
        "finish its initial sync with `audience-sync initial`"
    )
    result = Result(run.audience.name, run.destination.name, RunOutcome.FAILED, {}, error)
    ended = Finished(
        run.audience.id, str(run.audience), run.link.destination_id, run.destination.name, run.started, result
    )
    return history.finish(ended, dry_run=True)
