"""What the commands print: tables, JSON, the run summary and the progress bars."""

import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from rich.cells import cell_len
from rich.console import Console, Group
from rich.table import Table

from sync.check import Findings
from sync.forget import Forgotten
from sync.values import dumps

CONTROL = re.compile(r"[\x00-\x1f\x7f]+")  # a line break or tab in a name or error would break the line


def show(rows: list[dict[str, Any]], as_json: bool, view: Callable[[list[dict[str, Any]]], None]) -> None:
    """Rows as JSON, or through their view."""
    show_json(rows) if as_json else view(rows)


def show_json(value: Any) -> None:
    """JSON on stdout; times in ISO 8601 (UTC)."""
    print(json.dumps(value, default=_json_value, indent=2))


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def utc(moment: datetime | None) -> str:
    """A time for a table whose header says (UTC)."""
    return "-" if moment is None else f"{moment.astimezone(UTC):%Y-%m-%d %H:%M}"


def table(title: str, headers: list[str], rows: list[list[str]], names: tuple[int, ...] = (0, 1)) -> None:
    """On a terminal a Rich table that fits its width and breaks no name (the `names` columns) mid-word;
    elsewhere (a pipe, a file) plain space-aligned columns, one line per row, nothing cut, for grep, awk
    and cut."""
    if sys.stdout.isatty():
        console = Console(markup=False, emoji=False)  # names and errors are data, shown as is
        console.print(_fitted(title, headers, rows, names, console.width))
        return
    lines = [[header.upper() for header in headers]] + [
        [CONTROL.sub(" ", cell) or "-" for cell in row] for row in rows
    ]
    widths = [max(cell_len(line[i]) for line in lines) for i in range(len(headers))]
    for line in lines:
        cells = (cell + " " * (width - cell_len(cell)) for cell, width in zip(line, widths, strict=True))
        print("   ".join(cells).rstrip())


def _fitted(
    title: str, headers: list[str], rows: list[list[str]], names: tuple[int, ...], width: int
) -> Table | Group:
    """The table `width` wide: the names whole when they fit, else wrapped between words (the other
    columns wrap first); when even their longest words leave the others too little room, a block per row."""
    lines = [headers, *rows]
    whole = {i: max(cell_len(line[i]) for line in lines) for i in names}
    words = {i: max(cell_len(word) for line in lines for word in line[i].split() or [""]) for i in names}
    # each column takes 3 more for padding and border; below 4 wide the others cannot shrink further
    room = width - 3 * len(headers) - 1 - 4 * (len(headers) - len(names))
    share = max(room // (2 * len(names)), 1) if names else 0  # wrapped names leave half the room to others
    for name_widths in (whole, {i: max(words[i], min(whole[i], share)) for i in names}, words):
        if sum(name_widths.values()) <= room:
            return _rich_table(title, headers, rows, name_widths)
    return _blocks(title, headers, rows)


def _rich_table(title: str, headers: list[str], rows: list[list[str]], name_widths: dict[int, int]) -> Table:
    rich = Table(title=title)
    for i, header in enumerate(headers):
        rich.add_column(header, width=name_widths.get(i), overflow="fold")
    for row in rows:
        rich.add_row(*row)
    return rich


def _blocks(title: str, headers: list[str], rows: list[list[str]]) -> Group:
    """One block per row, a line per column (its header, then its value wrapped between words)."""
    blocks: list[Table | str] = [title]
    for row in rows:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True)
        grid.add_column(overflow="fold")  # only a word wider than the terminal is cut
        for header, cell in zip(headers, row, strict=True):
            grid.add_row(header, cell or "-")
        blocks += ["", grid]
    return Group(*blocks)


def summary(results: list[Any], dry_run: bool) -> None:
    """One line per connection a run touched, on stderr."""
    if not results:
        print("nothing to sync: no enabled audience with an enabled connection matched", file=sys.stderr)
    for result in results:
        counts = " ".join(f"{k}={v}" for k, v in result.counts.items())
        where = result.audience + (f" -> {result.destination}" if result.destination else "")
        line = f"{'[dry run] ' if dry_run else ''}{where}: {result.outcome} {counts}".rstrip()
        print(line + (f" ({result.error})" if result.error else ""), file=sys.stderr)


def baseline_preview(results: list[Any]) -> None:
    """What `initial --baseline` would record, one line per connection, on stderr."""
    if not results:
        print(
            "nothing to baseline: every selected connection has completed its initial sync", file=sys.stderr
        )
    for result in results:
        where = result.audience + (f" -> {result.destination}" if result.destination else "")
        if result.good:
            members = result.counts.get("entered", 0)  # skipped ones too (no event mapping): all recorded
            print(f"{where}: {members} member(s) to record as accepted; nothing is sent", file=sys.stderr)
        else:
            print(f"{where}: {result.outcome} ({result.error})", file=sys.stderr)


def confirmed(yes: bool, members: int) -> bool:
    """--yes, or a `y` typed at the terminal; off a terminal without --yes, nothing is recorded."""
    if yes:
        return True
    if not sys.stdin.isatty():
        print("audience-sync: nothing recorded: add --yes to baseline without a terminal", file=sys.stderr)
        return False
    try:
        answer = input(f"Record {members} member(s) as accepted without sending anything? [y/N] ")
    except (KeyboardInterrupt, EOFError):  # Ctrl-C, Ctrl-D
        print("\naborted: nothing recorded", file=sys.stderr)
        return False
    if answer.strip().lower() in ("y", "yes"):
        return True
    print("nothing recorded", file=sys.stderr)
    return False


def status(rows: list[dict[str, Any]]) -> None:
    headers = ["audience", "destination", "state", "members", "accepted", "rejected"]
    headers += ["last run (UTC)", "next run (UTC)", "error"]
    table("audience-sync connections", headers, [_status_row(row) for row in rows])


def _status_row(row: dict[str, Any]) -> list[str]:
    run = row["last_run"]
    last = "never"
    if run is not None:
        last = (
            f"{utc(run['started_at'])} {run['outcome']} +{run['entered']} -{run['exited']} "
            f"ok={run['accepted']} rej={run['rejected']} fail={run['failed']}"
        )
    earliest, latest = row["next_run_earliest"], row["next_run_latest"]
    next_run = utc(earliest)
    if earliest is not None and latest != earliest:
        next_run += f" to {utc(latest)[-5:] if latest.date() == earliest.date() else utc(latest)}"
    return [
        row["audience"],
        row["destination"],
        _state_text(row),
        "-" if row["members"] is None else str(row["members"]),
        str(row["accepted_members"]) + _verified(row["reconciled"]),
        str(row["rejected_users"]),
        last,
        next_run,
        row["last_error"] or "",
    ]


def _verified(found: dict[str, int]) -> str:
    """What reconcile found of the users the destination accepted (members and leavers), once it ran."""
    if not (found["confirmed"] or found["drifted"]):
        return ""
    return " (reconciled: {confirmed} confirmed, {drifted} drifted, {unverified} unverified)".format(**found)


def _state_text(row: dict[str, Any]) -> str:
    text = str(row["state"])
    if row["running_on"]:
        text += f" on {row['running_on']}"
    if not row["initial_sync_completed"] and text not in ("disabled", "never run"):
        text += ", initial sync incomplete"
    return text


def explain(user_id: str, entries: list[dict[str, Any]]) -> None:
    headers = ["audience", "destination", "member now", "destination accepted (UTC)", "rejection"]
    headers.append("reconcile (UTC)")
    rows = []
    for entry in entries:
        received = " (received by the postback endpoint)" if entry["accepted_means"] == "received" else ""
        accepted = "never sent"
        if entry["accepted"] is not None:
            accepted = f"{str(entry['accepted']).lower()}{received} at {utc(entry['accepted_at'])}"
        if entry["in_doubt_since"] is not None:
            doubt = f"in doubt since {utc(entry['in_doubt_since'])} (sent, no answer)"
            accepted = doubt if entry["accepted"] is None else f"{accepted}; {doubt}"
        rejection = entry["rejection"]
        rows.append(
            [
                entry["audience"],
                f"{entry['destination']}{'' if entry['enabled'] else ' (disabled)'}",
                entry["member_unknown"] or ("yes" if entry["member"] else "no"),
                accepted,
                "" if rejection is None else f"{str(rejection['value']).lower()}: {rejection['reason']}",
                _reconciled(entry),
            ]
        )
    table(f"user {user_id}", headers, rows)


def reconciled(found: list[dict[str, Any]]) -> None:
    """`reconcile`: a line per connection, then every user whose outcome is not confirmed."""
    names = ("confirmed", "drifted", "missing", "rejected", "not_found", "not_ours")
    headers = ["audience", "destination", "outcome", *(n.replace("_", " ") for n in names), "repairs", "why"]
    rows = [
        [one["audience"], one["destination"], one["outcome"]]
        + [str(one["counts"][n]) for n in names]
        + [str(one["repairs_queued"]), one.get("reason") or one.get("held") or ""]
        for one in found
    ]
    table("reconcile", headers, rows)
    users = [
        [one["audience"], one["destination"], user["user_id"], user["outcome"], user["reason"] or ""]
        for one in found
        for user in one["users"]
    ]
    if users:
        print()
        table("users not confirmed", ["audience", "destination", "user", "outcome", "reason"], users)
    if not found:
        print("nothing to reconcile: no enabled connection matched", file=sys.stderr)


def _reconciled(entry: dict[str, Any]) -> str:
    """What the last reconcile found of the user: "confirmed by Everflow's report at T", "Everflow rejected
    it: error 8, ...", "disabled by hand in Refersion since reconcile at T"."""
    found = entry["reconciled"]
    if found is None:
        return "not verified"
    outcome, reason, since = found["outcome"], found["reason"], utc(found["since"])
    if entry["accepted_means"] == "received":  # Everflow postbacks: its conversion report says
        if outcome == "confirmed":
            return f"confirmed by Everflow's report at {utc(found['destination_time'] or found['since'])}"
        if outcome == "rejected":
            return f"Everflow rejected it: {reason}"
    if outcome == "confirmed":
        return f"confirmed by reconcile at {since} ({reason})"
    return f"{outcome}: {reason} since reconcile at {since}"


def check(found: Findings) -> None:
    """Problems and warnings on stdout, each audience's source and the verdict on stderr."""
    for problem in found.problems:
        print(problem)
    for warning in found.warnings:
        print(f"warning: {warning}")
    for line in found.sources + found.credentials:
        print(line, file=sys.stderr)
    noted = f" and {len(found.warnings)} warning(s)" if found.warnings else ""
    if found.problems:
        print(f"{len(found.problems)} problem(s){noted} in {found.checked} rows checked", file=sys.stderr)
    else:
        print(
            f"all {found.checked} rows are valid{noted}; every audience query runs and returns user_id",
            file=sys.stderr,
        )


def forget(user_id: str, forgotten: Forgotten, dry_run: bool) -> None:
    """Each destination's outcome (and in a dry run the request) on stdout, the state tables on stderr."""
    if forgotten.unknown is not None:
        near = ", ".join(map(repr, forgotten.unknown))
        held = f" (user ids are case-sensitive; the state holds {near})" if near else ""
        print(f"no connection holds user {user_id!r}: nothing was sent or removed{held}", file=sys.stderr)
        return
    for line in forgotten.report:
        print(f"{line['destination']}: {line['outcome']} ({line['detail']})")
        if "request" in line:
            print(f"  {dumps(line['request'])}")
    if forgotten.state_failure:
        print(
            f"user {user_id!r} is still in the state tables ({forgotten.state_failure}): run forget again",
            file=sys.stderr,
        )
        return
    rows = ", ".join(f"{count} from {table}" for table, count in forgotten.removed.items())
    if dry_run:
        print(f"[dry run] would remove {rows}; nothing was sent or removed", file=sys.stderr)
        return
    failed = [line["destination"] for line in forgotten.report if line["outcome"] == "failed"]
    kept = f", except at {', '.join(failed)}: run forget again" if failed else ""
    print(f"user {user_id!r} removed from the state tables{kept}", file=sys.stderr)


def audiences(rows: list[dict[str, Any]]) -> None:
    headers = ["name", "id", "key", "schedule", "enabled", "connections"]
    cells = [
        [r["name"], str(r["id"]), f"{r['key']}{'' if r['key_stored'] else ' (from the name)'}"]
        + [r["schedule"] or "SYNC_INTERVAL", _yes(r["enabled"]), str(r["connections"])]
        for r in rows
    ]
    table("audiences", headers, cells, names=(0,))


def destinations(rows: list[dict[str, Any]]) -> None:
    headers = ["name", "id", "kind", "transport", "api key", "enabled", "connections"]
    cells = [
        [r["name"], str(r["id"]), str(r["kind"]), r["transport"], r["api_key"] or "none"]
        + [_yes(r["enabled"]), str(r["connections"])]
        for r in rows
    ]
    table("destinations", headers, cells, names=(0,))


def runs(rows: list[dict[str, Any]]) -> None:
    headers = ["started (UTC)", "audience", "destination", "outcome", "seconds", "changes", "error"]
    table("runs, newest first", headers, [_run_row(row) for row in rows], names=(1, 2))


RECONCILE_COUNTS = ("confirmed", "drifted", "missing", "rejected", "not_found", "not_ours", "repairs")


def _run_row(row: dict[str, Any]) -> list[str]:
    if row["kind"] == "reconcile":
        counts = " ".join(f"{name}={row[name]}" for name in RECONCILE_COUNTS)
    else:
        counts = (
            f"members={row['members']} +{row['entered']} -{row['exited']} ok={row['accepted']} "
            f"rej={row['rejected']} skip={row['skipped']} fail={row['failed']}"
        )
    seconds = (row["finished_at"] - row["started_at"]).total_seconds()
    return [
        utc(row["started_at"]),
        row["audience"],
        row["destination"] or "(the audience)",
        row["outcome"] if row["kind"] == "sync" else f"reconcile: {row['outcome']}",
        f"{seconds:.1f}",
        counts,
        row["error"] or "",
    ]


def _yes(value: bool) -> str:
    return "yes" if value else "no"
