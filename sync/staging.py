"""Staging: an audience's members for one run, in temporary tables of the state database connection that
staged them (`sync_stage_members`), and the connection several threads read them through.

Transactions: `stage_members` owns the staging connection's transactions (it commits what it staged);
`SharedReads` ends each turn's transaction, so no snapshot outlives a page.
"""

import logging
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, NamedTuple

import sqlalchemy as sa

from sync.audiences import Audience, escaped, over_query, query_failures, require_user_id, wrapped
from sync.cursors import bulk_writer, chunks
from sync.errors import SourceError
from sync.guards import limit_statements, one_select, read_only
from sync.logs import audience_fields
from sync.tables import sync_stage, sync_stage_diff
from sync.traits import kinds, postgres_jsonb, sqlite_real, sqlite_user_id, sqlite_value_ok, traits_select
from sync.values import Kind, traits_text, user_id_text

log = logging.getLogger(__name__)
STAGE_CHUNK = 5000


# A longer user id is skipped and counted like a NULL one: it stays under every index's row limit (a
# Postgres btree entry takes at most 2,704 bytes) with room for the other key columns.
MAX_USER_ID_BYTES = 1024


# SQLite's json_object takes at most 127 arguments (SQLITE_MAX_FUNCTION_ARG): 63 traits
JSON_OBJECT_PAIRS = 63


@dataclass(frozen=True)
class Staged:
    members: int
    null_user_ids: int
    duplicate_user_ids: int
    long_user_ids: int
    columns: tuple[str, ...] = field(default=(), compare=False)  # the query's (not a count)


def stage_members(
    state: sa.Connection,
    source: sa.Engine,
    audience: Audience,
    timeout: float,
    limit: str = "",
    stopping: threading.Event | None = None,
) -> Staged:
    """Evaluate the audience's query into `sync_stage_members`, this connection's temporary table.

    The table holds the members for this run: one row per user id (the first of duplicates), indexed for
    the diff. The query runs read-only, so the state database is not write-locked while it runs: with
    `INSERT ... SELECT` when the source is the state database, streamed in chunks otherwise. Commits;
    any failure raises SourceError, so a broken query never looks like an empty audience (SourceInterrupted
    when `stopping` is set meanwhile). `limit` (" LIMIT 0") bounds the query: `check` stages nothing the way
    a run stages everything.
    """
    state.commit()
    drop_stage(state)
    state.exec_driver_sql(f"CREATE TEMPORARY TABLE {sync_stage.name} (user_id TEXT, traits TEXT)")
    state.commit()
    try:
        with query_failures(audience):
            rows: int | None = None
            deadline = time.monotonic() + timeout
            if source is state.engine:
                declared = _sqlite_declared(state, audience) if state.dialect.name == "sqlite" else {}
                with read_only(state, timeout, stage=True, stopping=stopping):
                    rows, columns = _stage_in_place(state, audience, limit, declared)
                if rows is None:  # a value the state database cannot write as the rules do: in Python
                    state.exec_driver_sql(f"DELETE FROM {sync_stage.name}")
                    state.commit()
            if rows is None:
                with (
                    source.connect() as conn,
                    read_only(conn, deadline - time.monotonic(), stopping=stopping),
                ):
                    rows, columns = _stage_streamed(
                        state, conn, audience, limit, deadline, source is state.engine
                    )
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
    return Staged(rows - nulls - duplicates - long, nulls, duplicates, long, tuple(columns))


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


def _stage_in_place(
    state: sa.Connection, audience: Audience, limit: str, declared: dict[str, str]
) -> tuple[int | None, list[str]]:
    """`INSERT ... SELECT` the query's rows into the staging table, traits built as JSON by the database.

    Returns how many rows the query returned (None where a value must be written in Python: see
    sync.traits), and its columns.
    """
    with state.execute(wrapped(audience, " LIMIT 0")) as probe:
        columns = require_user_id(audience, probe)
        description = probe.cursor.description
    insert = f"INSERT INTO {sync_stage.name} (user_id, traits) "
    if state.dialect.name == "postgresql":
        built = traits_select(state.dialect, description)
        if built is None:
            return None, columns
        user_id, traits, checked = built.user_id, built.traits, True
        if postgres_jsonb(description):  # as stored before issue 21; nothing it writes is NULL
            traits, checked = "(to_jsonb(q) - 'user_id')::text", False
    else:
        user_id, traits, checked = _sqlite_in_place(columns, declared)
    select = over_query(audience, f"{user_id}, {escaped(traits)}", prefix=insert, suffix=limit)
    try:
        rows = state.execute(select).rowcount
    except sa.exc.OperationalError as exc:
        if "JSON cannot hold BLOB values" not in str(exc):
            raise
        state.rollback()
        return None, columns
    return None if checked and state.exec_driver_sql(UNWRITTEN).scalar() else rows, columns


UNWRITTEN = f"SELECT EXISTS (SELECT 1 FROM {sync_stage.name} WHERE traits IS NULL)"


def _sqlite_declared(state: sa.Connection, audience: Audience) -> dict[str, str]:
    """The declared type of each of the query's columns (a column's, '' for an expression), read from a
    temporary view of it (the view runs nothing) on a connection that never stages: one that compiled the
    query outside the staging guard would let it skip the guard's checks (SQLite caches a table-valued
    pragma's connection). A database in memory has one connection: that one."""
    if isinstance(state.engine.pool, sa.pool.SingletonThreadPool | sa.pool.StaticPool):
        return _declared(state, audience)
    with _probe_engine(state.engine).connect() as conn:
        return _declared(conn, audience)


_PROBE_ENGINES: "weakref.WeakKeyDictionary[sa.Engine, sa.Engine]" = weakref.WeakKeyDictionary()
_PROBE_ENGINES_LOCK = threading.Lock()


def _probe_engine(state: sa.Engine) -> sa.Engine:
    """The state file's engine for reading declared types: pooled apart from the state engine's connections,
    so that runs reuse its few connections instead of opening one each."""
    with _PROBE_ENGINES_LOCK:
        probe = _PROBE_ENGINES.get(state)
        if probe is None:
            probe = _PROBE_ENGINES[state] = sa.create_engine(state.url)
        return probe


def _declared(conn: sa.Connection, audience: Audience) -> dict[str, str]:
    query = audience.query.strip().rstrip(";")
    conn.exec_driver_sql(f"CREATE TEMPORARY VIEW {PROBE_VIEW} AS SELECT * FROM ({query}\n) AS q")
    try:
        return {row[1]: row[2] for row in conn.exec_driver_sql(f"PRAGMA temp.table_info({PROBE_VIEW})")}
    finally:
        conn.exec_driver_sql(f"DROP VIEW {PROBE_VIEW}")
        conn.commit()


PROBE_VIEW = "sync_stage_probe"


def _text_affinity(declared: str) -> bool:
    """SQLite stores only text (or a BLOB) in a column so declared (https://sqlite.org/datatype3.html 3.1)."""
    kind = declared.upper()
    return "INT" not in kind and any(word in kind for word in ("CHAR", "CLOB", "TEXT"))


def _sqlite_in_place(columns: list[str], declared: dict[str, str]) -> tuple[str, str, bool]:
    """The user id, the traits (json_object keeps the query's order, writes what the rules write for text and
    integers) and whether a row's traits may be NULL: where a column is not of text affinity, a REAL is
    written by printf (sync.traits) and a REAL that does not read back, or a BLOB, makes the traits NULL."""
    quoted = {c: f'q."{c.replace(chr(34), chr(34) * 2)}"' for c in columns}
    others = [c for c in columns if not _text_affinity(declared.get(c, ""))]
    values = {
        c: f"CASE typeof({q}) WHEN 'real' THEN json({sqlite_real(q)}) ELSE {q} END" if c in others else q
        for c, q in quoted.items()
    }
    traits = _sqlite_json_object([(c, values[c]) for c in columns if c != "user_id"])
    if others:
        traits = f"CASE WHEN {_all([sqlite_value_ok(quoted[c]) for c in others])} THEN {traits} END"
    user_id = (
        "NULLIF(CAST(q.user_id AS TEXT), '')" if "user_id" not in others else sqlite_user_id("q.user_id")
    )
    return user_id, traits, bool(others)


def _all(conditions: list[str]) -> str:
    """`conditions` joined with AND, nested by halves: SQLite refuses an expression over 1,000 deep."""
    if len(conditions) <= 32:
        return " AND ".join(conditions)
    half = len(conditions) // 2
    return f"({_all(conditions[:half])}) AND ({_all(conditions[half:])})"


def _sqlite_json_object(values: list[tuple[str, str]]) -> str:
    """SQL building the traits object of `(column, SQL)`, in their order; past JSON_OBJECT_PAIRS columns, from
    json_object()s of at most that many, their texts joined (json_patch would drop NULL traits)."""
    pairs = [f"'{c.replace(chr(39), chr(39) * 2)}', {value}" for c, value in values]
    parts = [
        f"json_object({', '.join(pairs[i : i + JSON_OBJECT_PAIRS])})"
        for i in range(0, len(pairs), JSON_OBJECT_PAIRS)
    ]
    if len(parts) <= 1:
        return parts[0] if parts else "json_object()"
    inner = [f"substr({part}, 2, length({part}) - 2)" for part in parts]  # each `{...}` without its braces
    return "'{' || " + " || ',' || ".join(inner) + " || '}'"


def _stage_streamed(
    state: sa.Connection,
    source: sa.Connection,
    audience: Audience,
    limit: str,
    deadline: float,
    in_python: bool = False,
) -> tuple[int, list[str]]:
    """Stream the query's rows from another database (or, `in_python`, the state database's rows the
    in-place path could not write) into the staging table; returns how many, and the query's columns.

    Traits are built by the source where it writes the text the rules write (sync.traits), else in Python
    from the driver's tuples (sync.values). Rows move in chunks of STAGE_CHUNK from a streaming cursor to the
    state driver's bulk path (sqlite3 `executemany`, psycopg `COPY`), without SQLAlchemy in between.
    """
    probe_select = wrapped(audience, " LIMIT 0")
    one_select(source, probe_select)
    with source.execute(probe_select) as probe:
        require_user_id(audience, probe)
        description = probe.cursor.description
    names = [column[0] for column in description]
    state.begin()
    built = None if in_python else traits_select(source.dialect, description)
    if built is not None:
        select = over_query(audience, escaped(f"{built.user_id}, {built.traits}"), suffix=limit)
        rows = _copy(state, source, select, built.upper_escapes)
        if rows is not None:
            return rows, names
        state.exec_driver_sql(f"DELETE FROM {sync_stage.name}")  # a row it could not build: in Python
        limit_statements(source, deadline - time.monotonic())  # one timeout for both runs of the query
    by_python = Columns(names, kinds(source.dialect, description))
    return _copy(state, source, wrapped(audience, limit), by_python) or 0, names


class Columns(NamedTuple):
    """The query's columns, whose values the Python path writes."""

    names: list[str]
    kinds: list[Kind]


def _copy(
    state: sa.Connection, source: sa.Connection, select: sa.TextClause, built: bool | Columns
) -> int | None:
    """Copy `select`'s rows into the staging table. When `built` is a bool, they are `(user_id, traits)`
    built by the source (True: the traits may hold upper-case escapes), and None is returned at the first
    chunk holding traits it could not build. Else `built` names the query's own columns, whose traits are
    written here."""
    one_select(source, select)
    rows = 0
    with bulk_writer(state) as write, closing(chunks(source, select, STAGE_CHUNK)) as read:
        for chunk in read:
            if isinstance(built, Columns):
                chunk = [python_traits(built, row) for row in chunk]
            elif not _as_rules_text(chunk, built):
                return None
            write(chunk)
            rows += len(chunk)
    return rows


def _as_rules_text(chunk: list[tuple[Any, ...]], upper_escapes: bool) -> bool:
    """Whether the source built every row's traits as the rules write them (in C: one text per chunk)."""
    try:
        text = "".join(map(itemgetter(1), chunk))
    except TypeError:  # a NULL
        return False
    return not (upper_escapes and "\\u00" in text)


def python_traits(columns: Columns, row: tuple[Any, ...]) -> tuple[str | None, str]:
    """A row of the query's `columns` as staged: the user id as text (None for none), the traits."""
    at = columns.names.index("user_id")
    return user_id_text(row[at], columns.kinds[at]), traits_text(columns.names, columns.kinds, row)


class SharedReads:
    """A connection several threads take turns reading from: the one holding the run's staged members.

    Each turn ends its transaction (unless `keep_transaction`, for a dry run's single thread), so no
    snapshot outlives a page.
    """

    def __init__(self, conn: sa.Connection, keep_transaction: bool = False) -> None:
        self.conn = conn
        self.keep_transaction = keep_transaction
        self.lock = threading.Lock()

    @contextmanager
    def turn(self, writes: bool = False) -> Iterator[sa.Connection]:
        """The connection, alone; committed after the turn when it `writes` (temporary tables only)."""
        with self.lock:
            try:
                yield self.conn
                if writes and not self.keep_transaction:
                    self.conn.commit()
            finally:
                if not self.keep_transaction:
                    self.conn.rollback()


def staged_counts(audience: Audience, staged: Staged) -> dict[str, int]:
    """The staged counts as a run records them, logged."""
    counts = {
        "members": staged.members,
        "null_user_ids": staged.null_user_ids,
        "duplicate_user_ids": staged.duplicate_user_ids,
        "long_user_ids": staged.long_user_ids,
    }
    log.info(
        "%s: %d members (%d null user_ids, %d duplicates, %d user_ids over %d bytes)",
        audience,
        staged.members,
        staged.null_user_ids,
        staged.duplicate_user_ids,
        staged.long_user_ids,
        MAX_USER_ID_BYTES,
        extra={"action": "audience_evaluated", **audience_fields(audience), **counts},
    )
    return counts
