"""Guards: the read-only session an audience query runs in, per source dialect, and reading it back.

Transactions: `read_only` owns the transaction of the connection it guards (commits on success; the
caller rolls back on failure); `read_back_guard` opens and closes its own connection.
"""

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from sync.tables import sync_stage
from sync.watchdog import Refused, watched


@contextmanager
def read_only(
    conn: sa.Connection, timeout: float, stage: bool = False, stopping: threading.Event | None = None
) -> Iterator[sa.Connection]:
    """`conn` refusing writes (but to the staging table when `stage`), stopping a query after `timeout` s,
    or when `stopping` is set (raising Interrupted), under a watchdog for a source that stops answering.

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
        guard = _rolled_back(conn)
    with watched(conn, timeout, stopping, own_timer=name not in TIMED_BY_THE_DATABASE), guard:
        yield conn


# Dialects whose guard has the database (or for SQLite a progress handler) stop a query at its timeout; the
# watchdog stops the others' at it, where their driver has a way
TIMED_BY_THE_DATABASE = ("postgresql", "sqlite", "mysql", "mariadb")


@contextmanager
def _postgres_read_only(conn: sa.Connection, timeout: float) -> Iterator[None]:
    """A READ ONLY transaction, which may still write temporary tables, with a statement timeout."""
    conn.exec_driver_sql("SET TRANSACTION READ ONLY")
    limit_statements(conn, timeout)
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
        limit_statements(conn, timeout)
        conn.exec_driver_sql("SET SESSION TRANSACTION READ ONLY")  # the session says so (check reads it)
        conn.exec_driver_sql("START TRANSACTION READ ONLY")
        yield
    finally:
        conn.invalidate()


def limit_statements(conn: sa.Connection, seconds: float) -> None:
    """Postgres, MySQL and MariaDB time each statement: `read_only` sets the timeout, and a query run a second
    time inside it gets what is left (at least 1 ms; 0 would mean none). The other guards time the session."""
    if getattr(conn.dialect, "is_mariadb", False):
        conn.exec_driver_sql(f"SET SESSION max_statement_time = {max(0.001, seconds):.6f}")
    elif conn.dialect.name == "mysql":
        conn.exec_driver_sql(f"SET SESSION max_execution_time = {max(1, round(seconds * 1000))}")
    elif conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, round(seconds * 1000))}")


@contextmanager
def _rolled_back(conn: sa.Connection) -> Iterator[None]:
    """A transaction that is always rolled back; the watchdog cancels it at the timeout where the driver can.

    The generic guard. It undoes writes only where the driver runs statements in a transaction: one in
    autocommit mode, or a database without transactions, keeps what a query wrote (use a role that can only
    read). For DuckDB it comes on top of the file opened read-only.
    """
    try:
        yield
    finally:
        conn.rollback()


def one_select(conn: sa.Connection, select: sa.TextClause) -> None:
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
        raise Refused("it must be a single SELECT statement")


def _allow_reads_and_staging(
    action: int, table: str | None, _arg: str | None, database: str | None, _trigger: str | None
) -> int:
    reading = (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE)
    if action in reading or action == sqlite3.SQLITE_TRANSACTION:  # the driver's own BEGIN
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_INSERT and table == sync_stage.name and database == "temp":
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


@dataclass(frozen=True)
class Guard:
    """A source's session inside the guard an audience query runs in, as its database reports it."""

    read_back: str  # e.g. "transaction_read_only = on, statement_timeout = 600000ms"
    problem: str | None = None  # the session is not read-only, or lacks the timeout
    warning: str | None = None  # no way is known to make this source read-only


def read_back_guard(source: sa.Engine, timeout: float) -> Guard:
    """Open a session on `source` the way an audience query gets one and read back, writing nothing, that it
    is read-only and has the timeout."""
    with source.connect() as conn, read_only(conn, timeout):
        name = conn.dialect.name
        if name == "postgresql":
            only = conn.exec_driver_sql("SHOW transaction_read_only").scalar()
            limit = conn.exec_driver_sql("SELECT setting FROM pg_settings WHERE name = 'statement_timeout'")
            ms = int(limit.scalar() or 0)
            seen = f"transaction_read_only = {only}, statement_timeout = {ms}ms"
            return _judged(seen, only == "on", ms == int(timeout * 1000))
        if name == "sqlite":
            query_only = conn.exec_driver_sql("PRAGMA query_only").scalar()
            seen = f"query_only = {query_only}, stopped after {timeout:g}s by a progress handler"
            return _judged(seen, query_only == 1, True)
        if name in ("mysql", "mariadb"):
            if getattr(conn.dialect, "is_mariadb", False):
                variables, unit, scale = ("tx_read_only", "max_statement_time"), "s", 1.0
            else:
                variables, unit, scale = ("transaction_read_only", "max_execution_time"), "ms", 1000.0
            only, limit = conn.exec_driver_sql(
                f"SELECT @@session.{variables[0]}, @@session.{variables[1]}"
            ).one()
            seen = f"{variables[0]} = {only}, {variables[1]} = {limit:g}{unit}"
            return _judged(seen, only == 1, abs(float(limit) - timeout * scale) < 0.001 * scale)
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
