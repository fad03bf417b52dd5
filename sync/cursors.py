"""Driver cursors for staging: a source query's rows streamed in chunks, and rows written into the staging
table by the state driver's bulk path, without SQLAlchemy in between."""

from collections.abc import Callable, Generator, Iterator
from contextlib import closing, contextmanager, suppress
from typing import Any

import sqlalchemy as sa

from sync.tables import sync_stage


def chunks(source: sa.Connection, select: sa.TextClause, size: int) -> Generator[list[tuple[Any, ...]]]:
    """`select`'s rows, `size` at a time, from a cursor that streams them (a Postgres named cursor, PyMySQL's
    unbuffered one; sqlite3's and DuckDB's stream anyway); the driver's errors as SQLAlchemy's."""
    compiled = select.compile(dialect=source.dialect)
    params: Any = compiled.params
    if compiled.positional:
        params = [params[name] for name in compiled.positiontup or []]
    raw: Any = source.connection.dbapi_connection
    error = source.dialect.loaded_dbapi.Error
    try:
        if source.dialect.name == "postgresql":
            cursor = raw.cursor(name="sync_stage_members")
        elif source.dialect.driver == "pymysql":
            cursor = raw.cursor(source.dialect.loaded_dbapi.cursors.SSCursor)
        else:
            cursor = raw.cursor()
        try:
            cursor.execute(compiled.string, params)
            while chunk := cursor.fetchmany(size):
                yield chunk
        except BaseException:
            with suppress(error):  # the read's error is the one to report (the connection may be lost)
                _close(cursor, raw)
            raise
        _close(cursor, raw)
    except error as exc:
        raise sa.exc.DBAPIError.instance(compiled.string, params, exc, error) from exc


def _close(cursor: Any, raw: Any) -> None:
    """Close a streaming cursor. PyMySQL's reads the rest of its result first; once its connection is lost
    (killed, dropped) that read meets the closed socket as AttributeError, on close and again when the cursor
    is collected (PyMySQL issue 810): such a cursor's result is marked read instead."""
    if getattr(raw, "open", True):  # PyMySQL's connection says whether it is still open; others close
        cursor.close()
        return
    result = getattr(cursor, "_result", None)
    if result is not None:
        result.unbuffered_active = False
    cursor.connection = None  # what PyMySQL's close() does last; it then has nothing left to do


@contextmanager
def bulk_writer(state: sa.Connection) -> Iterator[Callable[[list[tuple[Any, ...]]], None]]:
    """A function writing `(user_id, traits)` rows into the staging table by the state driver's bulk path."""
    raw: Any = state.connection.dbapi_connection
    with closing(raw.cursor()) as cursor:
        if state.dialect.name == "postgresql":
            with cursor.copy(f"COPY {sync_stage.name} (user_id, traits) FROM STDIN") as copy:

                def write(rows: list[tuple[Any, ...]]) -> None:
                    for row in rows:
                        copy.write_row(row)

                yield write
        else:
            insert = f"INSERT INTO {sync_stage.name} (user_id, traits) VALUES (?, ?)"
            yield lambda rows: cursor.executemany(insert, rows)
