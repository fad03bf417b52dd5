"""The `audience-sync` command line: the only module that parses argv."""

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from sync import database, logs, process, views
from sync.errors import SyncError
from sync.settings import Settings, log_format_from_env

if TYPE_CHECKING:
    from sync.runner import Runner
    from sync.sources import Sources

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
    parser.set_defaults(log_level=logging.INFO)
    commands = parser.add_subparsers(dest="command", required=True)
    db = commands.add_parser("db", help="state database schema").add_subparsers(
        dest="db_command", required=True
    )
    db.add_parser("upgrade", help="create or migrate the tables (Alembic upgrade head)").set_defaults(
        func=_upgrade
    )
    _sync_commands(commands)
    _operator_commands(commands)
    sandbox = commands.add_parser(
        "sandbox", help="serve receivers that answer like Everflow, Refersion and Segment, on loopback"
    )
    sandbox.add_argument(
        "--port", type=int, default=8870, help="Everflow's port; Refersion and Segment take the next two"
    )
    sandbox.set_defaults(func=_sandbox)
    demo = commands.add_parser(
        "demo", help="a first run against the sandbox, on a demo SQLite file of its own (make run)"
    )
    demo.add_argument("--file", default="audience-sync-demo.db", metavar="PATH", help="the demo database")
    demo.set_defaults(func=_demo, log_level=logging.WARNING)  # the demo tells its own story
    return parser


def _sync_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    run = commands.add_parser("run", help="one sync cycle now")
    _selection(run)
    run.add_argument(
        "--allow-mass-exit", action="store_true", help="release connections held by the exit guard"
    )
    run.set_defaults(func=_sync)
    initial = commands.add_parser(
        "initial", help="the initial sync of connections that have not completed one"
    )
    _selection(initial)
    how = initial.add_mutually_exclusive_group()
    how.add_argument("--resend", action="store_true", help="forget the accepted state and send every member")
    how.add_argument(
        "--baseline",
        action="store_true",
        help="record the current members as accepted and send nothing (the destination holds them already: "
        "a move from Segment Engage); previews the counts first",
    )
    initial.add_argument("--yes", action="store_true", help="with --baseline: record without asking")
    initial.set_defaults(func=_sync)
    commands.add_parser("daemon", help="run on the schedule until SIGTERM").set_defaults(func=_daemon)


def _operator_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    status = commands.add_parser(
        "status", help="every connection's state and last run; exit 1 if one needs attention"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_status)
    commands.add_parser(
        "check", help="validate every configuration row and audience query; exit 2 on problems"
    ).set_defaults(func=_check)
    explain = commands.add_parser("explain", help="one user's membership and what each destination accepted")
    explain.add_argument("user_id", metavar="USER_ID")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.set_defaults(func=_explain)
    forget = commands.add_parser(
        "forget", help="privacy deletion: tell each destination, then drop the user's state"
    )
    forget.add_argument("user_id", metavar="USER_ID")
    forget.set_defaults(func=_forget)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_format = log_format_from_env()
    logs.configure(log_format, args.log_level)
    try:
        return int(args.func(args))
    except SyncError as exc:
        if log_format == "json":  # the last line is a JSON object like every other
            log.error("%s", exc, extra={"action": "command_failed"})
        else:
            print(f"audience-sync: {exc}", file=sys.stderr)
        return 2


def _upgrade(_args: argparse.Namespace) -> int:
    url = Settings.from_env().database_url
    database.upgrade(url)
    print(f"{database.describe(url)} is at the newest schema", file=sys.stderr)
    return 0


def _state() -> tuple[Settings, sa.Engine]:
    """The settings and the migrated state database, for the commands that use it."""
    settings = Settings.from_env()
    engine = database.create_engine(settings.database_url, settings.pool_recycle)
    log.info(
        "state database: %s", database.describe(settings.database_url), extra={"action": "state_database"}
    )
    database.check_migrated(engine, settings.database_url)
    return settings, engine


def _source(engine: sa.Engine, settings: Settings) -> "Sources":
    """Where audience queries run: an audience's `sources` row, else SYNC_SOURCE_URL or the state database."""
    from sync.sources import Sources

    default = engine
    if settings.source_url:
        default = database.create_engine(settings.source_url, settings.pool_recycle, source=True)
    return Sources(default, settings.pool_recycle)


def _runner() -> "Runner":
    from sync.runner import Runner

    settings, engine = _state()
    database.check_writable(engine, settings.database_url)
    return Runner(engine, _source(engine, settings), settings)


def _daemon(_args: argparse.Namespace) -> int:
    from sync.scheduler import Daemon

    process.one_malloc_arena()
    runner = _runner()
    try:
        Daemon(runner).start()
    finally:
        runner.close()
    return 0


def _sync(args: argparse.Namespace) -> int:
    """`run` and `initial`."""
    from sync.runs import Options

    if getattr(args, "baseline", False):
        return _baseline(args)
    runner = _runner()
    try:
        received = process.stop_on_signals(runner)
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
            with views.progress() as bars:
                options.progress = views.bars(bars)
                results = runner.run(options)
    finally:
        runner.close()
    views.summary(results, args.dry_run)
    if received:
        return 128 + received[0]
    return 0 if all(result.good for result in results) else 1


def _baseline(args: argparse.Namespace) -> int:
    """`initial --baseline`: preview what would be recorded, ask (or take --yes), then record it."""
    from sync.runs import Options

    runner = _runner()
    try:
        options = Options(args.audience, args.destination, initial_only=True, baseline=True, dry_run=True)
        preview = runner.run(options)
        views.baseline_preview(preview)
        if args.dry_run or not any(result.good for result in preview):
            return 0 if all(result.good for result in preview) else 1
        if not _confirmed(args.yes, sum(result.counts.get("to_send", 0) for result in preview)):
            return 2
        options.dry_run = False
        results = runner.run(options)
    finally:
        runner.close()
    views.summary(results, dry_run=False)
    return 0 if all(result.good for result in results) else 1


def _confirmed(yes: bool, members: int) -> bool:
    """--yes, or a `y` typed at the terminal; off a terminal without --yes, nothing is recorded."""
    if yes:
        return True
    if not sys.stdin.isatty():
        print("audience-sync: nothing recorded: add --yes to baseline without a terminal", file=sys.stderr)
        return False
    answer = input(f"Record {members} member(s) as accepted without sending anything? [y/N] ")
    if answer.strip().lower() in ("y", "yes"):
        return True
    print("nothing recorded", file=sys.stderr)
    return False


def _status(args: argparse.Namespace) -> int:
    from sync.status import connection_status, needs_attention

    settings, engine = _state()
    with engine.connect() as conn:
        rows = connection_status(conn, settings)
    if args.json:
        views.show_json(rows)
    else:
        views.status(rows)
    return 1 if any(needs_attention(row) for row in rows) else 0


def _check(_args: argparse.Namespace) -> int:
    from sync.check import find_problems

    settings, engine = _state()
    with engine.connect() as conn:
        found = find_problems(conn, _source(engine, settings), settings)
    views.check(found)
    return 2 if found.problems else 0


def _explain(args: argparse.Namespace) -> int:
    from sync.explain import explain_user

    settings, engine = _state()
    with engine.connect() as conn:
        entries = explain_user(conn, _source(engine, settings), args.user_id, settings.query_timeout)
    if args.json:
        views.show_json(entries)
    else:
        views.explain(args.user_id, entries)
    return 0


def _forget(args: argparse.Namespace) -> int:
    from sync.forget import forget_user
    from sync.runs import utc_now

    _, engine = _state()
    report, state_failure = forget_user(engine, args.user_id, utc_now())
    views.forget(args.user_id, report, state_failure)
    return 1 if state_failure or any(line["outcome"] == "failed" for line in report) else 0


def _sandbox(args: argparse.Namespace) -> int:
    port = args.port
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


def _demo(args: argparse.Namespace) -> int:
    from sync.demo import run_demo

    return 0 if run_demo(Path(args.file).resolve(), sys.stdout) else 1
