"""One run: evaluate each selected audience under its lease, then sync each of its connections.

The one-shot commands and the daemon both call `Runner.run` (the daemon `Runner.run_audience`).
Transactions: the staging connection is owned here (see `_run_leased`); each connection's run gets a
connection of its own (`connection_sync`).
"""

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import httpx
import sqlalchemy as sa

from sync import leases, state
from sync.audiences import Audience, load_audiences, store_key
from sync.connection_sync import ConnectionRun, sync_connection
from sync.connections import Link, connection_rows, load_connection
from sync.destinations.base import Destination
from sync.errors import ConfigError, SourceError, SourceInterrupted, SyncError, first_line
from sync.logs import audience_fields
from sync.runs import Finished, Options, Result, RunLog, RunOutcome, utc_now
from sync.senders import Senders
from sync.settings import Settings
from sync.sinks import Baseline, Delivering, DryRun, Sink
from sync.sources import Sources
from sync.staging import SharedReads, dropping_stage, stage_members, staged_counts
from sync.tables import audiences, destinations

__all__ = ["Options", "Result", "Runner", "utc_now"]
log = logging.getLogger(__name__)
Usable = list[tuple[Link, Destination]]


class Runner:
    """Runs audiences against the state database; keeps one Sender per destination and one engine per source
    (`sources`, closed with the runner) for the process."""

    def __init__(
        self,
        engine: sa.Engine,
        sources: Sources,
        settings: Settings,
        now: Callable[[], datetime] = utc_now,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.engine = engine
        self.sources = sources
        self.settings = settings
        self.owner = leases.this_process()
        # set on a signal: take no new work, cut retry waits short, record the page in flight and stop
        self.stopping = threading.Event()
        self.senders = Senders(self.stopping, transport)
        self.history = RunLog(engine, now)

    def now(self) -> datetime:
        return self.history.now()

    def close(self) -> None:
        self.senders.close()
        self.sources.close()

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
        self.history.record_deferred()
        try:
            with leases.hold(self.engine, audience.id, self.owner, str(audience)) as lost:
                return self._run_leased(audience, options, lost)
        except leases.Busy as busy:
            message = f"{audience} is being synced by {busy.holder}; try again when it finishes"
            log.warning(
                "%s",
                message,
                extra={"action": "audience_busy", **audience_fields(audience), "outcome": RunOutcome.BUSY},
            )
            return [Result(audience.name, None, RunOutcome.BUSY, error=message)]
        except sa.exc.DBAPIError as exc:  # e.g. lost mid-run, and with it the run's temporary members table
            reason = f"the state database failed during the run: {first_line(exc)}"
            return [self._audience_failed(audience, options, reason, "state_failed")]
        except SyncError:
            raise
        except Exception as exc:  # a driver's failure that is no DBAPI error, or a defect: the others go on
            reason = f"the run failed: {type(exc).__name__}: {first_line(exc)}"
            return [self._audience_failed(audience, options, reason, "run_crashed", exc)]

    def _audience_failed(
        self, audience: Audience, options: Options, reason: str, action: str, crash: Exception | None = None
    ) -> Result:
        """Log (a `crash` with its traceback) and record a run that failed the audience as a whole."""
        message = f"{audience}: {reason}"
        log.error(
            "%s",
            message,
            exc_info=crash,
            extra={"action": action, **audience_fields(audience), "reason": reason},
        )
        if not options.dry_run:
            self.history.audience_run(audience.id, RunOutcome.FAILED, message)
        return Result(audience.name, None, RunOutcome.FAILED, error=message)

    def _invalid_audience(self, audience_id: int, name: str, problem: str, options: Options) -> Result:
        """Log and record an audience whose row is invalid (status shows the reason)."""
        log.error(
            "%s",
            problem,
            extra={
                "action": "audience_invalid",
                "audience": name,
                "audience_id": audience_id,
                "outcome": RunOutcome.INVALID,
                "reason": problem,
            },
        )
        if not options.dry_run:
            self.history.audience_run(audience_id, RunOutcome.INVALID, problem)
        return Result(name, None, RunOutcome.INVALID, error=problem)

    def _run_leased(self, audience: Audience, options: Options, lost: threading.Event) -> list[Result]:
        started = self.now()
        # This connection holds the run's staged members (a temporary table): the connections' threads
        # read their diff through it and write with connections of their own.
        with self.engine.connect() as conn, dropping_stage(conn):
            try:
                source = self.sources.engine(conn, audience)
            except ConfigError as exc:
                return [self._invalid_audience(audience.id, audience.name, str(exc), options)]
            connections, results = self._connections(conn, audience, options)
            if not connections or self.stopping.is_set():
                return results
            try:
                timeout = self.settings.query_timeout
                staged = stage_members(conn, source, audience, timeout, stopping=self.stopping)
            except SourceError as exc:
                conn.rollback()
                links = [link for link, _ in connections]
                return results + self._query_failed(audience, links, started, exc, options)
            if not options.dry_run:  # a dry run writes nothing (a SQLite write lock would block others)
                if options.resend:
                    for link, _ in connections:
                        state.forget_connection(conn, audience.id, link.destination_id)
                store_key(conn, audience)
            base = staged_counts(audience, staged)
            share = self.settings.rejected_share
            runs = [
                ConnectionRun(audience, link, destination, options, started, base, lost, self.stopping, share)
                for link, destination in connections
            ]
            if options.dry_run:
                reads = SharedReads(conn, keep_transaction=True)
                results += [sync_connection(run, conn, reads, self._sink(run), self.history) for run in runs]
                conn.rollback()
                return results
            conn.commit()
            reads = SharedReads(conn)
            with ThreadPoolExecutor(len(runs), thread_name_prefix=f"aud{audience.id}") as pool:
                results += pool.map(lambda run: self._sync_in_own_connection(run, reads), runs)
            return results

    def _sync_in_own_connection(self, run: ConnectionRun, reads: SharedReads) -> Result:
        with self.engine.connect() as conn:
            return sync_connection(run, conn, reads, self._sink(run), self.history)

    def _sink(self, run: ConnectionRun) -> Sink:
        if run.options.dry_run:
            return DryRun(run.options.out, self.now)
        if run.options.baseline:
            return Baseline()
        return Delivering(self.senders.get(run.destination), self.now)

    def _query_failed(
        self, audience: Audience, links: list[Link], started: datetime, error: SourceError, options: Options
    ) -> list[Result]:
        """Log, and (unless dry) record for each connection, a run that its audience's query failed, or that a
        signal interrupted."""
        stopped = isinstance(error, SourceInterrupted)  # nothing went wrong
        fields = {"action": "query_interrupted" if stopped else "query_failed", "reason": str(error)}
        log.log(
            logging.WARNING if stopped else logging.ERROR,
            "%s",
            error,
            extra=fields | audience_fields(audience),
        )
        outcome = RunOutcome.INTERRUPTED if stopped else RunOutcome.FAILED
        recorded = []
        for link in links:
            result = Result(audience.name, link.destination_name, outcome, {}, str(error))
            ended = Finished(
                audience.id, str(audience), link.destination_id, link.destination_name, started, result
            )
            recorded.append(self.history.finish(ended, dry_run=options.dry_run))
        return recorded

    def _connections(
        self, conn: sa.Connection, audience: Audience, options: Options
    ) -> tuple[Usable, list[Result]]:
        """The audience's usable connections, and a result for each invalid one."""
        usable: Usable = []
        invalid: list[Result] = []
        for row in connection_rows(conn, audience.id):
            if options.destinations and row.name not in options.destinations:
                continue
            if row.enabled is False:  # None: the destination row is missing, which load_connection reports
                log.info(
                    "%s: destination %r is disabled; skipped",
                    audience,
                    row.name,
                    extra={
                        "action": "destination_disabled",
                        **audience_fields(audience),
                        "destination": row.name,
                        "destination_id": row.destination_id,
                    },
                )
                continue
            try:
                link, destination = load_connection(conn, audience, row, allow_new_key=options.resend)
            except ConfigError as exc:
                invalid.append(self._invalid_connection(audience, row, str(exc), options))
                continue
            if (
                options.initial_only
                and not options.resend
                and state.initial_completed(conn, audience.id, row.id)
            ):
                continue
            usable.append((link, destination))
        return usable, invalid

    def _invalid_connection(
        self, audience: Audience, row: sa.Row[object], problem: str, options: Options
    ) -> Result:
        result = Result(audience.name, None, RunOutcome.INVALID, error=problem)
        if row.id is None:  # no destination to record a run for (status shows it by itself): only logged
            log.error(
                "%s",
                problem,
                extra={
                    "action": "connection_invalid",
                    **audience_fields(audience),
                    "destination_id": row.destination_id,
                    "outcome": RunOutcome.INVALID,
                    "reason": problem,
                },
            )
            return result
        result.destination = row.name
        ended = Finished(audience.id, str(audience), row.id, row.name, self.now(), result)
        return self.history.finish(ended, dry_run=options.dry_run)
