"""One run: evaluate an audience, diff it against each connection's accepted state, deliver the changes.

The one-shot commands and the daemon both call `Runner.run`.
"""

import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import httpx
import sqlalchemy as sa
from rich.progress import Progress

from sync import leases, metrics, state
from sync.audiences import Audience, load_audiences, store_key
from sync.connections import connection_rows, load_connection
from sync.delivery import INTERRUPTED, Delivery, Sender
from sync.destinations.base import Destination
from sync.diff import Diff
from sync.errors import ConfigError, SourceError, StateError, first_line
from sync.messages import Connection, build_message
from sync.models import Change, Outcome, Status, rejected
from sync.settings import Settings
from sync.staging import MAX_USER_ID_BYTES, SharedReads, dropping_stage, stage_members
from sync.tables import audiences, destinations

log = logging.getLogger(__name__)
MASS_EXIT_MIN = 100
LEASE_LOST = "stopped: the audience's lease was lost"


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Options:
    audiences: list[str] = field(default_factory=list)  # names; empty means all
    destinations: list[str] = field(default_factory=list)
    dry_run: bool = False
    allow_mass_exit: bool = False
    initial_only: bool = False  # `initial`: only connections whose initial sync has not completed
    resend: bool = False
    out: TextIO | None = None  # where --dry-run writes its JSON lines


@dataclass
class Result:
    """How one connection (or an audience with no usable connection) fared in a run."""

    audience: str
    destination: str | None
    outcome: str  # ok, failed, interrupted, held, invalid, busy
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def good(self) -> bool:
        return self.outcome == "ok"


class Runner:
    """Runs audiences against the state database; keeps one Sender per destination for the process."""

    def __init__(
        self,
        engine: sa.Engine,
        source: sa.Engine,
        settings: Settings,
        now: Callable[[], datetime] = utc_now,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.engine = engine
        self.transport = transport  # None: the network (httpx.MockTransport in the in-process tests)
        self.source = source
        self.settings = settings
        self.now = now
        self.owner = leases.this_process()
        self.senders: dict[int, tuple[Any, Sender]] = {}
        self.senders_lock = threading.Lock()
        self.retired: list[Sender] = []
        # set on a signal: take no new work, cut retry waits short, record the page in flight and stop
        self.stopping = threading.Event()
        self.unrecorded: list[dict[str, Any]] = []  # audience runs the state database could not take yet
        self.unrecorded_lock = threading.Lock()
        self.progress: Progress | None = None  # a progress bar per connection, on a terminal

    def close(self) -> None:
        for sender in [s for _, s in self.senders.values()] + self.retired:
            sender.close()

    def abandon(self, timeout: float = 5.0) -> None:
        """Release this process's leases before it exits at once (a second signal); bounded by `timeout`."""

        def release() -> None:
            try:
                leases.release_all(self.engine, self.owner)
            except sa.exc.DBAPIError as exc:  # they expire, or a process on this host takes them over
                log.error("cannot release the leases: %s", first_line(exc), extra={"action": "lease_failed"})

        releasing = threading.Thread(target=release, name="release-leases", daemon=True)
        releasing.start()
        releasing.join(timeout)

    def run(self, options: Options) -> list[Result]:
        """One cycle over the selected audiences, concurrently; returns a result per connection."""
        with self.engine.connect() as conn:
            valid, problems = load_audiences(conn)
            names = {  # str(): a name of other data (bytes on SQLite) is shown, its row reported invalid
                row.id: str(row.name) for row in conn.execute(sa.select(audiences.c.id, audiences.c.name))
            }
            destination_names = set(conn.scalars(sa.select(destinations.c.name)))
        for asked, known, what in (
            (options.audiences, set(names.values()), "audience"),
            (options.destinations, destination_names, "destination"),
        ):
            if set(asked) - known:
                raise ConfigError(f"no {what} named {', '.join(sorted(set(asked) - known))}")
        if options.audiences:
            valid = [a for a in valid if a.name in options.audiences]
            problems = {i: p for i, p in problems.items() if names[i] in options.audiences}
        results = [self._invalid_audience(i, names[i], problem, options) for i, problem in problems.items()]
        with ThreadPoolExecutor(4, thread_name_prefix="audience") as pool:
            for audience_results in pool.map(lambda a: self.run_audience(a, options), valid):
                results += audience_results
        return results

    def run_audience(self, audience: Audience, options: Options) -> list[Result]:
        """Run one audience under its lease; a state database failure fails this audience only."""
        self._record_deferred()
        try:
            with leases.hold(self.engine, audience.id, self.owner, str(audience)) as lost:
                return self._run_leased(audience, options, lost)
        except leases.Busy as busy:
            message = f"{audience} is being synced by {busy.holder}; try again when it finishes"
            log.warning("%s", message, extra={"action": "audience_busy"})
            return [Result(audience.name, None, "busy", error=message)]
        except sa.exc.DBAPIError as exc:  # e.g. lost mid-run, and with it the run's temporary members table
            message = f"{audience}: the state database failed during the run: {first_line(exc)}"
            log.error("%s", message, extra={"action": "state_failed"})
            if not options.dry_run:
                self._record_audience_run(audience.id, "failed", message)
            return [Result(audience.name, None, "failed", error=message)]

    def _invalid_audience(self, audience_id: int, name: str, problem: str, options: Options) -> Result:
        """Log and record an audience whose row is invalid (status shows the reason)."""
        log.error("%s", problem, extra={"action": "audience_invalid"})
        if not options.dry_run:
            self._record_audience_run(audience_id, "invalid", problem)
        return Result(name, None, "invalid", error=problem)

    def _record_audience_run(self, audience_id: int, outcome: str, error: str) -> None:
        """Record a run of the audience as a whole (no destination); if the state database cannot take it
        now, at the next chance: with the next run's records."""
        now = self.now()
        row = {"audience_id": audience_id, "destination_id": None, "started_at": now, "finished_at": now}
        with self.unrecorded_lock:
            self.unrecorded.append({**row, "outcome": outcome, "error": error})
        self._record_deferred()

    def _record_deferred(self) -> None:
        with self.unrecorded_lock:
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
            with self.unrecorded_lock:
                self.unrecorded[:0] = rows

    def _run_leased(self, audience: Audience, options: Options, lost: threading.Event) -> list[Result]:
        started = self.now()
        results: list[Result] = []
        # This connection holds the run's staged members (a temporary table): the connections' threads
        # read their diff through it and write with connections of their own.
        with self.engine.connect() as conn, dropping_stage(conn):
            connections, invalid = self._connections(conn, audience, options)
            results += invalid
            if not connections:
                return results
            if self.stopping.is_set():
                return results
            try:
                staged = stage_members(conn, self.source, audience, self.settings.query_timeout)
            except SourceError as exc:
                conn.rollback()
                log.error("%s", exc, extra={"action": "query_failed"})
                for connection, _ in connections:
                    results.append(
                        self._finish(audience, connection, started, "failed", {}, str(exc), options)
                    )
                return results
            if not options.dry_run:  # a dry run writes nothing (a SQLite write lock would block others)
                if options.resend:
                    for connection, _ in connections:
                        state.forget_connection(conn, audience.id, connection.destination_id)
                store_key(conn, audience)
            log.info(
                "%s: %d members (%d null user_ids, %d duplicates, %d user_ids over %d bytes)",
                audience,
                staged.members,
                staged.null_user_ids,
                staged.duplicate_user_ids,
                staged.long_user_ids,
                MAX_USER_ID_BYTES,
                extra={"action": "audience_evaluated"},
            )
            base = {
                "members": staged.members,
                "null_user_ids": staged.null_user_ids,
                "duplicate_user_ids": staged.duplicate_user_ids,
                "long_user_ids": staged.long_user_ids,
            }
            if options.dry_run:
                reads = SharedReads(conn, keep_transaction=True)
                results += [
                    self._sync(conn, reads, audience, c, d, base, started, options, lost)
                    for c, d in connections
                ]
                conn.rollback()
                return results
            conn.commit()
            reads = SharedReads(conn)
            with ThreadPoolExecutor(len(connections), thread_name_prefix=f"aud{audience.id}") as pool:
                results += pool.map(
                    lambda cd: self._sync_in_own_connection(
                        reads, audience, cd[0], cd[1], base, started, options, lost
                    ),
                    connections,
                )
            return results

    def _connections(
        self, conn: sa.Connection, audience: Audience, options: Options
    ) -> tuple[list[tuple[Connection, Destination]], list[Result]]:
        """The audience's usable connections, and a result for each invalid one."""
        rows = connection_rows(conn, audience.id)
        usable: list[tuple[Connection, Destination]] = []
        invalid: list[Result] = []
        for row in rows:
            if options.destinations and row.name not in options.destinations:
                continue
            if row.enabled is False:  # None: the destination row is missing, which load_connection reports
                log.info(
                    "%s: destination %r is disabled; skipped",
                    audience,
                    row.name,
                    extra={"action": "destination_disabled"},
                )
                continue
            try:
                connection, destination = load_connection(conn, audience, row, allow_new_key=options.resend)
            except ConfigError as exc:
                log.error("%s", exc, extra={"action": "connection_invalid"})
                if row.id is None:  # no destination to record a run for: status shows it by itself
                    invalid.append(Result(audience.name, None, "invalid", error=str(exc)))
                    continue
                invalid.append(
                    self._finish(
                        audience,
                        None,
                        self.now(),
                        "invalid",
                        {},
                        str(exc),
                        options,
                        destination_id=row.id,
                        destination_name=row.name,
                    )
                )
                continue
            if (
                options.initial_only
                and not options.resend
                and state.initial_completed(conn, audience.id, row.id)
            ):
                continue
            usable.append((connection, destination))
        return usable, invalid

    def _sync_in_own_connection(
        self,
        reads: SharedReads,
        audience: Audience,
        connection: Connection,
        destination: Destination,
        base: dict[str, int],
        started: datetime,
        options: Options,
        lost: threading.Event,
    ) -> Result:
        with self.engine.connect() as conn:
            return self._sync(conn, reads, audience, connection, destination, base, started, options, lost)

    def _sync(
        self,
        conn: sa.Connection,
        reads: SharedReads,
        audience: Audience,
        connection: Connection,
        destination: Destination,
        base: dict[str, int],
        started: datetime,
        options: Options,
        lost: threading.Event,
    ) -> Result:
        """Deliver one connection's pending changes (read through `reads`), recording them with `conn`."""
        counts = dict(base, entered=0, exited=0, rejected=0, skipped=0, failed=0)
        counts[Status.TO_SEND if options.dry_run else Status.ACCEPTED] = 0
        diff = Diff(reads, audience.id, connection.destination_id, resend=options.resend)
        numbers = diff.counts()
        hold = None
        if numbers.members == 0 and numbers.accepted_members > 0:
            hold = f"the query returned no rows while {numbers.accepted_members} members are accepted"
        elif numbers.exits > MASS_EXIT_MIN and numbers.exits * 2 > numbers.accepted_members:
            hold = f"it would send false to {numbers.exits} of {numbers.accepted_members} accepted members"
        if hold and not options.allow_mass_exit:
            held = f"held: {hold}; run `audience-sync run --allow-mass-exit` if that is right"
            log.warning("%s -> %s %s", audience, destination.name, held, extra={"action": "connection_held"})
            if not options.dry_run:
                counts["pending"] = numbers.entries + numbers.exits
            return self._finish(audience, connection, started, "held", counts, held, options, conn=conn)
        if not options.dry_run:
            state.begin_connection(conn, audience.id, connection.destination_id, audience.key)
            conn.commit()
        delivery = None if options.dry_run else Delivery(self._sender(destination))
        task = None
        if self.progress is not None:
            task = self.progress.add_task(
                f"{audience.name} -> {destination.name}", total=numbers.entries + numbers.exits
            )
        last_failure: str | None = None  # the reason of the last change not accepted, for the run's error
        error: str | None = None
        stopped: str | None = None  # why delivery stopped before the end

        def account(outcomes: list[Outcome]) -> None:
            """Count the outcomes and, unless dry, record them."""
            nonlocal last_failure
            for outcome in outcomes:
                counts[outcome.status] = counts.get(outcome.status, 0) + 1
                if outcome.status == Status.FAILED:
                    last_failure = outcome.reason
            if delivery:
                state.record(conn, audience.id, connection.destination_id, outcomes, self.now())
                conn.commit()

        try:
            for value in (True, False):
                for page in diff.batches(value, destination.limits.max_in_flight):
                    counts["entered" if value else "exited"] += len(page)
                    account(self._deliver(connection, destination, page, delivery, options))
                    if self.progress is not None and task is not None:
                        self.progress.advance(task, len(page))
                    stopped = self._stop_reason(delivery, lost)
                    if stopped:
                        break
                if stopped:
                    break
        except SourceError as exc:  # a staged row the driver cannot read: the pages before it are recorded
            error = str(exc)
        unread = numbers.entries + numbers.exits - counts["entered"] - counts["exited"]
        if delivery:
            account(delivery.held())
            counts["pending"] = counts[Status.FAILED] + unread
        if stopped == INTERRUPTED and not unread and not counts[Status.FAILED]:
            stopped = None  # the signal came with the last page: nothing was cut short
        if error is None and stopped:
            pending = counts.get("pending", unread)
            stay = "1 change stays" if pending == 1 else f"{pending} changes stay"
            error = f"{stopped}; {stay} pending for the next run"
        elif error is None and counts[Status.FAILED]:
            failed = "1 change was" if counts[Status.FAILED] == 1 else f"{counts[Status.FAILED]} changes were"
            error = f"{failed} not accepted and will be sent again on the next run (last: {last_failure})"
        if not error and not options.dry_run:
            state.complete_initial(conn, audience.id, connection.destination_id, self.now())
        ended = "interrupted" if stopped == INTERRUPTED else "failed" if error else "ok"
        return self._finish(audience, connection, started, ended, counts, error, options, conn=conn)

    def _stop_reason(self, delivery: Delivery | None, lost: threading.Event) -> str | None:
        """Why a connection's delivery stops after the page just recorded, if it does."""
        if delivery and delivery.stopped:
            return delivery.stopped
        if self.stopping.is_set():
            return INTERRUPTED
        return LEASE_LOST if lost.is_set() else None

    def _deliver(
        self,
        connection: Connection,
        destination: Destination,
        page: list[Change],
        delivery: Delivery | None,
        options: Options,
    ) -> list[Outcome]:
        now = self.now()
        messages = {change.user_id: build_message(connection, change, now) for change in page}
        outcomes: list[Outcome] = []
        sendable = []
        for change in page:
            reason = destination.check(change, messages[change.user_id])
            if reason:
                outcomes.append(rejected(change, reason))
            else:
                sendable.append(change)
        done, calls = destination.plan(sendable, messages, connection.event)
        outcomes += done
        if delivery is not None:
            return outcomes + delivery.send_all(calls)
        if options.out is not None:
            for outcome in outcomes:
                self._print_change(
                    options.out,
                    destination,
                    messages[outcome.change.user_id],
                    {outcome.status: outcome.reason} if outcome.status != Status.ACCEPTED else {},
                )
            for call in calls:
                for change in call.changes:
                    self._print_change(
                        options.out,
                        destination,
                        messages[change.user_id],
                        {} if destination.transport else {"request": call.describe()},
                    )
        return [Outcome(o.change, Status.TO_SEND) if o.status == Status.ACCEPTED else o for o in outcomes] + [
            Outcome(c, Status.TO_SEND) for call in calls for c in call.changes
        ]

    @staticmethod
    def _print_change(
        out: TextIO, destination: Destination, message: dict[str, Any], extra: dict[str, Any]
    ) -> None:
        out.write(json.dumps({"destination": destination.name, "message": message, **extra}) + "\n")

    def _sender(self, destination: Destination) -> Sender:
        """The shared Sender of a destination, rebuilt when its limits or credentials changed."""
        identity = (destination.limits, tuple(destination.secrets()))
        with self.senders_lock:
            known = self.senders.get(destination.id)
            if known and known[0] == identity:
                return known[1]
            sender = Sender(destination, stopping=self.stopping, transport=self.transport)
            self.senders[destination.id] = (identity, sender)
            if known:  # another run may still be sending with it: close it with the runner
                self.retired.append(known[1])
        return sender

    def _finish(
        self,
        audience: Audience,
        connection: Connection | None,
        started: datetime,
        outcome: str,
        counts: dict[str, int],
        error: str | None,
        options: Options,
        conn: sa.Connection | None = None,
        destination_id: int | None = None,
        destination_name: str | None = None,
    ) -> Result:
        """Record the run (unless dry) and return its result."""
        destination_id = connection.destination_id if connection else destination_id
        destination_name = connection.destination_name if connection else destination_name
        result = Result(audience.name, destination_name, outcome, counts, error)
        log.info(
            "%s -> %s: %s %s",
            audience,
            destination_name,
            outcome,
            " ".join(f"{k}={v}" for k, v in counts.items()),
            extra={"action": "run_finished"},
        )
        if options.dry_run:
            return result
        finished = self.now()
        metrics.observe_run(
            audience.name,
            destination_name,
            outcome,
            counts,
            (finished - started).total_seconds(),
            finished.timestamp(),
        )
        row = {
            "audience_id": audience.id,
            "destination_id": destination_id,
            "started_at": started,
            "finished_at": finished,
            "outcome": outcome,
            "error": error,
            **counts,
        }
        try:
            if conn is not None:
                state.record_run(conn, row)
                conn.commit()
            else:
                with self.engine.begin() as own:
                    state.record_run(own, row)
        except sa.exc.OperationalError as exc:
            raise StateError(f"cannot record the run of {audience}: {exc.orig}") from None
        return result
