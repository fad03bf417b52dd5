"""Traits as JSON built by the source database: the text `sync.models.traits_json` writes, byte for byte.

Staged traits decide what is re-sent (a rejected entry waits until they change), so a source builds them
only where its text is the one traits_json writes for the values the driver returns: keys in Python's
sorted order, `", "` and `": "` between, each value as `json.dumps(..., ensure_ascii=False, default=str)`
writes it (a Decimal, a date or a datetime as its str()). Which column types qualify is decided per dialect
from the probe's cursor description (type codes; SQLite has none, so there it is decided per value by
`typeof`). Any other type keeps the whole audience on the Python path. A value of a qualifying type whose
text would still differ makes its row's traits NULL, and the caller stages again on the Python path: a
Decimal that str() writes with an exponent, a SQLite REAL (repr() and SQLite round differently) or BLOB,
a MariaDB binary string. So does a text holding `\\u00` from DuckDB or MariaDB, which escape control
characters in upper case (`\\u001F`, json.dumps writes `\\u001f`): the caller looks for it in each chunk,
which costs less than the source searching the text it built. MySQL proper is not tested here, so it keeps
the Python path.
"""

import json
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa

Value = Callable[[str, Any], str | None]  # (quoted column, its description row) -> SQL, or None

# json.dumps writes str(Decimal), which turns to an exponent below 1e-6 (and for a zero of scale > 6)
TINY = "0.000001"
QUOTE = "'\"'"  # the SQL literal '"'


class Built(NamedTuple):
    """The select list of a source building the traits: SQL over `q`."""

    user_id: str  # the user id as text, NULL for none
    traits: str  # the traits JSON, NULL where the source cannot write traits_json's text
    upper_escapes: bool  # and neither where the text holds `\u00` (DuckDB, MariaDB)


def traits_select(dialect: sa.Dialect, description: Sequence[Any]) -> Built | None:
    """SQL over `q` of the user id as text (NULL for none) and of the traits JSON, built by the source, or
    None when it cannot build the same text (the dialect, a column's type, a column name repeated)."""
    name = "mariadb" if getattr(dialect, "is_mariadb", False) else dialect.name
    if name not in DIALECTS or len({column[0] for column in description}) < len(description):
        return None
    value, user_id, row_check, concat = DIALECTS[name]
    quote = dialect.identifier_preparer.quote_identifier
    by_name = {column[0]: column for column in description}
    parts = []
    for position, key in enumerate(sorted(set(by_name) - {"user_id"})):
        sql = value(f"q.{quote(key)}", by_name[key])
        if sql is None:
            return None
        text = ("{" if position == 0 else ", ") + json.dumps(key, ensure_ascii=False) + ": "
        parts += [_literal(dialect, text), sql]
    user = user_id("q.user_id", by_name["user_id"])
    if user is None:
        return None
    traits = concat([*parts, _literal(dialect, "}")]) if parts else _literal(dialect, "{}")
    return Built(user, row_check(traits), name in ("duckdb", "mariadb"))


def _literal(dialect: sa.Dialect, text: str) -> str:
    """`text` as a string literal of the dialect (MariaDB's escapes backslashes unless sql_mode says not)."""
    literal = sa.literal(text, sa.String()).compile(dialect=dialect, compile_kwargs={"literal_binds": True})
    return str(literal)


def _decimal(column: str, text: str, long_scale: str, concat: Callable[[list[str]], str]) -> str:
    """A Decimal as str() writes it: the database's text unless str() would use an exponent."""
    exponent = f"({column} = 0 AND {long_scale}) OR ({column} <> 0 AND abs({column}) < {TINY})"
    quoted = concat([QUOTE, text, QUOTE])
    return f"CASE WHEN {column} IS NULL THEN 'null' WHEN {exponent} THEN NULL ELSE {quoted} END"


def _pipes(parts: list[str]) -> str:
    return " || ".join(parts)


def _concat(parts: list[str]) -> str:
    return f"CONCAT({', '.join(parts)})"


def _trusted(traits: str) -> str:
    return traits


# Postgres, as psycopg loads its types (type codes are OIDs)
PG_TEXT = {25, 1043, 19}  # text, varchar, name (char(n) is not: psycopg keeps its padding, to_json not)
PG_INTEGER = {20, 21, 23}
PG_BOOL, PG_NUMERIC, PG_DATE, PG_TIMESTAMP = 16, 1700, 1082, 1114


def _python_dates(column: str) -> str:
    """Within the dates Python holds (drivers refuse the others: BC, infinity, year 10000 and later)."""
    return f"{column} >= '0001-01-01' AND {column} < '10000-01-01'"


def _postgres_value(column: str, description: Any) -> str | None:
    oid = description[1]
    if oid in PG_TEXT or oid == PG_BOOL:
        return f"COALESCE(to_json({column})::text, 'null')"
    if oid in PG_INTEGER:
        return f"COALESCE({column}::text, 'null')"
    if oid == PG_NUMERIC:
        return _decimal(column, f"{column}::text", f"scale({column}) > 6", _pipes)
    if oid == PG_DATE:  # to_json writes ISO 8601 whatever the DateStyle
        text = f"to_json({column})::text"
        return f"CASE WHEN {column} IS NULL THEN 'null' WHEN {_python_dates(column)} THEN {text} END"
    if oid == PG_TIMESTAMP:  # str(datetime): microseconds only when there are some
        seconds = f"to_char({column}, 'YYYY-MM-DD HH24:MI:SS')"
        micro = f"to_char({column}, '.US')"
        return (
            f"CASE WHEN {column} IS NULL THEN 'null' WHEN {_python_dates(column)} THEN '\"' || {seconds} || "
            f"CASE WHEN {column} = date_trunc('second', {column}) THEN '' ELSE {micro} END || '\"' END"
        )
    return None


def _postgres_user_id(column: str, description: Any) -> str | None:
    oid = description[1]
    if oid in PG_TEXT:
        return f"NULLIF({column}, '')"
    return f"{column}::text" if oid in PG_INTEGER else None


def _sqlite_value(column: str, _description: Any) -> str:
    # typeof per value: a REAL or a BLOB cannot match (NULL: the Python path)
    return (
        f"CASE typeof({column}) WHEN 'text' THEN json_quote({column})"
        f" WHEN 'integer' THEN CAST({column} AS TEXT) WHEN 'null' THEN 'null' END"
    )


def _sqlite_user_id(column: str, _description: Any) -> str:
    return (
        f"CASE typeof({column}) WHEN 'text' THEN NULLIF({column}, '')"
        f" WHEN 'integer' THEN CAST({column} AS TEXT) END"
    )


def _sqlite_row_check(traits: str) -> str:
    """NULL where the user id is a REAL or a BLOB, whose text str() writes otherwise."""
    return f"CASE WHEN typeof(q.user_id) IN ('real', 'blob') THEN NULL ELSE {traits} END"


DUCKDB_INTEGER = {
    f"{unsigned}{size}INT" for unsigned in ("", "U") for size in ("TINY", "SMALL", "", "BIG", "HUGE")
} | {"INTEGER", "UINTEGER"}
DUCKDB_DECIMAL = re.compile(r"DECIMAL\(\d+,(\d+)\)")


def _duckdb_value(column: str, description: Any) -> str | None:
    kind = str(description[1])
    if kind in ("VARCHAR", "BOOLEAN"):
        return f"COALESCE(CAST(to_json({column}) AS VARCHAR), 'null')"
    if kind in DUCKDB_INTEGER:
        return f"COALESCE(CAST({column} AS VARCHAR), 'null')"
    if decimal := DUCKDB_DECIMAL.fullmatch(kind):
        return _decimal(column, f"CAST({column} AS VARCHAR)", str(int(decimal[1]) > 6).lower(), _pipes)
    if kind in ("DATE", "TIMESTAMP"):
        text = (
            f"strftime({column}, '%Y-%m-%d')"
            if kind == "DATE"
            else f"CASE WHEN epoch_us({column}) % 1000000 = 0 THEN strftime({column}, '%Y-%m-%d %H:%M:%S')"
            f" ELSE strftime({column}, '%Y-%m-%d %H:%M:%S.%f') END"
        )
        within = _python_dates(column)
        return f"CASE WHEN {column} IS NULL THEN 'null' WHEN {within} THEN '\"' || {text} || '\"' END"
    return None


def _duckdb_user_id(column: str, description: Any) -> str | None:
    kind = str(description[1])
    if kind == "VARCHAR":
        return f"NULLIF({column}, '')"
    return f"CAST({column} AS VARCHAR)" if kind in DUCKDB_INTEGER else None


# MariaDB, as PyMySQL loads its types (pymysql.constants.FIELD_TYPE); a text and a binary string share their
# type codes, so binary ones (PyMySQL returns bytes) are told apart per value by CHARSET()
MARIADB_STRING = {15, 247, 248, 252, 253, 254}  # VARCHAR, ENUM, SET, BLOB and TEXT, VAR_STRING, STRING
MARIADB_INTEGER = {1, 2, 3, 8, 9, 13}  # TINY (BOOLEAN), SHORT, LONG, LONGLONG, INT24, YEAR
MARIADB_DECIMAL = {0, 246}
MARIADB_DATE = {10, 14}  # PyMySQL returns an impossible date ('0000-00-00') as the server's text: so is it
MARIADB_DATETIME = {7, 12}  # TIMESTAMP, DATETIME: without fractions only (str() leaves out .000000)


def _mariadb_value(column: str, description: Any) -> str | None:
    kind, scale = description[1], description[5]
    if kind in MARIADB_STRING:
        text = f"WHEN CHARSET({column}) <> 'binary' THEN JSON_QUOTE({column})"
        return f"CASE WHEN {column} IS NULL THEN 'null' {text} END"
    if kind in MARIADB_INTEGER:
        return f"COALESCE(CAST({column} AS CHAR), 'null')"
    if kind in MARIADB_DECIMAL:
        return _decimal(column, f"CAST({column} AS CHAR)", str((scale or 0) > 6).upper(), _concat)
    if kind in MARIADB_DATE or (kind in MARIADB_DATETIME and not scale):
        return f"COALESCE(CONCAT('\"', CAST({column} AS CHAR), '\"'), 'null')"
    return None


def _mariadb_user_id(column: str, description: Any) -> str | None:
    kind = description[1]
    if kind in MARIADB_STRING:  # a binary one: CHARSET() makes the row's traits NULL (_mariadb_row_check)
        return f"NULLIF({column}, '')"
    return f"CAST({column} AS CHAR)" if kind in MARIADB_INTEGER else None


def _mariadb_row_check(traits: str) -> str:
    """NULL where the user id is a binary string (PyMySQL returns bytes, whose str() is `b'...'`)."""
    return f"CASE WHEN CHARSET(q.user_id) = 'binary' THEN NULL ELSE {traits} END"


DIALECTS: dict[str, tuple[Value, Value, Callable[[str], str], Callable[[list[str]], str]]] = {
    "postgresql": (_postgres_value, _postgres_user_id, _trusted, _pipes),
    "sqlite": (_sqlite_value, _sqlite_user_id, _sqlite_row_check, _pipes),
    "duckdb": (_duckdb_value, _duckdb_user_id, _trusted, _pipes),
    "mariadb": (_mariadb_value, _mariadb_user_id, _mariadb_row_check, _concat),
}
