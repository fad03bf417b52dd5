"""Audiences: their keys, their configuration rows, and evaluating their queries into `sync_members`."""

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import inflection
import sqlalchemy as sa

from sync.errors import ConfigError, SourceError
from sync.messages import traits_hash, traits_json
from sync.settings import Cadence
from sync.tables import audiences, sync_members, sync_stage, upsertable_insert

KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
STAGE_CHUNK = 5000


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

    Keys are compared across all rows, disabled ones too: a disabled audience still owns its key.
    """
    rows = conn.execute(sa.select(audiences).order_by(audiences.c.id)).all()
    by_key: dict[str, list[str]] = {}
    for row in rows:
        by_key.setdefault(row.key if row.key is not None else derive_key(row.name), []).append(repr(row.name))
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
        if len(by_key[audience.key]) > 1:
            names = ", ".join(by_key[audience.key])
            problems[row.id] = (
                f"{audience}: key {audience.key!r} is shared by audiences {names}; set audiences.key"
            )
        else:
            valid.append(audience)
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


@contextmanager
def _read_only(engine: sa.Engine, timeout: float) -> Iterator[sa.Connection]:
    """A source connection that refuses writes and stops a query after `timeout` seconds."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(timeout * 1000)}")
            yield conn
            conn.rollback()
            return
        raw = conn.connection.dbapi_connection
        assert raw is not None
        deadline = time.monotonic() + timeout
        conn.exec_driver_sql("PRAGMA query_only = ON")
        raw.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
        try:
            yield conn
        finally:
            conn.rollback()
            raw.set_progress_handler(None, 0)
            conn.exec_driver_sql("PRAGMA query_only = OFF")
            conn.commit()


def stage_members(state: sa.Connection, source: sa.Engine, audience: Audience, timeout: float) -> Staged:
    """Replace the audience's rows in `sync_members` with its query's result, leaving the transaction open.

    The query's rows go to a temporary table first (committed: it belongs to this connection alone), so the
    state database is not write-locked while the query runs; then one short transaction swaps them into
    `sync_members`, which the caller commits or, on a dry run, rolls back. Any failure raises SourceError
    before `sync_members` is touched, so a broken query never looks like an empty audience.
    """
    state.commit()
    state.exec_driver_sql(
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {sync_stage.name} "
        "(user_id TEXT PRIMARY KEY, traits TEXT NOT NULL, traits_hash TEXT NOT NULL)"
    )
    state.execute(sa.delete(sync_stage))
    insert = upsertable_insert(state, sync_stage).on_conflict_do_nothing()
    sql = _wrapped(audience, "")
    try:
        with _read_only(source, timeout) as conn:
            result = conn.execution_options(stream_results=True, yield_per=STAGE_CHUNK).execute(sql)
            with result:
                _require_user_id(audience, result)
                rows, nulls = _stage_chunks(state, insert, result)
    except sa.exc.StatementError as exc:
        state.rollback()
        raise SourceError(f"{audience}: the query failed: {_first_line(exc.orig)}") from None
    except SourceError:
        state.rollback()
        raise
    state.commit()
    state.execute(sa.delete(sync_members).where(sync_members.c.audience_id == audience.id))
    copied = sa.select(
        sa.literal(audience.id), sync_stage.c.user_id, sync_stage.c.traits, sync_stage.c.traits_hash
    )
    state.execute(
        sa.insert(sync_members).from_select(["audience_id", "user_id", "traits", "traits_hash"], copied)
    )
    members = state.scalar(sa.select(sa.func.count()).select_from(sync_stage)) or 0
    return Staged(members, nulls, rows - members)


def probe_query(source: sa.Engine, audience: Audience, timeout: float) -> None:
    """Run the audience query with LIMIT 0: it must parse, run read-only and return user_id."""
    try:
        with _read_only(source, timeout) as conn, conn.execute(_wrapped(audience, " LIMIT 0")) as result:
            _require_user_id(audience, result)
    except sa.exc.StatementError as exc:
        raise SourceError(f"{audience}: the query failed: {_first_line(exc.orig)}") from None


def _wrapped(audience: Audience, suffix: str) -> sa.TextClause:
    # Colons are escaped: audience queries have no bind parameters; `'10:30'` or `x::text` stay as they are.
    query = audience.query.strip().rstrip(";").replace(":", r"\:")
    return sa.text(f"SELECT * FROM ({query}) AS audience_query{suffix}")


def _require_user_id(audience: Audience, result: sa.CursorResult[Any]) -> None:
    columns = list(result.keys())
    if "user_id" not in columns:
        raise SourceError(
            f"{audience}: the query returns no user_id column (it returns {', '.join(columns)})"
        )


def _stage_chunks(state: sa.Connection, insert: Any, result: sa.Result[Any]) -> tuple[int, int]:
    """Insert the query's rows chunk by chunk; returns (rows with a user_id, rows without)."""
    rows = nulls = 0
    for chunk in result.partitions():
        batch = []
        for row in chunk:
            traits = dict(row._mapping)
            user_id = traits.pop("user_id")
            if user_id is None or user_id == "":
                nulls += 1
                continue
            text = traits_json(traits)
            batch.append(
                {
                    "user_id": str(user_id),
                    "traits": text,
                    "traits_hash": traits_hash(text),
                }
            )
        rows += len(batch)
        if batch:
            state.execute(insert, batch)
    return rows, nulls


def _first_line(error: BaseException | None) -> str:
    text = str(error).strip() or type(error).__name__
    if "interrupted" in text or "canceling statement due to statement timeout" in text:
        return "timed out (SYNC_QUERY_TIMEOUT)"
    return text.splitlines()[0]
