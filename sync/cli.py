"""The `audience-sync` command line: the only module that parses argv."""

import argparse
import ctypes
import json
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from sync import database, logs
from sync.errors import SyncError
from sync.settings import Settings, log_format_from_env

if TYPE_CHECKING:
    from sync.runner import Runner

log = logging.getLogger("sync")


def _selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audience", action="append", default=[], metavar="NAME", help="only this audience")
    parser.add_argument(
        "--destination", action="append", default=[], metavar="NAME", help="only this destination"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the messages as JSON lines; send nothing"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audience-sync",
        description="Sync audiences defined as SQL queries to Everflow and Refersion: "
        "what entered since the last run as true, what left as false.",
        epilog="The state database is SYNC_DATABASE_URL (default sqlite:///audience-sync.db); "
        "docs/operator-guide.md covers production.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    db = commands.add_parser("db", help="state database schema").add_subparsers(
        dest="db_command", required=True
    )
    db.add_parser("upgrade", help="create or migrate the tables (Alembic upgrade head)")
    run = commands.add_parser("run", help="one sync cycle now")
    _selection(run)
    run.add_argument(
        "--allow-mass-exit", action="store_true", help="release connections held by the exit guard"
    )
    initial = commands.add_parser(
        "initial", help="the initial sync of connections that have not completed one"
    )
    _selection(initial)
    initial.add_argument(
        "--resend", action="store_true", help="forget the accepted state and send every member"
    )
    commands.add_parser("daemon", help="run on the schedule until SIGTERM")
    status = commands.add_parser("status", help="every connection's state and last run")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    commands.add_parser(
        "check", help="validate every configuration row and audience query; exit 2 on problems"
    )
    explain = commands.add_parser("explain", help="one user's membership and what each destination accepted")
    explain.add_argument("user_id", metavar="USER_ID")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    forget = commands.add_parser(
        "forget", help="privacy deletion: tell each destination, then drop the user's state"
    )
    forget.add_argument("user_id", metavar="USER_ID")
    sandbox = commands.add_parser(
        "sandbox", help="serve receivers that answer like Everflow, Refersion and Segment, on loopback"
    )
    sandbox.add_argument(
        "--port", type=int, default=8870, help="Everflow's port; Refersion and Segment take the next two"
    )
    demo = commands.add_parser(
        "demo", help="a first run against the sandbox, on a demo SQLite file of its own (make run)"
    )
    demo.add_argument("--file", default="audience-sync-demo.db", metavar="PATH", help="the demo database")
    return parser


def main(argv: Sequence[str] | None = None) -> int:  # noqa: C901 - split by the CLI work (issue 14.6)
    args = build_parser().parse_args(argv)
    if args.command == "daemon":
        _one_malloc_arena()
    if args.command == "sandbox":  # no state database of the operator's: no settings needed
        logs.configure("text")
        return _sandbox(args.port)
    if args.command == "demo":
        logs.configure("text", logging.WARNING)  # the demo tells its own story
        return _demo(args.file)
    log_format = log_format_from_env()
    logs.configure(log_format)
    try:
        settings = Settings.from_env()
        if args.command == "db":
            database.upgrade(settings.database_url)
            print(f"{database.describe(settings.database_url)} is at the newest schema", file=sys.stderr)
            return 0
        engine = database.create_engine(settings.database_url, settings.pool_recycle)
        log.info(
            "state database: %s", database.describe(settings.database_url), extra={"action": "state_database"}
        )
        database.check_migrated(engine, settings.database_url)
        if args.command == "status":
            return _status(engine, settings, args.json)
        if args.command == "check":
            return _check(engine, settings)
        if args.command == "explain":
            return _explain(engine, settings, args.user_id, args.json)
        if args.command == "forget":
            return _forget(engine, args.user_id)
        return _sync(engine, settings, args)
    except SyncError as exc:
        if log_format == "json":  # the last line is a JSON object like every other
            log.error("%s", exc, extra={"action": "command_failed"})
        else:
            print(f"audience-sync: {exc}", file=sys.stderr)
        return 2


def _one_malloc_arena() -> None:
    """On glibc, keep the daemon's malloc to one arena (as MALLOC_ARENA_MAX=1); call before threads start.

    glibc gives threads up to 8 arenas per CPU. The daemon's threads (the scheduler's, each run's connection
    and lease threads, the senders') take turns on the same pooled connections and caches, so memory freed
    in one arena is not reused by an allocation in another: with the heap in use flat, the daemon's RSS grew
    by about 0.4 MiB a minute in benchmarks/soak.py. With one arena it grows a third as fast.
    """
    try:
        glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or no such name
        glibc = False
    if glibc:
        m_arena_max = -8  # malloc.h
        ctypes.CDLL(None).mallopt(m_arena_max, 1)


def _source(engine: sa.Engine, settings: Settings) -> sa.Engine:
    """Where audience queries run: SYNC_SOURCE_URL, or the state database."""
    if not settings.source_url:
        return engine
    return database.create_engine(settings.source_url, settings.pool_recycle, source=True)


def _sync(engine: sa.Engine, settings: Settings, args: argparse.Namespace) -> int:
    from sync.runner import Options, Runner
    from sync.scheduler import Daemon

    database.check_writable(engine, settings.database_url)
    source = _source(engine, settings)
    runner = Runner(engine, source, settings)
    try:
        if args.command == "daemon":
            Daemon(runner).start()
            return 0
        received = _stop_on_signals(runner)
        options = Options(
            audiences=args.audience,
            destinations=args.destination,
            dry_run=args.dry_run,
            allow_mass_exit=getattr(args, "allow_mass_exit", False),
            initial_only=args.command == "initial",
            resend=getattr(args, "resend", False),
            out=sys.stdout if args.dry_run else None,
        )
        if args.dry_run or not sys.stderr.isatty():
            results = runner.run(options)
        else:
            with _progress() as bars:
                options.progress = _bars(bars)
                results = runner.run(options)
    finally:
        runner.close()
    _summary(results, args.dry_run)
    if received:
        return 128 + received[0]
    return 0 if all(result.good for result in results) else 1


def _stop_on_signals(runner: "Runner") -> list[int]:
    """SIGTERM, SIGINT or SIGHUP: finish the batch in flight and record it (the command then exits 128 + the
    signal's number); a second one: release the leases and exit at once. Returns the signals received."""
    received: list[int] = []
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()

    def act() -> None:  # in a thread: a handler runs in the main thread, wherever it was
        while True:
            signum = signals.get()
            name = signal.Signals(signum).name
            if received:
                log.warning("received %s again: exiting now", name, extra={"action": "exiting_now"})
                Console(stderr=True).show_cursor(True)  # a progress bar hid it (nothing off a terminal)
                runner.abandon()
                os._exit(128 + signum)
            received.append(signum)
            log.warning(
                "received %s: finishing the batch in flight; a second one exits at once",
                name,
                extra={"action": "stopping"},
            )
            runner.stopping.set()

    threading.Thread(target=act, name="signals", daemon=True).start()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, _frame: signals.put(signum))  # SimpleQueue.put is reentrant
    return received


def _summary(results: list[Any], dry_run: bool) -> None:
    if not results:
        print("nothing to sync: no enabled audience with an enabled connection matched", file=sys.stderr)
    for result in results:
        counts = " ".join(f"{k}={v}" for k, v in result.counts.items())
        where = result.audience + (f" -> {result.destination}" if result.destination else "")
        line = f"{'[dry run] ' if dry_run else ''}{where}: {result.outcome} {counts}".rstrip()
        print(line + (f" ({result.error})" if result.error else ""), file=sys.stderr)


def _status(engine: sa.Engine, settings: Settings, as_json: bool) -> int:
    from sync.status import connection_status, render

    with engine.connect() as conn:
        rows = connection_status(conn, settings)
    if as_json:
        print(json.dumps(rows, default=str, indent=2))
    else:
        render(rows)
    return 0


def _progress() -> Progress:
    """Bars per connection with count, elapsed time and ETA (the ETA follows the destination's rate limit)."""
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def _bars(bars: Progress) -> Callable[[str, int], Callable[[int], None]]:
    """A bar per connection: added when its run starts, advanced as its pages are recorded."""

    def start(label: str, total: int) -> Callable[[int], None]:
        task = bars.add_task(label, total=total)
        return lambda n: bars.advance(task, n)

    return start


def _check(engine: sa.Engine, settings: Settings) -> int:
    from sync.check import find_problems

    source = _source(engine, settings)
    with engine.connect() as conn:
        found = find_problems(conn, source, settings)
    for problem in found.problems:
        print(problem)
    for warning in found.warnings:
        print(f"warning: {warning}")
    for line in found.sources:
        print(line, file=sys.stderr)
    noted = f" and {len(found.warnings)} warning(s)" if found.warnings else ""
    if found.problems:
        print(f"{len(found.problems)} problem(s){noted} in {found.checked} rows checked", file=sys.stderr)
        return 2
    print(
        f"all {found.checked} rows are valid{noted}; every audience query runs and returns user_id",
        file=sys.stderr,
    )
    return 0


def _explain(engine: sa.Engine, settings: Settings, user_id: str, as_json: bool) -> int:
    from sync.explain import explain_user

    source = _source(engine, settings)
    with engine.connect() as conn:
        entries = explain_user(conn, source, user_id, settings.query_timeout)
    if as_json:
        print(json.dumps(entries, default=str, indent=2))
        return 0
    table = Table(title=f"user {user_id}")
    for column in ("audience", "destination", "member now", "destination accepted", "rejection"):
        table.add_column(column)
    for entry in entries:
        received = " (received by the postback endpoint)" if entry["accepted_means"] == "received" else ""
        accepted = (
            "never sent"
            if entry["accepted"] is None
            else (f"{str(entry['accepted']).lower()}{received} at {entry['accepted_at']:%Y-%m-%d %H:%M}")
        )
        rejection = entry["rejection"]
        table.add_row(
            entry["audience"],
            f"{entry['destination']}{'' if entry['enabled'] else ' (disabled)'}",
            entry["member_unknown"] or ("yes" if entry["member"] else "no"),
            accepted,
            "" if rejection is None else f"{str(rejection['value']).lower()}: {rejection['reason']}",
        )
    Console(markup=False, emoji=False).print(table)  # names, user ids and reasons are data, shown as is
    return 0


def _sandbox(port: int) -> int:
    from sync.sandbox import EverflowServer, RefersionServer, SegmentServer

    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # before the servers' threads start: they inherit it
    try:
        with (
            EverflowServer(port=port) as everflow,
            RefersionServer(port=port + 1) as refersion,
            SegmentServer(port=port + 2) as segment,
        ):
            print(f"Everflow postbacks:  tracking_domain {everflow.url}  network_id 1")
            print(f"Refersion API v2:    api_base {refersion.url}/v2  api key pub.sec")
            print(f"Segment partner:     endpoint {segment.url}  api key key")
            print("each request is logged; Ctrl-C stops the sandbox", flush=True)
            signal.sigwait(stop)
    except OSError as exc:
        print(
            f"audience-sync: cannot listen on 127.0.0.1 ports {port}-{port + 2}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    return 0


def _demo(file: str) -> int:
    from sync.demo import run_demo

    return 0 if run_demo(Path(file).resolve(), sys.stdout) else 1


def _forget(engine: sa.Engine, user_id: str) -> int:
    from sync.forget import forget_user
    from sync.runner import utc_now

    report, state_failure = forget_user(engine, user_id, utc_now())
    for line in report:
        print(f"{line['destination']}: {line['outcome']} ({line['detail']})")
    if state_failure:
        print(
            f"user {user_id!r} is still in the state tables ({state_failure}): run forget again",
            file=sys.stderr,
        )
        return 1
    failed = [line for line in report if line["outcome"] == "failed"]
    print(
        f"user {user_id!r} removed from the state tables"
        + (
            f", except at {', '.join(line['destination'] for line in failed)}: run forget again"
            if failed
            else ""
        ),
        file=sys.stderr,
    )
    return 1 if failed else 0
