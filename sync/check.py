"""`audience-sync check`: every configuration problem at once, before anything runs."""

import sqlalchemy as sa

from sync.audiences import load_audiences, probe_query
from sync.connections import connection_rows, load_connection, type_warning
from sync.destinations import load_destination
from sync.errors import ConfigError, SourceError
from sync.settings import Settings
from sync.tables import destination_columns, destinations

# SQLite keeps whatever a shell writes into a BOOLEAN column; 'yes' or 'true' read as false in SQL
NOT_BOOLEAN = """SELECT {columns}, enabled FROM {table}
WHERE typeof(enabled) <> 'integer' OR enabled NOT IN (0, 1)"""
KEYS = {"destinations": "id", "audiences": "id", "audience_destinations": "audience_id, destination_id"}


def find_problems(
    conn: sa.Connection, source: sa.Engine, settings: Settings
) -> tuple[list[str], list[str], int]:
    """Every problem of the enabled rows (keys, settings, credentials, URLs, queries), the warnings (what
    does not stop a run), and the number of rows checked."""
    valid, problems = load_audiences(conn)
    found = list(problems.values())
    cadences = [("SYNC_INTERVAL", settings.interval)] + [(f"{a}", a.cadence) for a in valid if a.cadence]
    warnings = [warning for where, cadence in cadences if (warning := cadence.warning(where))]
    if conn.dialect.name == "sqlite":
        for table, columns in KEYS.items():
            for *key, enabled in conn.exec_driver_sql(NOT_BOOLEAN.format(table=table, columns=columns)):
                where = ", ".join(f"{c}={k}" for c, k in zip(columns.split(", "), key, strict=True))
                found.append(f"{table} row {where}: enabled holds {enabled!r}; set it to 1 or 0")
    rows = conn.execute(
        sa.select(*destination_columns()).where(destinations.c.enabled).order_by(destinations.c.id)
    ).all()
    broken_destinations = set()
    for row in rows:
        try:
            warnings += load_destination(row, row.settings_text).warnings
        except ConfigError as exc:
            found.append(str(exc))
            broken_destinations.add(row.id)
    checked = len(rows) + len(valid) + len(problems)
    for audience in valid:
        try:
            probe_query(conn, source, audience, settings.query_timeout)
        except SourceError as exc:
            found.append(str(exc))
        for row in connection_rows(conn, audience.id):
            checked += 1
            if row.enabled is False or row.id in broken_destinations:  # None: missing, reported below
                continue
            try:
                _, destination = load_connection(conn, audience, row)
            except ConfigError as exc:
                found.append(str(exc))
                continue
            warning = type_warning(audience, row, destination)
            if warning:
                warnings.append(warning)
    if source.dialect.name == "postgresql":
        warnings += _postgres_writes_left(source)
    return found, warnings, checked


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
