"""Staging: an audience's members for one run, in temporary tables of the state database connection that
staged them (`sync_stage_members`), and the connection several threads read them through.

Transactions: `stage_members` owns the staging connection's transactions (it commits what it staged);
`SharedReads` ends each turn's transaction, so no snapshot outlives a page.
"""

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import sqlalchemy as sa

from sync.audiences import Audience, escaped, over_query, query_failures, require_user_id, wrapped
from sync.cursors import bulk_writer, chunks
from sync.errors import SourceError
from sync.guards import limit_statements, one_select, read_only
from sync.logs import audience_fields
from sync.models import traits_json
from sync.tables import sync_stage, sync_stage_diff
from sync.traits import traits_select

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
            if source is state.engine:
                with read_only(state, timeout, stage=True, stopping=stopping):
                    rows, columns = _stage_in_place(state, audience, limit)
            else:
                deadline = time.monotonic() + timeout
                with source.connect() as conn, read_only(conn, timeout, stopping=stopping):
                    rows, columns = _stage_streamed(state, conn, audience, limit, deadline)
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


def _stage_in_place(state: sa.Connection, audience: Audience, limit: str) -> tuple[int, list[str]]:
    """`INSERT ... SELECT` the query's rows into the staging table, traits built as JSON by the database.

    Returns how many rows the query returned, and its columns.
    """
    with state.execute(wrapped(audience, " LIMIT 0")) as probe:
        columns = require_user_id(audience, probe)
    if state.dialect.name == "postgresql":
        traits = "(to_jsonb(q) - 'user_id')::text"
    else:
        traits = _sqlite_json_object([c for c in columns if c != "user_id"])
    insert = f"INSERT INTO {sync_stage.name} (user_id, traits) "
    user_id = "NULLIF(CAST(q.user_id AS TEXT), '')"
    select = over_query(audience, f"{user_id}, {escaped(traits)}", prefix=insert, suffix=limit)
    return state.execute(select).rowcount, columns


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


def _stage_streamed(
    state: sa.Connection, source: sa.Connection, audience: Audience, limit: str, deadline: float
) -> tuple[int, list[str]]:
    """Stream the query's rows from another database into the staging table; returns how many, and the
    query's columns.

    Traits are built by the source where it writes the text `traits_json` writes (sync.traits), else in
    Python from the driver's tuples. Rows move in chunks of STAGE_CHUNK from a streaming cursor to the
    state driver's bulk path (sqlite3 `executemany`, psycopg `COPY`), without SQLAlchemy in between.
    """
    probe_select = wrapped(audience, " LIMIT 0")
    one_select(source, probe_select)
    with source.execute(probe_select) as probe:
        require_user_id(audience, probe)
        description = probe.cursor.description
    names = [column[0] for column in description]
    state.begin()
    built = traits_select(source.dialect, description)
    if built is not None:
        select = over_query(audience, escaped(f"{built.user_id}, {built.traits}"), suffix=limit)
        rows = _copy(state, source, select, built.upper_escapes)
        if rows is not None:
            return rows, names
        state.exec_driver_sql(f"DELETE FROM {sync_stage.name}")  # a row it could not build: in Python
        limit_statements(source, deadline - time.monotonic())  # one timeout for both runs of the query
    return _copy(state, source, wrapped(audience, limit), names) or 0, names


def _copy(
    state: sa.Connection, source: sa.Connection, select: sa.TextClause, built: bool | list[str]
) -> int | None:
    """Copy `select`'s rows into the staging table. When `built` is a bool, they are `(user_id, traits)`
    built by the source (True: the traits may hold upper-case escapes), and None is returned at the first
    chunk holding traits it could not build. Else `built` names the query's own columns, whose traits are
    built here."""
    one_select(source, select)
    rows = 0
    with bulk_writer(state) as write, closing(chunks(source, select, STAGE_CHUNK)) as read:
        for chunk in read:
            if isinstance(built, list):
                chunk = [python_traits(built, row) for row in chunk]
            elif not _as_traits_json(chunk, built):
                return None
            write(chunk)
            rows += len(chunk)
    return rows


def _as_traits_json(chunk: list[tuple[Any, ...]], upper_escapes: bool) -> bool:
    """Whether the source built every row's traits as traits_json writes them (in C: one text per chunk)."""
    try:
        text = "".join(map(itemgetter(1), chunk))
    except TypeError:  # a NULL
        return False
    return not (upper_escapes and "\\u00" in text)


def python_traits(names: list[str], row: tuple[Any, ...]) -> tuple[str | None, str]:
    """A row of the query's columns `names` as staged: the user id as text (None for none), the traits."""
    traits = dict(zip(names, row, strict=True))
    user_id = traits.pop("user_id")
    return (str(user_id) if user_id not in (None, "") else None), traits_json(traits)


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
