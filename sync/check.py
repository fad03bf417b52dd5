"""`audience-sync check`: every configuration problem at once, before anything runs."""

from dataclasses import dataclass, field

import sqlalchemy as sa

from sync.audiences import load_audiences
from sync.connections import connection_rows, load_connection, type_warning
from sync.database import describe
from sync.destinations import load_destination
from sync.errors import ConfigError, SourceError
from sync.guards import read_back_guard
from sync.settings import Settings
from sync.sources import Sources
from sync.staging import probe_query
from sync.tables import destination_columns, destinations

# SQLite keeps whatever a shell writes into a BOOLEAN column; 'yes' or 'true' read as false in SQL
NOT_BOOLEAN = """SELECT {columns}, enabled FROM {table}
WHERE typeof(enabled) <> 'integer' OR enabled NOT IN (0, 1)"""
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


def find_problems(conn: sa.Connection, sources: Sources, settings: Settings) -> Findings:  # noqa: C901 - split by the CLI work (issue 14.6)
    """Every problem of the enabled rows (keys, settings, credentials, URLs, queries, the source's session),
    the warnings (what does not stop a run), each audience's source, and the number of rows checked."""
    timeout = settings.query_timeout
    valid, problems = load_audiences(conn)
    found = Findings(problems=list(problems.values()))
    cadences = [("SYNC_INTERVAL", settings.interval)] + [(f"{a}", a.cadence) for a in valid if a.cadence]
    found.warnings += [warning for where, cadence in cadences if (warning := cadence.warning(where))]
    if conn.dialect.name == "sqlite":
        for table, columns in KEYS.items():
            for *key, enabled in conn.exec_driver_sql(NOT_BOOLEAN.format(table=table, columns=columns)):
                where = ", ".join(f"{c}={k}" for c, k in zip(columns.split(", "), key, strict=True))
                found.problems.append(f"{table} row {where}: enabled holds {enabled!r}; set it to 1 or 0")
    rows = conn.execute(
        sa.select(*destination_columns()).where(destinations.c.enabled).order_by(destinations.c.id)
    ).all()
    broken_destinations = set()
    for row in rows:
        try:
            found.warnings += load_destination(row, row.settings_text).warnings
        except ConfigError as exc:
            found.problems.append(str(exc))
            broken_destinations.add(row.id)
    found.checked = len(rows) + len(valid) + len(problems)
    sessions: dict[sa.Engine, str] = {}  # per source engine: where it is and its session, read back once
    for audience in valid:
        try:
            source = sources.engine(conn, audience)
            if source not in sessions:
                sessions[source] = _source_session(conn, source, audience.source, timeout, found)
            found.sources.append(f"{audience}: source {sessions[source]}")
            probe_query(conn, source, audience, timeout)
        except (ConfigError, SourceError) as exc:
            found.problems.append(str(exc))
        for row in connection_rows(conn, audience.id):
            found.checked += 1
            if row.enabled is False or row.id in broken_destinations:  # None: missing, reported below
                continue
            try:
                _, destination = load_connection(conn, audience, row)
            except ConfigError as exc:
                found.problems.append(str(exc))
                continue
            warning = type_warning(audience, row, destination)
            if warning:
                found.warnings.append(warning)
    return found


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
