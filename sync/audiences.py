"""Audiences: their keys, their configuration rows, and the SQL around their queries."""

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import inflection
import sqlalchemy as sa

from sync.errors import ConfigError, SourceError, SourceInterrupted, first_line
from sync.guards import one_select, read_only
from sync.settings import Cadence
from sync.tables import audiences, readable_columns
from sync.watchdog import Interrupted, Refused

KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


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
    source: str | None = None  # a `sources` name; None: SYNC_SOURCE_URL, else the state database

    def __str__(self) -> str:
        return f"audience {self.name!r} (id {self.id})"

    @property
    def query_text(self) -> str:
        """The query as the SQL around it takes it: no blanks around it, no closing semicolon."""
        return self.query.strip().rstrip(";")


def row_problems(row: sa.Row[Any]) -> list[str]:
    """Every problem of one `audiences` row, each naming the row and field (`check` lists them all)."""
    where = f"audiences row id={row.id} ({row.name!r})"
    problems = [
        f"{where}: {field} holds {type(value).__name__} data, not text"
        for field in ("name", "key", "query", "schedule", "source")
        if (value := getattr(row, field)) is not None and not isinstance(value, str)
    ]
    if problems:  # the other checks read these fields as text
        return problems
    key = row.key if row.key is not None else derive_key(row.name)
    if not KEY_PATTERN.match(key):
        field = "key" if row.key is not None else "name"
        problems.append(f"{where}: key {key!r} (from {field}) is not snake_case; set audiences.key by hand")
    if not (row.query or "").strip():
        problems.append(f"{where}: query is empty")
    try:
        Cadence.parse(row.schedule, f"{where}: schedule") if row.schedule else None
    except ConfigError as exc:
        problems.append(str(exc))
    return problems


def audience_from_row(row: sa.Row[Any]) -> Audience:
    """Validate one `audiences` row; raises ConfigError naming the row and each wrong field."""
    problems = row_problems(row)
    if problems:
        raise ConfigError("; ".join(problems))
    cadence = Cadence.parse(row.schedule, "schedule") if row.schedule else None
    key = row.key if row.key is not None else derive_key(row.name)
    return Audience(row.id, row.name, key, row.query, cadence, row.key is not None, row.source)


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


def is_member(source: sa.Engine, audience: Audience, user_id: str, timeout: float) -> bool:
    """Whether the audience's query returns `user_id` now (read-only, like a run)."""
    with query_failures(audience), source.connect() as conn, read_only(conn, timeout):
        # compared in Python too: MySQL's default collations take 'U1' and 'u1 ' for 'u1'
        as_text = str(sa.cast(sa.literal_column("q.user_id"), sa.String()).compile(dialect=conn.dialect))
        select = over_query(audience, as_text, suffix=f" AND {as_text} = :user_id")
        one_select(conn, select)
        return user_id in conn.execute(select, {"user_id": user_id}).scalars().all()


@contextmanager
def query_failures(audience: Audience) -> Iterator[None]:
    """Turn the database's refusal of an audience query into a SourceError naming the audience. Not chained:
    the statement's parameters (a staged chunk) hold members' data, which a traceback would print."""
    try:
        yield
    except sa.exc.StatementError as exc:
        raise SourceError(f"{audience}: the query failed: {_reason(exc, audience)}") from None
    except Interrupted as exc:
        raise SourceInterrupted(f"{audience}: the query was {exc}") from None
    except Refused as exc:
        raise SourceError(f"{audience}: the query failed: {exc}") from None


def _reason(error: sa.exc.StatementError, audience: Audience) -> str:
    """The database's message about the audience's query, without the SQL audience-sync wraps it in
    (`over_query`): where the message points into that wrapping, the error is at the end of the query."""
    text = first_line(error)
    if "interrupted" in text or "canceling statement due to statement timeout" in text:
        return "timed out (SYNC_QUERY_TIMEOUT)"
    text = MYSQL_NEAR.sub(_mysql_near, text)
    if _past_the_query(error, audience):
        text = POSTGRES_NEAR.sub("at the end of the query", text)
    return text


# MariaDB and MySQL quote the statement from the error on, up to 80 characters (with the line of the
# wrapping `over_query` puts after the query); Postgres names a token, and its position in the statement
MYSQL_NEAR = re.compile(r"near '(.*?)(?:\\n|\n)?\) AS q WHERE .*?' at line (\d+)")
POSTGRES_NEAR = re.compile(r'at or near ".*"$')


def _mysql_near(match: re.Match[str]) -> str:
    return f"near '{match[1]}' at line {match[2]}" if match[1].strip() else "at the end of the query"


def _past_the_query(error: sa.exc.StatementError, audience: Audience) -> bool:
    """Whether the database places the error (Postgres: its position in the statement) after the query."""
    position = getattr(getattr(error.orig, "diag", None), "statement_position", None)
    query = audience.query_text
    start = (error.statement or "").find(query)
    return str(position).isdigit() and start >= 0 and int(str(position)) > start + len(query)


def escaped(sql: str) -> str:
    # Colons are escaped: audience queries have no bind parameters; `'10:30'` or `x::text` stay as they are.
    return sql.replace(":", r"\:")


def wrapped(audience: Audience, suffix: str) -> sa.TextClause:
    return over_query(audience, "*", suffix=suffix)


def over_query(audience: Audience, select_list: str, prefix: str = "", suffix: str = "") -> sa.TextClause:
    """`{prefix}SELECT {select_list} FROM (<audience query>) AS q WHERE :one = 1{suffix}`.

    The bound parameter makes psycopg use the extended protocol, which refuses a query that smuggles in
    more statements (`...) AS x; COMMIT; DELETE ...`); SQLite's driver refuses those anyway.
    """
    query = escaped(audience.query_text)
    # the line break ends a `-- comment` on the query's last line
    return sa.text(f"{prefix}SELECT {select_list} FROM ({query}\n) AS q WHERE :one = 1{suffix}").bindparams(
        one=1
    )


def require_user_id(audience: Audience, result: sa.CursorResult[Any]) -> list[str]:
    columns = list(result.keys())
    if "user_id" not in columns:
        raise SourceError(
            f"{audience}: the query returns no user_id column (it returns {', '.join(columns)})"
        )
    return columns
