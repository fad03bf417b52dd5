"""The `audience-sync` command line: the only module that parses argv."""

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from sync import __version__, database, logs, names, process, views
from sync.errors import StateError, SyncError, first_line
from sync.settings import Settings, log_format_from_env, unknown_settings

if TYPE_CHECKING:
    from sync.runner import Runner
    from sync.sources import Sources

log = logging.getLogger("sync")
Handler = Callable[[argparse.Namespace], int]


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
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.set_defaults(log_level=logging.INFO)
    commands = parser.add_subparsers(dest="command", required=True)
    db = commands.add_parser("db", help="state database schema").add_subparsers(
        dest="db_command", required=True
    )
    db.add_parser("upgrade", help="create or migrate the tables (Alembic upgrade head)").set_defaults(
        func=_upgrade
    )
    db.add_parser("current", help="the state database's schema revision (Alembic current)").set_defaults(
        func=_current
    )
    db.add_parser("history", help="every migration, newest first (Alembic history)").set_defaults(
        func=_history
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


def _command(
    commands: "argparse._SubParsersAction[argparse.ArgumentParser]",
    name: str,
    help: str,
    func: Handler,
    json: bool = False,
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help)
    if json:
        parser.add_argument("--json", action="store_true", help="machine-readable output (ISO 8601 times)")
    parser.set_defaults(func=func)
    return parser


def _operator_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    status = "every connection's state and last run; exit 1 if one needs attention"
    _command(commands, "status", status, _status, json=True)
    check = "validate every configuration row and audience query; exit 2 on problems"
    connect = "also prove each destination's credentials with one harmless authenticated call"
    _command(commands, "check", check, _check, json=True).add_argument(
        "--connect", action="store_true", help=connect
    )
    _command(commands, "audiences", "the audiences: key, schedule, connections", _audiences, json=True)
    destinations = "the destinations: kind, transport, where the key comes from"
    _command(commands, "destinations", destinations, _destinations, json=True)
    runs = _command(commands, "runs", "the last runs, newest first", _runs, json=True)
    runs.add_argument("--audience", metavar="NAME", help="only this audience's runs")
    runs.add_argument("--limit", type=_positive, default=20, metavar="N", help="how many (default 20)")
    explain = "one user's membership and what each destination accepted"
    _command(commands, "explain", explain, _explain, json=True).add_argument("user_id", metavar="USER_ID")
    reconcile = commands.add_parser(
        "reconcile",
        help="read each destination's own records and report, per user, what they hold of what it accepted",
    )
    reconcile.add_argument(
        "--audience", action="append", default=[], metavar="NAME", help="only this audience"
    )
    reconcile.add_argument(
        "--destination", action="append", default=[], metavar="NAME", help="only this destination"
    )
    reconcile.add_argument(
        "--repair", action="store_true", help="queue the changes that make the destinations match membership"
    )
    reconcile.add_argument(
        "--allow-mass-repair",
        action="store_true",
        help="with --repair: queue them even for more than SYNC_REPAIR_SHARE of a connection's users",
    )
    reconcile.add_argument("--json", action="store_true", help="one JSON object (ISO 8601 times)")
    reconcile.set_defaults(func=_reconcile)
    forget = "privacy deletion: tell each destination, then drop the user's state"
    forget_parser = _command(commands, "forget", forget, _forget)
    forget_parser.add_argument("user_id", metavar="USER_ID")
    forget_parser.add_argument("--dry-run", action="store_true", help="show what would be sent and removed")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_format = log_format_from_env()
    logs.configure(log_format, args.log_level)
    for line in unknown_settings():
        log.warning("%s", line, extra={"action": "unknown_setting"})
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


def _current(_args: argparse.Namespace) -> int:
    url = Settings.from_env().database_url
    engine = database.create_engine(url)
    try:
        current, head = database.revisions(engine, url)
    finally:
        engine.dispose()
    if current is None:
        print(f"none: {database.describe(url)} is not migrated (run: audience-sync db upgrade)")
        return 1
    print(f"{current}{' (head)' if current == head else f' (head is {head}: run audience-sync db upgrade)'}")
    return 0


def _history(_args: argparse.Namespace) -> int:
    from alembic import command

    command.history(database.alembic_config(Settings.from_env().database_url))
    return 0


def _state(writes: bool = False) -> tuple[Settings, sa.Engine]:
    """The settings and the migrated state database, for the commands that use it; the commands that
    write to it say which it is (read-only ones keep stderr for what they show)."""
    settings = Settings.from_env()
    engine = database.create_engine(settings.database_url, settings.pool_recycle)
    if writes:
        log.info(
            "state database: %s", database.describe(settings.database_url), extra={"action": "state_database"}
        )
    database.check_migrated(engine, settings.database_url)
    return settings, engine


def _source(engine: sa.Engine, settings: Settings) -> "Sources":
    """Where audience queries run: an audience's `sources` row, else SYNC_SOURCE_URL or the state database."""
    from sync.sources import Sources

    url = settings.source_url
    default = database.create_engine(url, settings.pool_recycle, source=True) if url else engine
    return Sources(default, settings.pool_recycle)


def _runner() -> "Runner":
    from sync.runner import Runner

    settings, engine = _state(writes=True)
    database.check_writable(engine, settings.database_url)
    return Runner(engine, _source(engine, settings), settings)


def _daemon(_args: argparse.Namespace) -> int:
    from sync.check import log_rows
    from sync.scheduler import Daemon

    process.one_malloc_arena()
    runner = _runner()
    try:
        process.only_daemon_on_sqlite(runner.settings.database_url)
        with runner.engine.connect() as conn:
            log_rows(conn, runner.settings)
        Daemon(runner).start()
    finally:
        runner.close()
    return 0


def _sync(args: argparse.Namespace) -> int:
    """`run` and `initial` (and `initial --baseline`)."""
    from sync.runs import Options

    runner = _runner()
    try:
        with runner.engine.connect() as conn:
            chosen = names.resolve(conn, "audience", args.audience)
            destinations = names.resolve(conn, "destination", args.destination)
        options = Options(
            audiences=chosen,
            destinations=destinations,
            dry_run=args.dry_run,
            allow_mass_exit=getattr(args, "allow_mass_exit", False),
            initial_only=args.command == "initial",
            resend=getattr(args, "resend", False),
            baseline=getattr(args, "baseline", False),
        )
        if options.baseline:
            return process.baseline(runner, options, args.yes)
        return process.run_once(runner, options)
    finally:
        runner.close()


def _status(args: argparse.Namespace) -> int:
    from sync.status import connection_status, needs_attention

    settings, engine = _state()
    with engine.connect() as conn:
        rows = connection_status(conn, settings)
    views.show(rows, args.json, views.status)
    return 1 if any(needs_attention(row) for row in rows) else 0


def _check(args: argparse.Namespace) -> int:
    from sync.check import find_problems, prove_credentials

    settings, engine = _state()
    with engine.connect() as conn:
        found = find_problems(conn, _source(engine, settings), settings)
    if args.connect:
        prove_credentials(found)
    views.show_json(found.as_json()) if args.json else views.check(found)
    return 2 if found.problems else 0


def _audiences(args: argparse.Namespace) -> int:
    from sync.inventory import audience_rows

    with _state()[1].connect() as conn:
        views.show(audience_rows(conn), args.json, views.audiences)
    return 0


def _destinations(args: argparse.Namespace) -> int:
    from sync.inventory import destination_rows

    with _state()[1].connect() as conn:
        views.show(destination_rows(conn), args.json, views.destinations)
    return 0


def _runs(args: argparse.Namespace) -> int:
    from sync.inventory import run_rows

    with _state()[1].connect() as conn:
        [audience] = names.resolve(conn, "audience", [args.audience]) if args.audience else [None]
        views.show(run_rows(conn, audience, args.limit), args.json, views.runs)
    return 0


def _explain(args: argparse.Namespace) -> int:
    from sync.explain import explain_user

    settings, engine = _state()
    with engine.connect() as conn:
        entries = explain_user(conn, _source(engine, settings), args.user_id, settings.query_timeout)
    views.show(entries, args.json, lambda rows: views.explain(args.user_id, rows))
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    """Exit 0 when every selected destination could be read (drift is reported, not an error), else 1."""
    from sync.reconcile import Options, Reconciler

    if args.allow_mass_repair and not args.repair:
        raise SyncError("--allow-mass-repair goes with --repair")
    settings, engine = _state(writes=True)
    database.check_writable(engine, settings.database_url)
    with engine.connect() as conn:
        options = Options(
            audiences=names.resolve(conn, "audience", args.audience),
            destinations=names.resolve(conn, "destination", args.destination),
            repair=args.repair,
            allow_mass_repair=args.allow_mass_repair,
        )
    reconciler = Reconciler(engine, settings)
    try:
        found = [one.as_json() for one in reconciler.run(options)]
    except sa.exc.DBAPIError as exc:  # what was recorded before stays; a later reconcile starts afresh
        raise StateError(f"the state database failed during reconcile: {first_line(exc)}") from None
    finally:
        reconciler.close()
    views.show_json({"connections": found}) if args.json else views.reconciled(found)
    return 0 if all(one["verifiable"] for one in found) else 1


def _forget(args: argparse.Namespace) -> int:
    from sync.forget import forget_user
    from sync.runs import utc_now

    _, engine = _state(writes=True)
    forgotten = forget_user(engine, args.user_id, utc_now(), dry_run=args.dry_run)
    views.forget(args.user_id, forgotten, args.dry_run)
    failed = any(line["outcome"] == "failed" for line in forgotten.report)
    return 1 if forgotten.state_failure or failed or forgotten.unknown is not None else 0


def _sandbox(args: argparse.Namespace) -> int:
    from sync.demo import serve_sandbox

    return serve_sandbox(args.port, sys.stdout, sys.stderr)


def _demo(args: argparse.Namespace) -> int:
    from sync.demo import run_demo

    return 0 if run_demo(Path(args.file).resolve(), sys.stdout) else 1
