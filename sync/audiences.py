"""Audiences: their keys, their configuration rows, and evaluating their queries for a run."""

import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import inflection
import sqlalchemy as sa

from sync.errors import ConfigError, SourceError
from sync.messages import traits_json
from sync.settings import Cadence
from sync.tables import audiences, readable_columns, sync_stage, sync_stage_diff

KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
STAGE_CHUNK = 5000
# A longer user id is skipped and counted like a NULL one: it stays under every index's row limit (a
# Postgres btree entry takes at most 2,704 bytes) with room for the other key columns.
MAX_USER_ID_BYTES = 1024
# SQLite's json_object takes at most 127 arguments (SQLITE_MAX_FUNCTION_ARG): 63 traits
JSON_OBJECT_PAIRS = 63


def derive_key(name: str) -> str:
    """The trait name Segment would use for an audience called `name`."""
    return str(inflection.parameterize(inflection.underscore(name), separator="_"))


@dataclass(frozen=True)
class Audience:
    id: int
    name: str
    key: str
    query: str
    cadence: Cadence | None
    key_stored: bool  # audiences.key already holds the key

    def __str__(self) -> str:
        return f"audience {self.name!r} (id {self.id})"


def audience_from_row(row: sa.Row[Any]) -> Audience:
    """Validate one `audiences` row; raises ConfigError naming the row and field."""
    where = f"audiences row id={row.id} ({row.name!r})"
    for field in ("name", "key", "query", "schedule"):
        value = getattr(row, field)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}: {field} holds {type(value).__name__} data, not text")
    key = row.key if row.key is not None else derive_key(row.name)
    if not KEY_PATTERN.match(key):
        field = "key" if row.key is not None else "name"
        raise ConfigError(f"{where}: key {key!r} (from {field}) is not snake_case; set audiences.key by hand")
    if not (row.query or "").strip():
        raise ConfigError(f"{where}: query is empty")
    cadence = Cadence.parse(row.schedule, f"{where}: schedule") if row.schedule else None
    return Audience(row.id, row.name, key, row.query, cadence, row.key is not None)


def load_audiences(conn: sa.Connection) -> tuple[list[Audience], dict[int, str]]:
    """Enabled audiences, and the problems of the invalid ones by audience id.

    Keys are compared across all rows, disabled ones too: a disabled audience still owns its key. The row
    that stored a key in audiences.key keeps it: a new audience whose name gives the same key is refused.
    """
    rows = conn.execute(sa.select(*readable_columns(audiences)).order_by(audiences.c.id)).all()
    by_key: dict[str, list[sa.Row[Any]]] = {}
    for row in rows:
        source = row.key if row.key is not None else row.name
        if isinstance(source, str):  # a row of other data is refused below
            by_key.setdefault(source if row.key is not None else derive_key(source), []).append(row)
    valid: list[Audience] = []
    problems: dict[int, str] = {}
    for row in rows:
        if not row.enabled:
            continue
        try:
            audience = audience_from_row(row)
        except ConfigError as exc:
            problems[row.id] = str(exc)
            continue
        sharing = by_key[audience.key]
        owner = next((other for other in sharing if other.key is not None), None)
        if len(sharing) == 1 or (owner is not None and owner.id == row.id):
            valid.append(audience)
        elif owner is not None:
            problems[row.id] = (
                f"{audience}: key {audience.key!r} (from name) belongs to audience {owner.name!r} "
                f"(id {owner.id}); set audiences.key"
            )
        else:
            names = ", ".join(repr(other.name) for other in sharing)
            problems[row.id] = (
                f"{audience}: key {audience.key!r} is shared by audiences {names}; set audiences.key"
            )
    return valid, problems


def store_key(conn: sa.Connection, audience: Audience) -> None:
    """Write the derived key into audiences.key, so a later rename keeps it."""
    if not audience.key_stored:
        conn.execute(sa.update(audiences).where(audiences.c.id == audience.id).values(key=audience.key))


@dataclass(frozen=True)
class Staged:
    members: int
    null_user_ids: int
    duplicate_user_ids: int
    long_user_ids: int


@contextmanager
def _read_only(conn: sa.Connection, timeout: float, stage: bool = False) -> Iterator[sa.Connection]:
    """`conn` refusing writes (but to the staging table when `stage`), stopping a query after `timeout` s.

    One guard per dialect (README, "Sources"); a dialect with none known runs the query in a transaction that
    is always rolled back. Commits on success; the caller rolls back on failure.
    """
    name = conn.dialect.name
    if name == "postgresql":
        guard = _postgres_read_only(conn, timeout)
    elif name == "sqlite":
        guard = _sqlite_read_only(conn, timeout, stage)
    elif name in ("mysql", "mariadb"):
        guard = _mysql_read_only(conn, timeout)
    else:  # DuckDB, whose source engine opens the file read-only (sync.database), and any other dialect
        guard = _rolled_back(conn, timeout)
    with guard:
        yield conn


@contextmanager
def _postgres_read_only(conn: sa.Connection, timeout: float) -> Iterator[None]:
    """A READ ONLY transaction, which may still write temporary tables, with a statement timeout."""
    conn.exec_driver_sql("SET TRANSACTION READ ONLY")
    conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(timeout * 1000)}")
    yield
    # nothing the query set survives it (set_config(..., false), a role, an advisory lock); DISCARD ALL
    # would drop the staged members too, and what failed is rolled back with its transaction
    for reset in (
        "RESET ALL",
        "RESET ROLE",
        "RESET SESSION AUTHORIZATION",
        "SELECT pg_advisory_unlock_all()",
    ):
        conn.exec_driver_sql(reset)
    conn.commit()


@contextmanager
def _sqlite_read_only(conn: sa.Connection, timeout: float, stage: bool) -> Iterator[None]:
    """`PRAGMA query_only`, or for staging an authorizer that allows only inserts into the staging table; a
    progress handler enforces the timeout."""
    raw: Any = conn.connection.dbapi_connection
    deadline = time.monotonic() + timeout
    raw.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    if stage:
        raw.set_authorizer(_allow_reads_and_staging)
    else:
        conn.exec_driver_sql("PRAGMA query_only = ON")
    try:
        yield
        conn.commit()
    finally:
        conn.rollback()
        raw.set_progress_handler(None, 0)
        raw.set_authorizer(None)
        conn.exec_driver_sql("PRAGMA query_only = OFF")
        conn.commit()


@contextmanager
def _mysql_read_only(conn: sa.Connection, timeout: float) -> Iterator[None]:
    """MySQL and MariaDB: a READ ONLY transaction with a statement timeout (MariaDB's max_statement_time in
    seconds, MySQL's max_execution_time in ms).

    The session ends with the query: neither server has a statement that resets a session (its user
    variables, a GET_LOCK), so the connection is closed, not returned to the pool.
    """
    try:
        if getattr(conn.dialect, "is_mariadb", False):
            conn.exec_driver_sql(f"SET SESSION max_statement_time = {timeout:.6f}")
        else:
            conn.exec_driver_sql(f"SET SESSION max_execution_time = {max(1, round(timeout * 1000))}")
        conn.exec_driver_sql("SET SESSION TRANSACTION READ ONLY")  # the session says so (check reads it)
        conn.exec_driver_sql("START TRANSACTION READ ONLY")
        yield
    finally:
        conn.invalidate()


@contextmanager
def _rolled_back(conn: sa.Connection, timeout: float) -> Iterator[None]:
    """A transaction that is always rolled back, cancelled after `timeout` s where the driver can.

    The generic guard. It undoes writes only where the driver runs statements in a transaction: one in
    autocommit mode, or a database without transactions, keeps what a query wrote (use a role that can only
    read). For DuckDB it comes on top of the file opened read-only.
    """
    try:
        with _interrupting(conn.connection.dbapi_connection, timeout):
            yield
    finally:
        conn.rollback()


class _Refused(Exception):
    """An audience query stopped by audience-sync itself, not by its database: the reason."""


@contextmanager
def _interrupting(raw: Any, timeout: float) -> Iterator[None]:
    """Stop what the DBAPI connection `raw` runs once `timeout` s have passed, from a timer thread, where it
    has a way (`interrupt()`: DuckDB, sqlite3; `cancel()`: psycopg, psycopg2); raises _Refused then."""
    stop = getattr(raw, "interrupt", None) or getattr(raw, "cancel", None)
    if stop is None:
        yield
        return
    lock = threading.Lock()
    running, fired = True, False

    def fire() -> None:
        nonlocal fired
        with lock:  # never once the query is over: the connection may run something else by then
            if running:
                fired = True
                stop()

    timer = threading.Timer(timeout, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except Exception:
        if fired:
            raise _Refused("timed out (SYNC_QUERY_TIMEOUT)") from None
        raise
    finally:
        with lock:
            running = False
        timer.cancel()


def _one_select(conn: sa.Connection, select: sa.TextClause) -> None:
    """DuckDB runs every statement of a text, and a COPY or ATTACH smuggled after the audience query could
    write files where the source may read: the wrapped query must stay one SELECT."""
    if conn.dialect.name != "duckdb":
        return
    raw: Any = conn.connection.dbapi_connection
    try:
        statements = raw.extract_statements(str(select.compile(dialect=conn.dialect)))
    except conn.dialect.loaded_dbapi.Error:
        return  # running it reports the syntax error
    if [statement.type.name for statement in statements] != ["SELECT"]:
        raise _Refused("it must be a single SELECT statement")


def _allow_reads_and_staging(
    action: int, table: str | None, _arg: str | None, database: str | None, _trigger: str | None
) -> int:
    reading = (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE)
    if action in reading or action == sqlite3.SQLITE_TRANSACTION:  # the driver's own BEGIN
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_INSERT and table == sync_stage.name and database == "temp":
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def stage_members(
    state: sa.Connection, source: sa.Engine, audience: Audience, timeout: float, limit: str = ""
) -> Staged:
    """Evaluate the audience's query into `sync_stage_members`, this connection's temporary table.

    The table holds the members for this run: one row per user id (the first of duplicates), indexed for
    the diff. The query runs read-only, so the state database is not write-locked while it runs: with
    `INSERT ... SELECT` when the source is the state database, streamed in chunks otherwise. Commits;
    any failure raises SourceError, so a broken query never looks like an empty audience. `limit`
    (" LIMIT 0") bounds the query: `check` stages nothing the way a run stages everything.
    """
    state.commit()
    drop_stage(state)
    state.exec_driver_sql(f"CREATE TEMPORARY TABLE {sync_stage.name} (user_id TEXT, traits TEXT)")
    state.commit()
    try:
        with _query_failures(audience):
            if source is state.engine:
                with _read_only(state, timeout, stage=True):
                    rows = _stage_in_place(state, audience, limit)
            else:
                with source.connect() as conn, _read_only(conn, timeout):
                    rows = _stage_streamed(state, conn, audience, limit)
                state.commit()
    except SourceError:
        state.rollback()
        raise
    # one pass over the staged rows (a Postgres index on an overlong id would fail): rows with no usable id
    skipped = [bool(null) for (null,) in state.exec_driver_sql(SKIP_USER_IDS[state.dialect.name])]
    nulls, long = skipped.count(True), skipped.count(False)
    state.commit()  # a failed unique index below rolls back to here
    try:  # one row per user id is the rule, so the index is built unique and fails if a user repeats
        state.exec_driver_sql(UNIQUE_INDEX)
        duplicates = 0
    except sa.exc.IntegrityError:
        state.rollback()
        duplicates = state.exec_driver_sql(DEDUPLICATE[state.dialect.name]).rowcount
        state.exec_driver_sql(UNIQUE_INDEX)
    if state.dialect.name == "postgresql":  # temporary tables get no statistics otherwise
        state.exec_driver_sql(f"ANALYZE {sync_stage.name}")
    state.commit()
    return Staged(rows - nulls - duplicates - long, nulls, duplicates, long)


SKIP_USER_IDS = {
    dialect: f"DELETE FROM {sync_stage.name} WHERE user_id IS NULL OR {length} > {MAX_USER_ID_BYTES}"
    " RETURNING user_id IS NULL"
    for dialect, length in (
        ("sqlite", "length(CAST(user_id AS BLOB))"),
        ("postgresql", "octet_length(user_id)"),
    )
}

UNIQUE_INDEX = f"CREATE UNIQUE INDEX ix_{sync_stage.name}_user_id ON {sync_stage.name} (user_id)"

# Keep one row per user id (null ones stay, to be counted apart), in one pass (a self-join would be
# quadratic in a user's duplicates): on SQLite the first the query returned (rowid order); on Postgres the
# first in physical order, which is usually, not always, the query's order (a later row may fill free
# space on an earlier page).
DEDUPLICATE = {
    "sqlite": f"DELETE FROM {sync_stage.name} WHERE user_id IS NOT NULL AND rowid NOT IN "
    f"(SELECT min(rowid) FROM {sync_stage.name} GROUP BY user_id)",
    "postgresql": f"DELETE FROM {sync_stage.name} WHERE ctid IN (SELECT ctid FROM (SELECT ctid, "
    f"row_number() OVER (PARTITION BY user_id ORDER BY ctid) AS n FROM {sync_stage.name}"
    " WHERE user_id IS NOT NULL) AS d WHERE n > 1)",
}


def drop_stage(state: sa.Connection) -> None:
    """Drop this connection's staged members and diffs (temporary tables), if any."""
    for table in (sync_stage, sync_stage_diff):
        state.exec_driver_sql(f"DROP TABLE IF EXISTS {table.name}")


@contextmanager
def dropping_stage(state: sa.Connection) -> Iterator[None]:
    """Drop the staged members at the end, so that a pooled connection does not keep them."""
    try:
        yield
    finally:
        try:
            state.rollback()
            drop_stage(state)
            state.commit()
        except sa.exc.DBAPIError:
            pass  # the connection is lost, and its temporary table with it


def _stage_in_place(state: sa.Connection, audience: Audience, limit: str) -> int:
    """`INSERT ... SELECT` the query's rows into the staging table, traits built as JSON by the database.

    Returns how many rows the query returned.
    """
    with state.execute(_wrapped(audience, " LIMIT 0")) as probe:
        columns = _require_user_id(audience, probe)
    if state.dialect.name == "postgresql":
        traits = "(to_jsonb(q) - 'user_id')::text"
    else:
        traits = _sqlite_json_object([c for c in columns if c != "user_id"])
    insert = f"INSERT INTO {sync_stage.name} (user_id, traits) "
    user_id = "NULLIF(CAST(q.user_id AS TEXT), '')"
    select = _over_query(audience, f"{user_id}, {_escaped(traits)}", prefix=insert, suffix=limit)
    return state.execute(select).rowcount


def _sqlite_json_object(columns: list[str]) -> str:
    """SQL building the traits object of `q`'s columns, in their order; past JSON_OBJECT_PAIRS columns, from
    json_object()s of at most that many, their texts joined (json_patch would drop NULL traits)."""
    pairs = [f"'{c.replace(chr(39), chr(39) * 2)}', q.\"{c.replace(chr(34), chr(34) * 2)}\"" for c in columns]
    parts = [
        f"json_object({', '.join(pairs[i : i + JSON_OBJECT_PAIRS])})"
        for i in range(0, len(pairs), JSON_OBJECT_PAIRS)
    ]
    if len(parts) <= 1:
        return parts[0] if parts else "json_object()"
    inner = [f"substr({part}, 2, length({part}) - 2)" for part in parts]  # each `{...}` without its braces
    return "'{' || " + " || ',' || ".join(inner) + " || '}'"


def _stage_streamed(state: sa.Connection, source: sa.Connection, audience: Audience, limit: str) -> int:
    """Stream the query's rows from another database into the staging table in chunks; returns how many."""
    rows = 0
    select = _wrapped(audience, limit)
    _one_select(source, select)
    result = source.execute(  # a statement's options: the connection's would stay with it
        select, execution_options={"stream_results": True, "yield_per": STAGE_CHUNK}
    )
    with result:
        _require_user_id(audience, result)
        for chunk in result.partitions():
            batch = []
            for row in chunk:
                traits = dict(row._mapping)
                user_id = traits.pop("user_id")
                batch.append(
                    {
                        "user_id": str(user_id) if user_id not in (None, "") else None,
                        "traits": traits_json(traits),
                    }
                )
            state.execute(sa.insert(sync_stage), batch)
            rows += len(batch)
    return rows


def probe_query(state: sa.Connection, source: sa.Engine, audience: Audience, timeout: float) -> None:
    """Stage the audience query with LIMIT 0 as a run stages it: it must parse, run read-only, return
    user_id, and build its traits; nothing is kept."""
    with dropping_stage(state):
        stage_members(state, source, audience, timeout, limit=" LIMIT 0")


def is_member(source: sa.Engine, audience: Audience, user_id: str, timeout: float) -> bool:
    """Whether the audience's query returns `user_id` now (read-only, like a run)."""
    with _query_failures(audience), source.connect() as conn, _read_only(conn, timeout):
        # compared in Python too: MySQL's default collations take 'U1' and 'u1 ' for 'u1'
        as_text = str(sa.cast(sa.literal_column("q.user_id"), sa.String()).compile(dialect=conn.dialect))
        select = _over_query(audience, as_text, suffix=f" AND {as_text} = :user_id")
        _one_select(conn, select)
        return user_id in conn.execute(select, {"user_id": user_id}).scalars().all()


@dataclass(frozen=True)
class Guard:
    """A source's session inside the guard an audience query runs in, as its database reports it."""

    read_back: str  # e.g. "transaction_read_only = on, statement_timeout = 600000ms"
    problem: str | None = None  # the session is not read-only, or lacks the timeout
    warning: str | None = None  # no way is known to make this source read-only


def read_back_guard(source: sa.Engine, timeout: float) -> Guard:
    """Open a session on `source` the way an audience query gets one and read back, writing nothing, that it
    is read-only and has the timeout."""
    with source.connect() as conn, _read_only(conn, timeout):
        name = conn.dialect.name
        if name == "postgresql":
            read_only = conn.exec_driver_sql("SHOW transaction_read_only").scalar()
            limit = conn.exec_driver_sql("SELECT setting FROM pg_settings WHERE name = 'statement_timeout'")
            ms = int(limit.scalar() or 0)
            seen = f"transaction_read_only = {read_only}, statement_timeout = {ms}ms"
            return _judged(seen, read_only == "on", ms == int(timeout * 1000))
        if name == "sqlite":
            query_only = conn.exec_driver_sql("PRAGMA query_only").scalar()
            seen = f"query_only = {query_only}, stopped after {timeout:g}s by a progress handler"
            return _judged(seen, query_only == 1, True)
        if name in ("mysql", "mariadb"):
            if getattr(conn.dialect, "is_mariadb", False):
                variables, unit, scale = ("tx_read_only", "max_statement_time"), "s", 1.0
            else:
                variables, unit, scale = ("transaction_read_only", "max_execution_time"), "ms", 1000.0
            read_only, limit = conn.exec_driver_sql(
                f"SELECT @@session.{variables[0]}, @@session.{variables[1]}"
            ).one()
            seen = f"{variables[0]} = {read_only}, {variables[1]} = {limit:g}{unit}"
            return _judged(seen, read_only == 1, abs(float(limit) - timeout * scale) < 0.001 * scale)
        raw = conn.connection.dbapi_connection
        stops = hasattr(raw, "interrupt") or hasattr(raw, "cancel")
        timer = (
            f"cancelled after {timeout:g}s by a timer" if stops else "no way to stop a query at its timeout"
        )
        if name == "duckdb":
            access_mode, external = conn.exec_driver_sql(
                "SELECT current_setting('access_mode'), current_setting('enable_external_access')"
            ).one()
            seen = f"access_mode = {access_mode}, enable_external_access = {str(external).lower()}, {timer}"
            if source.url.database in (None, "", ":memory:"):
                in_memory = (
                    "an in-memory DuckDB database cannot be opened read-only: queries run in a transaction "
                    "that is rolled back and read files only in the directory the command started in"
                )
                return Guard(seen, warning=in_memory)
            return _judged(seen, access_mode == "read_only" and not external, True)
        rolled_back = (
            f"{name} has no read-only guard here: audience queries run in a transaction that is rolled back, "
            "which undoes nothing where the driver commits each statement; use a role that can only read"
            + ("" if stops else "; and its driver cannot cancel a query at SYNC_QUERY_TIMEOUT")
        )
        return Guard(f"a transaction that is rolled back, {timer}", warning=rolled_back)


def _judged(seen: str, read_only: bool, timed: bool) -> Guard:
    if read_only and timed:
        return Guard(seen)
    missing = [what for what, ok in (("read-only", read_only), ("SYNC_QUERY_TIMEOUT", timed)) if not ok]
    return Guard(seen, problem=f"the session audience queries run in lacks {' and '.join(missing)} ({seen})")


@contextmanager
def _query_failures(audience: Audience) -> Iterator[None]:
    """Turn the database's refusal of an audience query into a SourceError naming the audience."""
    try:
        yield
    except sa.exc.StatementError as exc:
        raise SourceError(f"{audience}: the query failed: {_first_line(exc.orig)}") from None
    except _Refused as exc:
        raise SourceError(f"{audience}: the query failed: {exc}") from None


def _escaped(sql: str) -> str:
    # Colons are escaped: audience queries have no bind parameters; `'10:30'` or `x::text` stay as they are.
    return sql.replace(":", r"\:")


def _wrapped(audience: Audience, suffix: str) -> sa.TextClause:
    return _over_query(audience, "*", suffix=suffix)


def _over_query(audience: Audience, select_list: str, prefix: str = "", suffix: str = "") -> sa.TextClause:
    """`{prefix}SELECT {select_list} FROM (<audience query>) AS q WHERE :one = 1{suffix}`.

    The bound parameter makes psycopg use the extended protocol, which refuses a query that smuggles in
    more statements (`...) AS x; COMMIT; DELETE ...`); SQLite's driver refuses those anyway.
    """
    query = _escaped(audience.query.strip().rstrip(";"))
    # the line break ends a `-- comment` on the query's last line
    return sa.text(f"{prefix}SELECT {select_list} FROM ({query}\n) AS q WHERE :one = 1{suffix}").bindparams(
        one=1
    )


def _require_user_id(audience: Audience, result: sa.CursorResult[Any]) -> list[str]:
    columns = list(result.keys())
    if "user_id" not in columns:
        raise SourceError(
            f"{audience}: the query returns no user_id column (it returns {', '.join(columns)})"
        )
    return columns


def _first_line(error: BaseException | None) -> str:
    text = str(error).strip() or type(error).__name__
    if "interrupted" in text or "canceling statement due to statement timeout" in text:
        return "timed out (SYNC_QUERY_TIMEOUT)"
    return text.splitlines()[0]
