"""What the commands print: tables, JSON, the run summary and the progress bars."""

import json
import sys
from collections.abc import Callable
from typing import Any

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

from sync.check import Findings


def show_json(value: Any) -> None:
    print(json.dumps(value, default=str, indent=2))


def _print(table: Table) -> None:
    Console(markup=False, emoji=False).print(table)  # names, user ids and errors are data, shown as is


def progress() -> Progress:
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


def bars(progress: Progress) -> Callable[[str, int], Callable[[int], None]]:
    """A bar per connection: added when its run starts, advanced as its pages are recorded."""

    def start(label: str, total: int) -> Callable[[int], None]:
        task = progress.add_task(label, total=total)
        return lambda n: progress.advance(task, n)

    return start


def summary(results: list[Any], dry_run: bool) -> None:
    """One line per connection a run touched, on stderr."""
    if not results:
        print("nothing to sync: no enabled audience with an enabled connection matched", file=sys.stderr)
    for result in results:
        counts = " ".join(f"{k}={v}" for k, v in result.counts.items())
        where = result.audience + (f" -> {result.destination}" if result.destination else "")
        line = f"{'[dry run] ' if dry_run else ''}{where}: {result.outcome} {counts}".rstrip()
        print(line + (f" ({result.error})" if result.error else ""), file=sys.stderr)


def status(rows: list[dict[str, Any]]) -> None:
    table = Table(title="audience-sync connections")
    for column in (
        "audience",
        "destination",
        "members",
        "accepted",
        "rejected",
        "last run",
        "next run",
        "error",
    ):
        table.add_column(column)
    for row in rows:
        run = row["last_run"]
        last = (
            "never"
            if run is None
            else (
                f"{run['started_at']:%Y-%m-%d %H:%M} {run['outcome']} "
                f"+{run['entered']} -{run['exited']} ok={run['accepted']} "
                f"rej={run['rejected']} fail={run['failed']}"
            )
        )
        table.add_row(
            row["audience"] + ("" if row["enabled"] else " (disabled)"),
            row["destination"],
            "-" if row["members"] is None else str(row["members"]),
            str(row["accepted_members"]),
            str(row["rejected_users"]),
            last,
            row["next_run"] or "-",
            row["last_error"] or "",
        )
    _print(table)


def explain(user_id: str, entries: list[dict[str, Any]]) -> None:
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
    _print(table)


def check(found: Findings) -> None:
    """Problems and warnings on stdout, each audience's source and the verdict on stderr."""
    for problem in found.problems:
        print(problem)
    for warning in found.warnings:
        print(f"warning: {warning}")
    for line in found.sources:
        print(line, file=sys.stderr)
    noted = f" and {len(found.warnings)} warning(s)" if found.warnings else ""
    if found.problems:
        print(f"{len(found.problems)} problem(s){noted} in {found.checked} rows checked", file=sys.stderr)
    else:
        print(
            f"all {found.checked} rows are valid{noted}; every audience query runs and returns user_id",
            file=sys.stderr,
        )


def forget(user_id: str, report: list[dict[str, Any]], state_failure: str | None) -> None:
    """Each destination's outcome on stdout, what became of the state tables on stderr."""
    for line in report:
        print(f"{line['destination']}: {line['outcome']} ({line['detail']})")
    if state_failure:
        print(
            f"user {user_id!r} is still in the state tables ({state_failure}): run forget again",
            file=sys.stderr,
        )
        return
    failed = [line["destination"] for line in report if line["outcome"] == "failed"]
    kept = f", except at {', '.join(failed)}: run forget again" if failed else ""
    print(f"user {user_id!r} removed from the state tables{kept}", file=sys.stderr)
