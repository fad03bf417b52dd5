"""`audience-sync reconcile`: what each destination's own records say of what it accepted, kept per user, and
with `--repair` the changes that make the destination match membership again, queued for the next run.

store.py      the users to check, their outcomes, the repairs (users marked in doubt), the reconcile runs
refersion.py  Refersion's affiliate list, matched to the state by affiliate code (or email)
everflow.py   Everflow's conversion report, through sync.destinations.everflow_reports

Reading sends no write request to a destination: the repairs are state marks, which the next run delivers
with every guarantee a run gives (lookups first, the mass-exit guard, retries, in-doubt handling).
Transactions: each connection's findings are committed in batches on a connection of the reconcile's own.
"""

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa

from sync import leases, metrics
from sync.audiences import Audience, load_audiences
from sync.connections import Link, connection_rows, load_connection
from sync.destinations.base import Destination
from sync.destinations.everflow import Everflow
from sync.destinations.refersion import Refersion
from sync.errors import ConfigError
from sync.reconcile import everflow, refersion, store
from sync.reconcile.store import CONFIRMED, MISSING, OUTCOMES, Finding
from sync.runs import utc_now
from sync.senders import Senders
from sync.settings import Settings
from sync.tables import audiences

log = logging.getLogger(__name__)
BATCH = 500  # findings written per transaction
SEGMENT = (
    "the Segment transport has no read API: what a Segment destination did with a message cannot be read back"
)
COUNTS = (*OUTCOMES, "not_ours")


@dataclass
class Options:
    audiences: list[str] = field(default_factory=list)  # names; empty means all
    destinations: list[str] = field(default_factory=list)
    repair: bool = False
    allow_mass_repair: bool = False
    # each user not confirmed, for the command to show; the daemon shows none, so it keeps only counts
    list_users: bool = True


@dataclass
class Found:
    """One connection's reconcile: whether its destination could be read, and what it found."""

    audience: str
    destination: str
    audience_id: int
    destination_id: int
    reason: str | None = None  # why the destination could not be read (verifiable: false)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    users: list[dict[str, Any]] = field(default_factory=list)  # every user whose outcome is not confirmed
    repairs: int = 0  # repairs queued for the next run
    held: str | None = None  # why the repairs were not queued

    @property
    def verifiable(self) -> bool:
        return self.reason is None

    @property
    def outcome(self) -> str:
        if not self.verifiable:
            return "cannot verify"
        if self.held:
            return "held"
        if self.repairs:
            return "repairing"
        drifted = any(self.counts[name] for name in OUTCOMES if name != CONFIRMED)
        return "drifted" if drifted else "ok"

    def as_json(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"audience": self.audience, "destination": self.destination}
        shown |= {"verifiable": self.verifiable, "outcome": self.outcome}
        if self.reason:
            shown["reason"] = self.reason
        shown |= {"counts": self.counts, "users": self.users, "repairs_queued": self.repairs}
        if self.held:
            shown["held"] = self.held
        return shown


Connection = tuple[Audience, Link, Destination]


class Reconciler:
    """Reconciles the selected connections, one destination at a time; its Senders pace the reads with the
    runs' requests when the daemon shares them."""

    def __init__(
        self,
        engine: sa.Engine,
        settings: Settings,
        senders: Senders | None = None,
        now: Callable[[], datetime] = utc_now,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.own_senders = senders is None
        self.senders = senders or Senders(threading.Event(), transport)
        self.transport = self.senders.transport  # Everflow's reports are read with a client of their own
        self.now = now

    def close(self) -> None:
        if self.own_senders:
            self.senders.close()

    def run(self, options: Options) -> list[Found]:
        with self.engine.connect() as conn:
            chosen, results = self._connections(conn, options)
        by_destination: dict[int, list[Connection]] = {}
        for audience, link, destination in chosen:
            by_destination.setdefault(destination.id, []).append((audience, link, destination))
        for connections in by_destination.values():
            results += self._destination(connections, options)
        return results

    def _connections(self, conn: sa.Connection, options: Options) -> tuple[list[Connection], list[Found]]:
        """The selected enabled connections, and a Found for each one whose rows are invalid."""
        valid, problems = load_audiences(conn)
        chosen: list[Connection] = []
        invalid: list[Found] = []
        for audience in valid:
            for row in _selected(conn, audience.id, audience.name, options):
                try:
                    link, destination = load_connection(conn, audience, row)
                except ConfigError as exc:
                    name = row.name or f"id {row.destination_id} (missing)"
                    invalid.append(Found(audience.name, name, audience.id, row.destination_id, str(exc)))
                    continue
                chosen.append((audience, link, destination))
        for audience_id, problem in problems.items():  # named or not, an invalid audience is said
            name = str(conn.scalar(sa.select(audiences.c.name).where(audiences.c.id == audience_id)))
            for row in _selected(conn, audience_id, name, options):
                where = row.name or f"id {row.destination_id} (missing)"
                invalid.append(Found(name, where, audience_id, row.destination_id, problem))
        return chosen, invalid

    def _destination(self, connections: list[Connection], options: Options) -> list[Found]:
        """Reconcile one destination's connections (its records are read once for them all)."""
        started = self.now()
        destination = connections[0][2]
        found = [
            Found(a.name, link.destination_name, a.id, link.destination_id) for a, link, _ in connections
        ]
        with self.engine.connect() as conn:
            if destination.transport is not None:
                for one in found:
                    one.reason = SEGMENT
            elif isinstance(destination, Refersion):
                self._refersion(conn, destination, found, options)
            elif isinstance(destination, Everflow):
                for one, (_, link, _) in zip(found, connections, strict=True):
                    self._everflow(conn, destination, link, one, options)
            for one in found:
                self._finish(conn, one, started)
        return found

    def _refersion(
        self, conn: sa.Connection, destination: Refersion, found: list[Found], options: Options
    ) -> None:
        try:
            read_at = self.now()
            unsure = refersion.read_list(conn, destination, self.senders.get(destination))
            not_ours = refersion.not_ours(conn, destination.id)
            conn.commit()
            for one in found:
                one.counts["not_ours"] = not_ours
                judged = refersion.findings(conn, _ids(one), destination, read_at, unsure)
                self._keep(conn, one, judged, options)
        except store.Unreadable as exc:
            for one in found:
                one.reason = str(exc)
        finally:
            conn.rollback()
            conn.execute(sa.schema.DropTable(refersion.listed, if_exists=True))
            conn.commit()

    def _everflow(
        self, conn: sa.Connection, destination: Everflow, link: Link, one: Found, options: Options
    ) -> None:
        one.reason = everflow.cannot_verify(destination)
        if one.reason:
            return
        grace = timedelta(seconds=self.settings.reconcile_grace)
        reading = {"transport": self.transport, "stopping": self.senders.stopping}
        findings = everflow.findings(conn, _ids(one), destination, link, self.now(), grace, **reading)
        try:
            self._keep(conn, one, findings, options)
        except store.Unreadable as exc:
            one.reason = str(exc)

    def _keep(self, conn: sa.Connection, one: Found, findings: Iterable[Finding], options: Options) -> None:
        """Count and store the findings, a batch at a time; with --repair, queue their repairs."""
        ids, now = _ids(one), self.now()
        batch: list[Finding] = []
        repairs: list[Finding] = []
        for finding in findings:
            if finding.outcome:
                one.counts[finding.outcome] += 1
            if finding.outcome != CONFIRMED and options.list_users:
                reason = "; ".join(
                    filter(None, (finding.reason, finding.repair and f"repair: {finding.repair}"))
                )
                outcome = finding.outcome or "unverified"
                one.users.append({"user_id": finding.user_id, "outcome": outcome, "reason": reason})
            if finding.repair and options.repair:
                repairs.append(finding)
            batch.append(finding)
            if len(batch) >= BATCH:
                store.record_findings(conn, ids, batch, now)
                conn.commit()
                batch = []
        store.record_findings(conn, ids, batch, now)
        conn.commit()
        if options.repair and repairs:
            self._repair(conn, one, repairs, options)

    def _repair(self, conn: sa.Connection, one: Found, repairs: list[Finding], options: Options) -> None:
        """Mark the users to repair in doubt (under the audience's lease, so no run is halfway through
        them), unless they are more than SYNC_REPAIR_SHARE of the connection's users."""
        settled = store.settled_count(conn, _ids(one))
        share = self.settings.repair_share
        if len(repairs) > share * settled and not options.allow_mass_repair:
            one.held = (
                f"held: the repair would change {len(repairs)} of {settled} users, more than "
                f"SYNC_REPAIR_SHARE ({share:.0%}); run `audience-sync reconcile --repair "
                "--allow-mass-repair` if that is right"
            )
            return
        label = f"audience {one.audience!r} (id {one.audience_id})"
        try:
            with leases.hold(self.engine, one.audience_id, leases.this_process(), label):
                users = [f.user_id for f in repairs]
                gone = [f.user_id for f in repairs if f.outcome == MISSING]
                store.queue_repairs(conn, _ids(one), users, gone, self.now())
                conn.commit()
        except leases.Busy as busy:
            one.held = f"not queued: {label} is being synced by {busy.holder}; run reconcile --repair again"
            return
        one.repairs = len(repairs)

    def _finish(self, conn: sa.Connection, one: Found, started: datetime) -> None:
        """Record, log and observe the connection's reconcile."""
        finished = self.now()
        row = {**_ids(one), "started_at": started, "finished_at": finished, "outcome": one.outcome}
        row |= {**one.counts, "repairs": one.repairs, "error": one.reason or one.held}
        store.record_run(conn, row)
        conn.commit()
        counts = " ".join(f"{name}={n}" for name, n in one.counts.items())
        log.log(
            logging.INFO if one.outcome in ("ok", "cannot verify") else logging.WARNING,  # the metrics tell
            "reconcile %s -> %s: %s %s",
            one.audience,
            one.destination,
            one.outcome,
            counts,
            extra={"action": "reconcile_finished", **_ids(one), "outcome": one.outcome, **one.counts},
        )
        metrics.observe_reconcile(one.audience_id, one.destination_id, one.counts, one.verifiable)


def _ids(one: Found) -> dict[str, int]:
    return {"audience_id": one.audience_id, "destination_id": one.destination_id}


def _selected(conn: sa.Connection, audience_id: int, name: str, options: Options) -> Iterator[Any]:
    """The audience's enabled connection rows that `options` select."""
    if options.audiences and name not in options.audiences:
        return
    for row in connection_rows(conn, audience_id):
        if row.enabled is not False and not (options.destinations and row.name not in options.destinations):
            yield row
