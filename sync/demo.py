"""`audience-sync demo` (`make run`): a first run on a SQLite file of its own, against the sandbox; and
`audience-sync sandbox`, the receivers alone.

It seeds a customers table, one audience and one destination of each kind pointing at the sandbox's
receivers, runs the initial sync, changes a few customers, runs again and shows status and what arrived.
It never touches the database SYNC_DATABASE_URL names.
"""

import os
import signal
from pathlib import Path
from typing import TextIO

import sqlalchemy as sa

from sync import database, views
from sync.reconcile import Options as ReconcileOptions
from sync.reconcile import Reconciler
from sync.runner import Options, Result, Runner
from sync.sandbox import EverflowServer, RefersionServer, SegmentServer
from sync.settings import Cadence, Settings
from sync.sources import Sources
from sync.status import connection_status

CUSTOMERS = [
    ("c1", "ada@example.com", "Ada", "Lovelace", "United Kingdom", "tx-1", 120.0),
    ("c2", "grace@example.com", "Grace", "Hopper", "USA", "tx-2", 80.5),
    ("c3", "alan@example.com", "Alan", "Turing", "GB", "tx-3", 42.0),
    ("c4", "edsger@example.com", "Edsger", "Dijkstra", "Netherlands", "tx-4", 15.0),
]
AUDIENCE = (
    "SELECT user_id, email, first_name, last_name, country, transaction_id, total FROM customers "
    "WHERE total >= 40"
)
DEMO_EVENTS = {
    "1": "Audience Entered",
    "2": "Audience Exited",
}  # the advertiser events as Everflow names them
REPORTING_KEY_ENV = "AUDIENCE_SYNC_DEMO_REPORTING_KEY"


def serve_sandbox(port: int, out: TextIO, err: TextIO) -> int:
    """`audience-sync sandbox`: the receivers on loopback ports `port` to `port + 2` until SIGINT or SIGTERM;
    the exit code."""
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # before the servers' threads start: they inherit it
    try:
        with (
            EverflowServer(port=port) as everflow,
            RefersionServer(port=port + 1) as refersion,
            SegmentServer(port=port + 2) as segment,
        ):
            out.write(f"Everflow postbacks:  tracking_domain {everflow.url}  network_id 1\n")
            out.write(
                f"Everflow reports:    reporting_api_base {everflow.url}/v1  reporting key "
                f"{everflow.reports.api_key} (in the variable reporting_api_key_env names)\n"
            )
            out.write(f"Refersion API v2:    api_base {refersion.url}/v2  api key pub.sec\n")
            out.write(f"Segment partner:     endpoint {segment.url}  api key key\n")
            out.write("each request is logged; Ctrl-C stops the sandbox\n")
            out.flush()
            signal.sigwait(stop)
    except OSError as exc:
        err.write(f"audience-sync: cannot listen on 127.0.0.1 ports {port}-{port + 2}: {exc.strerror}\n")
        return 2
    return 0


def run_demo(path: Path, out: TextIO) -> bool:
    """Seed `path` afresh, sync twice against the sandbox, tell `out` what happened; True if all went ok."""
    path.unlink(missing_ok=True)
    url = f"sqlite:///{path}"
    database.upgrade(url)
    engine = database.create_engine(url)
    settings = Settings(url, None, Cadence.parse("2h-3h", "interval"), 60.0, 600.0)
    runner = Runner(engine, Sources(engine), settings)
    try:
        with EverflowServer(events=DEMO_EVENTS) as everflow, RefersionServer() as refersion:
            # the sandbox's Network API key, for reconcile to read Everflow's conversion report with
            os.environ[REPORTING_KEY_ENV] = everflow.reports.api_key
            _seed(engine, everflow.url, refersion.url)
            out.write(
                f"demo state database: {path}\nsandbox: Everflow {everflow.url}, Refersion {refersion.url}\n"
            )
            out.write("\n1. the initial sync: every member entered (true)\n")
            good = _report(runner.run(Options(initial_only=True)), out)
            with engine.begin() as conn:  # c4 buys more and enters; c2's total drops and c2 leaves
                conn.exec_driver_sql("UPDATE customers SET total = 99.0 WHERE user_id = 'c4'")
                conn.exec_driver_sql("UPDATE customers SET total = 10.0 WHERE user_id = 'c2'")
            out.write(
                "\n2. c4 qualifies, c2 no longer does: the next run sends only that (c4 true, c2 false)\n"
            )
            good = _report(runner.run(Options()), out) and good
            out.write("\nEverflow received these postbacks (transaction_id, advertiser event id):\n")
            for request in everflow.requests:
                query = request.query
                out.write(f"  {query.get('transaction_id')}  event {query.get('adv_event_id')}\n")
            out.write("Refersion holds these affiliates:\n")
            for affiliate in refersion.affiliates.values():
                email, status = affiliate["email"], affiliate["status"]
                out.write(f"  {email:<20} {status:<9} country {affiliate.get('country')}\n")
            out.write("\n3. reconcile: the destinations' own records against what they accepted\n")
            good = _reconcile(engine, settings, out) and good
    finally:
        runner.close()
    with engine.connect() as conn:
        views.status(connection_status(conn, settings))
    engine.dispose()
    out.write(f"\nInspect it: SYNC_DATABASE_URL=sqlite:///{path} .venv/bin/audience-sync status\n")
    return good


def _seed(engine: sa.Engine, everflow_url: str, refersion_url: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE customers (user_id TEXT, email TEXT, first_name TEXT, last_name TEXT, "
            "country TEXT, transaction_id TEXT, total REAL)"
        )
        conn.execute(
            sa.text("INSERT INTO customers VALUES (:u, :e, :f, :l, :c, :t, :total)"),
            [dict(zip(("u", "e", "f", "l", "c", "t", "total"), row, strict=True)) for row in CUSTOMERS],
        )
        conn.execute(
            sa.text("INSERT INTO audiences (name, query) VALUES ('Big Spenders', :q)"), {"q": AUDIENCE}
        )
        everflow = (
            f'{{"tracking_domain": "{everflow_url}", "network_id": "1", '
            '"event_mapping": {"Audience Entered": 1, "Audience Exited": 2}, "params": {"amount": "total"}, '
            f'"reporting_api_key_env": "{REPORTING_KEY_ENV}", "reporting_api_base": "{everflow_url}/v1"}}'
        )
        refersion = f'{{"api_base": "{refersion_url}/v2", "on_exit": "disable", "status": "ACTIVE"}}'
        conn.execute(
            sa.text(
                "INSERT INTO destinations (name, kind, api_key, settings) VALUES "
                "('Everflow (sandbox)', 'everflow', NULL, :e), "
                "('Refersion (sandbox)', 'refersion', 'pub.sec', :r)"
            ),
            {"e": everflow, "r": refersion},
        )
        conn.exec_driver_sql(
            "INSERT INTO audience_destinations (audience_id, destination_id) "
            "SELECT a.id, d.id FROM audiences a, destinations d"
        )


def _reconcile(engine: sa.Engine, settings: Settings, out: TextIO) -> bool:
    """Reconcile every connection; True when none found anything amiss (one that cannot be verified says
    why, and is no failure of the demo)."""
    reconciler = Reconciler(engine, settings)
    try:
        found = reconciler.run(ReconcileOptions())
    finally:
        reconciler.close()
    for one in found:
        counts = ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in one.counts.items() if n)
        out.write(f"  {one.audience} -> {one.destination}: {one.outcome} ({one.reason or counts})\n")
    return all(one.outcome in ("ok", "cannot verify") for one in found)


def _report(results: list[Result], out: TextIO) -> bool:
    for result in results:
        counts = f"entered {result.counts.get('entered', 0)}, exited {result.counts.get('exited', 0)}"
        out.write(f"  {result.audience} -> {result.destination}: {result.outcome} ({counts})")
        out.write(f": {result.error}\n" if result.error else "\n")
    return all(result.good for result in results)
