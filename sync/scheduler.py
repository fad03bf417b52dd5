"""The daemon: one APScheduler job per enabled audience, on its cadence, re-reading the config tables."""

import contextlib
import logging
import os
import queue
import random
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import FrameType

import sqlalchemy as sa
from apscheduler.events import EVENT_SCHEDULER_STARTED
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.base import BaseTrigger

from sync import history, metrics, state
from sync.audiences import Audience, load_audiences
from sync.errors import first_line
from sync.logs import audience_fields
from sync.reconcile import COUNTS, Reconciler
from sync.reconcile import Options as ReconcileOptions
from sync.runner import Options, Runner
from sync.runs import RunOutcome
from sync.settings import Cadence

log = logging.getLogger(__name__)
RELOAD_JOB = "reload"
PRUNE_EVERY = timedelta(hours=1)


class CadenceTrigger(BaseTrigger):  # type: ignore[misc]
    """Fires `cadence` after the previous run, drawn anew each time; the first time after `last_run`."""

    def __init__(self, cadence: Cadence, last_run: datetime | None, rng: random.Random) -> None:
        self.cadence = cadence
        self.last_run = last_run
        self.rng = rng

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime:
        wait = timedelta(seconds=self.cadence.draw(self.rng))
        if previous_fire_time is not None:
            return previous_fire_time + wait
        if self.last_run is None:
            return now
        return max(now, self.last_run + wait)

    def __str__(self) -> str:
        return f"cadence[{self.cadence.low:g}s-{self.cadence.high:g}s]"


class Daemon:
    """Keeps the scheduler's jobs in step with the `audiences` table."""

    def __init__(self, runner: Runner, clock: Callable[[], float] = time.monotonic) -> None:
        self.runner = runner
        self.clock = clock
        self.executor = ThreadPoolExecutor(max_workers=4)
        self.scheduler = BlockingScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
            executors={"default": self.executor},
        )
        self.cadences: dict[int, Cadence] = {}
        self.rng = random.Random()
        self.last_reload: float | None = None  # when a reload last read the configuration (`clock`)
        self.reported: dict[int, str] = {}  # the problem last logged of each invalid audience
        self.jobs_lock = threading.Lock()  # a reload changes the jobs; a stop shuts the scheduler down
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()

    def start(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._queue_signal)
        # acted on from a thread of their own once the scheduler runs: a handler runs in the main thread,
        # where it may interrupt the scheduler halfway through its jobs
        self.scheduler.add_listener(
            lambda _: threading.Thread(target=self._on_signals, name="signals", daemon=True).start(),
            EVENT_SCHEDULER_STARTED,
        )
        self.reload()
        self.scheduler.add_job(
            self.reload,
            "interval",
            seconds=self.runner.settings.reload_interval,
            id=RELOAD_JOB,
            name="reload configuration",
        )
        self.scheduler.add_job(
            self.prune_history,
            "interval",
            seconds=PRUNE_EVERY.total_seconds(),
            next_run_time=self.runner.now(),  # and once at start
            id="prune",
            name="prune run history",
        )
        if self.runner.settings.reconcile_interval:
            every = self.runner.settings.reconcile_interval
            self.scheduler.add_job(
                reconcile,
                "interval",
                args=[self.runner],
                seconds=every,
                next_run_time=next_reconcile(self.runner, every),
                id="reconcile",
                name="reconcile with the destinations' records",
            )
        port = self.runner.settings.metrics_port
        if port:
            with self.runner.engine.connect() as conn:  # as the recorded runs left the gauges
                metrics.seed(history.last_runs(conn))
                metrics.accepted(history.accepted_members(conn))
                for run in history.last_reconciles(conn):
                    counts = {name: getattr(run, name) for name in COUNTS}
                    verifiable = run.outcome != "cannot verify"
                    metrics.observe_reconcile(run.audience_id, run.destination_id, counts, verifiable)
        address = self.runner.settings.metrics_address
        stop_metrics = metrics.serve(address, port, self.health) if port else None
        log.info("daemon started with %d audiences", len(self.cadences), extra={"action": "daemon_started"})
        try:
            self.scheduler.start()
            # the scheduler stopped on a signal: let runs in flight finish their page and record themselves
            self.executor.shutdown(wait=True)
        finally:
            if stop_metrics:
                stop_metrics()
        log.info("daemon stopped", extra={"action": "daemon_stopped"})

    def _queue_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signals.put(signum)  # SimpleQueue.put is reentrant

    def _on_signals(self) -> None:
        """SIGHUP: reload now. SIGTERM, SIGINT: stop taking work and let the runs in flight record their page;
        a second one: release the leases and exit at once."""
        while True:
            signum = self.signals.get()
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("received SIGHUP: reloading the configuration", extra={"action": "reload_requested"})
                threading.Thread(target=self.reload, name="reload", daemon=True).start()
            elif not self.runner.stopping.is_set():
                log.info(
                    "received %s: finishing the batch in flight; a second one exits at once",
                    name,
                    extra={"action": "daemon_stopping"},
                )
                self.runner.stopping.set()
                with self.jobs_lock:
                    self.scheduler.shutdown(wait=False)
            else:
                log.warning("received %s again: exiting now", name, extra={"action": "daemon_exiting_now"})
                self.runner.abandon()
                os._exit(128 + signum)

    def reload(self) -> None:
        """Add, reschedule and remove jobs to match the enabled audiences."""
        try:
            with self.runner.engine.connect() as conn:
                valid, problems = load_audiences(conn)
                last_runs = state.last_run_times(conn)
                connections = history.connections(conn)
                labelled = [(a.id, a.key, a.name) for a in valid]
                labelled += history.invalid_audiences(conn, problems, {a.key for a in valid})
        except sa.exc.OperationalError as exc:
            log.error(
                "cannot read the configuration: %s",
                exc.orig,
                extra={"action": "reload_failed", "reason": str(exc.orig)},
            )
            return
        self.last_reload = self.clock()
        # the invalid audiences' connections keep their series, which say `invalid`
        by_id = {audience_id: (key, name) for audience_id, key, name in labelled}
        metrics.describe(
            metrics.Described(row.audience_id, *by_id[row.audience_id], row.destination_id, row.destination)
            for row in connections
            if row.audience_id in by_id
        )
        for audience_id, problem in problems.items():  # once, and again when the problem changes
            if self.reported.get(audience_id) != problem:
                log.error(
                    "%s",
                    problem,
                    extra={
                        "action": "audience_invalid",
                        "audience_id": audience_id,
                        "outcome": "invalid",
                        "reason": problem,
                    },
                )
                self.runner.history.audience_run(audience_id, RunOutcome.INVALID, problem)  # status shows it
        self.reported = problems
        with self.jobs_lock:
            if not self.runner.stopping.is_set():  # the scheduler is shut down, or about to be
                self._schedule(valid, last_runs)

    def _schedule(self, valid: list[Audience], last_runs: dict[int, datetime]) -> None:
        wanted = {audience.id: audience for audience in valid}
        for audience_id in set(self.cadences) - set(wanted):
            self.scheduler.remove_job(str(audience_id))
            del self.cadences[audience_id]
            log.info(
                "audience id %s unscheduled",
                audience_id,
                extra={"action": "audience_unscheduled", "audience_id": audience_id},
            )
        for audience in valid:
            cadence = audience.cadence or self.runner.settings.interval
            if self.cadences.get(audience.id) == cadence:
                continue
            trigger = CadenceTrigger(cadence, last_runs.get(audience.id), self.rng)
            self.scheduler.add_job(
                self.run_audience,
                trigger,
                args=[audience.id],
                id=str(audience.id),
                name=audience.name,
                replace_existing=True,
            )
            self.cadences[audience.id] = cadence
            fields = audience_fields(audience)
            log.info(
                "%s scheduled (%s)",
                audience,
                trigger,
                extra={"action": "audience_scheduled", **fields, "cadence": str(cadence)},
            )
            if warning := cadence.warning(str(audience)):
                log.warning(
                    "%s", warning, extra={"action": "cadence_short", **fields, "cadence": str(cadence)}
                )

    def prune_history(self) -> None:
        """Delete the runs older than SYNC_HISTORY_RETENTION; each connection's last and last ok run stay."""
        before = self.runner.now() - timedelta(seconds=self.runner.settings.history_retention)
        try:
            deleted = history.prune(self.runner.engine, before)
        except sa.exc.DBAPIError as exc:
            reason = first_line(exc)
            log.error(
                "cannot prune the run history: %s",
                reason,
                extra={"action": "history_prune_failed", "reason": reason},
            )
            return
        log.info(
            "run history: deleted %d runs started before %s",
            deleted,
            before.isoformat(timespec="seconds"),
            extra={"action": "history_pruned", "deleted": deleted},
        )

    def health(self) -> str | None:
        """Why the daemon is not healthy (for /healthz), or None: the scheduler must be running (it stops on
        SIGTERM, while the runs in flight finish) and a reload must have read the configuration lately."""
        if not self.scheduler.running:
            return "the scheduler is not running"
        allowed = 3 * self.runner.settings.reload_interval
        if self.last_reload is None or self.clock() - self.last_reload > allowed:
            return f"no reload has read the configuration in the last {allowed:g}s"
        return None

    def run_audience(self, audience_id: int) -> None:
        """The job of an audience: one run, then its connections' accepted members for the metrics."""
        if self.runner.stopping.is_set():
            return
        with self.runner.engine.connect() as conn:
            valid, _ = load_audiences(conn)
        audience: Audience | None = next((a for a in valid if a.id == audience_id), None)
        if audience is None:
            return
        try:
            self.runner.run_audience(audience, Options())
        except Exception:
            log.exception(
                "run of %s failed", audience, extra={"action": "run_crashed", **audience_fields(audience)}
            )
        if self.runner.settings.metrics_port:
            # the state database down: the gauges keep their counts, and the run said what failed
            with contextlib.suppress(sa.exc.DBAPIError), self.runner.engine.connect() as conn:
                metrics.accepted(history.accepted_members(conn, audience.id), audience.id)


def next_reconcile(runner: Runner, every: float) -> datetime:
    """SYNC_RECONCILE_INTERVAL after the last reconcile began, at the earliest now; without one, an interval
    from now (a fresh daemon has nothing accepted to check yet)."""
    with runner.engine.connect() as conn:
        last = history.last_reconcile(conn)
    now = runner.now()
    return now + timedelta(seconds=every) if last is None else max(now, last + timedelta(seconds=every))


def reconcile(runner: Runner) -> None:
    """The daemon's reconcile of every connection: reads only (`reconcile --repair` queues repairs)."""
    if runner.stopping.is_set():
        return
    reconciler = Reconciler(runner.engine, runner.settings, runner.senders, runner.now)
    try:
        reconciler.run(ReconcileOptions(list_users=False))  # counts: the metrics and the run rows
    except Exception:
        log.exception("reconcile failed", extra={"action": "reconcile_crashed"})
