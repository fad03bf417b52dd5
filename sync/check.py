"""`audience-sync check`: every configuration problem at once, before anything runs."""

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from sync import state
from sync.audiences import Audience, load_audiences, row_problems
from sync.connections import connection_rows, full_send_warning, load_connection, type_warning
from sync.database import describe, sqlite_file
from sync.delivery import Sender
from sync.destinations import load_destination
from sync.destinations.base import Destination
from sync.errors import ConfigError, DestinationError, SourceError
from sync.guards import read_back_guard
from sync.settings import Settings
from sync.sources import Sources, unused_problems
from sync.staging import dropping_stage, stage_members
from sync.statefile import readable_by_others
from sync.tables import audiences, destination_columns, destinations, readable_columns

# SQLite keeps whatever a shell writes into a BOOLEAN column; 'yes' or 'true' read as false in SQL
NOT_BOOLEAN = """SELECT {columns}, enabled FROM {table}
WHERE typeof(enabled) <> 'integer' OR enabled NOT IN (0, 1)"""
log = logging.getLogger(__name__)
KEYS = {
    "destinations": "id",
    "audiences": "id",
    "audience_destinations": "audience_id, destination_id",
    "sources": "id",
}


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)  # what stops a run
    warnings: list[str] = field(default_factory=list)  # what does not
    sources: list[str] = field(default_factory=list)  # per audience: its source and what its session is
    checked: int = 0  # rows
    audiences: list[Audience] = field(default_factory=list)  # the valid ones, whose queries `check` runs
    destinations: list[Destination] = field(default_factory=list)  # the valid enabled ones
    credentials: list[str] = field(
        default_factory=list
    )  # `--connect`: per destination, what its probe proved

    def as_json(self) -> dict[str, Any]:
        findings = [{"severity": "error", "message": p} for p in self.problems]
        findings += [{"severity": "warning", "message": w} for w in self.warnings]
        return {
            "checked": self.checked,
            "findings": findings,
            "sources": self.sources,
            "credentials": self.credentials,
        }


def check_rows(conn: sa.Connection, settings: Settings) -> Findings:
    """Every problem and warning of the configuration rows, without running a query or calling anyone (the
    daemon checks this much at start)."""
    valid, problems = load_audiences(conn)
    found = Findings(audiences=valid, checked=len(valid) + len(problems))
    found.problems += _each_problem(conn, problems)
    cadences = [("SYNC_INTERVAL", settings.interval)] + [(f"{a}", a.cadence) for a in valid if a.cadence]
    found.warnings += [warning for where, cadence in cadences if (warning := cadence.warning(where))]
    if conn.dialect.name == "sqlite":
        found.problems += _not_boolean(conn)
    found.warnings += unused_problems(conn)
    found.warnings += readable_by_others(sqlite_file(settings.database_url))
    broken = _check_destinations(conn, found)
    for audience in valid:
        _check_connections(conn, audience, broken, found)
    return found


def log_rows(conn: sa.Connection, settings: Settings) -> None:
    """At the daemon's start: log each problem and warning of the configuration rows (no query, no call)."""
    found = check_rows(conn, settings)
    for problem in found.problems:
        log.error("%s", problem, extra={"action": "config_problem"})
    for warning in found.warnings:
        log.warning("%s", warning, extra={"action": "config_warning"})
    log.info(
        "configuration: %d rows checked, %d problem(s), %d warning(s); `audience-sync check` also runs the "
        "queries",
        found.checked,
        len(found.problems),
        len(found.warnings),
        extra={"action": "config_checked"},
    )


def find_problems(conn: sa.Connection, sources: Sources, settings: Settings) -> Findings:
    """Every problem of the enabled rows (keys, settings, credentials, URLs, queries, the source's session),
    the warnings (what does not stop a run), each audience's source, and the number of rows checked."""
    found = check_rows(conn, settings)
    timeout = settings.query_timeout
    sessions: dict[sa.Engine, str] = {}  # per source engine: where it is and its session, read back once
    for audience in found.audiences:
        try:
            source = sources.engine(conn, audience)
            if source not in sessions:
                sessions[source] = _source_session(conn, source, audience.source, timeout, found)
            found.sources.append(f"{audience}: source {sessions[source]}")
            with dropping_stage(conn):  # staged as a run stages, with LIMIT 0: nothing is kept
                staged = stage_members(conn, source, audience, timeout, limit=" LIMIT 0")
        except (ConfigError, SourceError) as exc:
            found.problems.append(str(exc))
            continue
        found.problems += _missing_columns(conn, audience, staged.columns, found.destinations)
    return found


def _missing_columns(
    conn: sa.Connection, audience: Audience, columns: tuple[str, ...], valid: list[Destination]
) -> list[str]:
    """The columns the audience's query lacks that a destination it is connected to needs for every member."""
    by_id = {destination.id: destination for destination in valid}
    return [
        f"{audience} -> {destination.where}: {lacks}"
        for row in connection_rows(conn, audience.id)
        if (destination := by_id.get(row.destination_id)) and (lacks := destination.missing_columns(columns))
    ]


def _each_problem(conn: sa.Connection, problems: dict[int, str]) -> list[str]:
    """Each problem of the invalid audience rows, one by one (a key shared by two rows is one problem)."""
    rows = conn.execute(
        sa.select(*readable_columns(audiences)).where(audiences.c.id.in_(problems)).order_by(audiences.c.id)
    )
    return [problem for row in rows for problem in (row_problems(row) or [problems[row.id]])]


def _not_boolean(conn: sa.Connection) -> list[str]:
    found = []
    for table, columns in KEYS.items():
        for *key, enabled in conn.exec_driver_sql(NOT_BOOLEAN.format(table=table, columns=columns)):
            where = ", ".join(f"{c}={k}" for c, k in zip(columns.split(", "), key, strict=True))
            found.append(f"{table} row {where}: enabled holds {enabled!r}; set it to 1 or 0")
    return found


def _check_destinations(conn: sa.Connection, found: Findings) -> set[int]:
    """Check the enabled destinations; returns the ids of the broken ones."""
    rows = conn.execute(
        sa.select(*destination_columns()).where(destinations.c.enabled).order_by(destinations.c.id)
    ).all()
    found.checked += len(rows)
    broken = set()
    for row in rows:
        try:
            destination = load_destination(row, row.settings_text)
        except ConfigError as exc:
            found.problems += exc.problems
            broken.add(row.id)
            continue
        found.warnings += destination.warnings
        found.destinations.append(destination)
    return broken


def prove_credentials(found: Findings) -> None:
    """`check --connect`: one harmless authenticated call per valid enabled destination, sent as a run sends
    (`Sender`); a refusal is a problem, and a kind whose credentials no call can prove says why."""
    for destination in found.destinations:
        probe = destination.probe()
        if isinstance(probe, str):
            found.credentials.append(f"{destination.where}: not proved: {probe}")
            continue
        sender = Sender(destination)
        try:
            found.credentials.append(f"{destination.where}: {sender.prove(probe)}")
        except DestinationError as exc:
            found.problems.append(f"{destination.where}: {exc.reason}")
            found.credentials.append(f"{destination.where}: {exc.reason}")
        finally:
            sender.close()


def _check_connections(conn: sa.Connection, audience: Audience, broken: set[int], found: Findings) -> None:
    for row in connection_rows(conn, audience.id):
        found.checked += 1
        if row.enabled is False or row.id in broken:  # None: a missing destination, reported here
            continue
        try:
            _, destination = load_connection(conn, audience, row)
        except ConfigError as exc:
            found.problems += exc.problems
            continue
        warning = type_warning(audience, row, destination)
        if warning:
            found.warnings.append(warning)
        if audience.key_stored and state.never_synced(conn, audience.id, row.id):
            found.warnings.append(full_send_warning(audience, row.name))


def _source_session(
    conn: sa.Connection, source: sa.Engine, name: str | None, timeout: float, found: Findings
) -> str:
    """Where audience queries run (the `sources` name, the URL without a password) and their session, read
    back from the source: one that is not read-only or lacks the timeout is a problem, a source with no
    read-only guard a warning."""
    where = describe(source.url.render_as_string(hide_password=False))
    if name is not None:
        where = f"{name!r} ({where})"
    elif source is conn.engine:
        where += " (the state database)"
    try:
        guard = read_back_guard(source, timeout)
    except sa.exc.DBAPIError as exc:
        found.problems.append(f"source {where}: {str(exc.orig).strip().splitlines()[0]}")
        return f"{where}: cannot be reached"
    if source.dialect.name == "postgresql":
        found.warnings += _postgres_writes_left(source)
    elif source.dialect.name in ("mysql", "mariadb"):
        found.warnings += _mysql_grants_left(source)
    if guard.problem:
        found.problems.append(f"source {where}: {guard.problem}")
    if guard.warning:
        found.warnings.append(f"source {where}: {guard.warning}")
    return f"{where}: {guard.read_back}"


# A READ ONLY transaction still lets these write large objects; only a revoked privilege stops them.
LARGE_OBJECT_WRITES = (
    "lo_from_bytea(oid, bytea)",
    "lo_create(oid)",
    "lo_creat(integer)",
    "lo_import(text)",
    "lo_put(oid, bigint, bytea)",
    "lowrite(integer, bytea)",
)


def _postgres_writes_left(source: sa.Engine) -> list[str]:
    """What the source role can still write inside a READ ONLY transaction (the operator guide's role)."""
    callable_ = ", ".join(f"has_function_privilege('{f}', 'EXECUTE')" for f in LARGE_OBJECT_WRITES)
    with source.connect() as conn:
        superuser, *executable = conn.execute(
            sa.text(f"SELECT rolsuper, {callable_} FROM pg_roles WHERE rolname = current_user")
        ).one()
        role = conn.scalar(sa.text("SELECT current_user"))
    if superuser:
        return [
            f"the source role {role!r} is a superuser: audience queries can write large objects and read "
            "server files despite the READ ONLY transaction; use a SELECT-only role (operator guide)"
        ]
    writes = [f.split("(")[0] for f, can in zip(LARGE_OBJECT_WRITES, executable, strict=True) if can]
    if not writes:
        return []
    return [
        f"the source role {role!r} may execute {', '.join(writes)}: audience queries can write large objects "
        "despite the READ ONLY transaction; REVOKE EXECUTE on them FROM PUBLIC (operator guide)"
    ]


# What a MariaDB or MySQL privilege lets an audience query read (and send as traits) despite the READ ONLY
# transaction; SELECT counts on every schema or on `mysql`, which holds the password hashes.
GRANT_RISKS = {
    "FILE": "read server files into traits (LOAD_FILE)",
    "SUPER": "change server settings and bypass read_only",
    "SELECT": "read password hashes into traits (the mysql schema)",
}
# A line of SHOW GRANTS on every schema or on the `mysql` schema (what follows the grantee, such as a password
# hash, is not matched)
GRANT_LINE = re.compile(r"GRANT (?P<privileges>.+?) ON (?P<level>\*\.\*|`mysql`\.\S+) TO (?P<grantee>\S+)")


def _mysql_grants_left(source: sa.Engine) -> list[str]:
    """Each grant of the source user (or its role) that lets audience queries read more than tables."""
    with source.connect() as conn:
        lines = conn.exec_driver_sql("SHOW GRANTS").scalars().all()
    warnings = []
    for match in filter(None, map(GRANT_LINE.match, lines)):
        level, grantee = match["level"], match["grantee"]
        # FILE and SUPER are global privileges: on `mysql` only SELECT matters
        risks = GRANT_RISKS if level == "*.*" else {"SELECT": GRANT_RISKS["SELECT"]}
        # each privilege as written, a column list kept whole: SELECT (`Priv`, `User`)
        held = {p.split(" (")[0]: p for p in re.split(r",\s*(?![^()]*\))", match["privileges"])}
        if "ALL PRIVILEGES" in held:
            named, remove = ["ALL PRIVILEGES"], "use a SELECT-only user"
            allows = list(risks.values())
        else:
            named = [held[name] for name in risks if name in held]
            remove = f"REVOKE {', '.join(named)} ON {level} FROM {grantee}"
            allows = [risk for name, risk in risks.items() if name in held]
        if named:
            warnings.append(
                f"the source user {grantee} holds {', '.join(named)} ON {level}: audience queries can "
                f"{'; '.join(allows)}; {remove} (operator guide)"
            )
    return warnings
