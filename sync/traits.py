"""Traits as JSON built by the source database: the text `sync.values.traits_text` writes, byte for byte.

A source builds them only where its text is the one the rules write for the values the driver returns:
`{"a":1,"b":"x"}`, the query's columns in its order, each value as `sync.values.json_value` writes it. Which
column types qualify is decided per dialect from the probe's cursor description (type codes; SQLite has none,
so there it is decided per value by `typeof`). Any other type keeps the whole audience on the Python path. A
value of a qualifying type whose text would still differ makes its row's traits NULL, and the caller stages
again on the Python path: a date outside Python's, a SQLite REAL whose 15-digit text does not read back, a
BLOB, a MariaDB binary string or impossible date. So does a text holding `\\u00` from DuckDB or MariaDB, which
escape control characters in upper case (`\\u001F`, json.dumps writes `\\u001f`): the caller looks for it in
each chunk, which costs less than the source searching the text it built. MySQL proper is not tested here, so
it keeps the Python path. tests/test_values.py proves each builder equal to the rules on its engine.
"""

import json
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa

from sync.values import PLAIN, Kind

Value = Callable[[str, Any], str | None]  # (quoted column, its description row) -> SQL, or None


class Built(NamedTuple):
    """The select list of a source building the traits: SQL over `q`."""

    user_id: str  # the user id as text, NULL for none
    traits: str  # the traits JSON, NULL where the source cannot write the rules' text
    upper_escapes: bool  # and neither where the text holds `\u00` (DuckDB, MariaDB)


def dialect_name(dialect: sa.Dialect) -> str:
    return "mariadb" if getattr(dialect, "is_mariadb", False) else dialect.name


def traits_select(dialect: sa.Dialect, description: Sequence[Any]) -> Built | None:
    """SQL over `q` of the user id as text (NULL for none) and of the traits JSON, built by the source, or
    None when it cannot build the same text (the dialect, a column's type, a column name repeated)."""
    name = dialect_name(dialect)
    if name not in DIALECTS or len({column[0] for column in description}) < len(description):
        return None
    value, user_id, row_check, concat = DIALECTS[name]
    quote = dialect.identifier_preparer.quote_identifier
    parts: list[str] = []
    user = None
    for column in description:
        if column[0] == "user_id":
            user = user_id("q.user_id", column)
            if user is None:
                return None
            continue
        sql = value(f"q.{quote(column[0])}", column)
        if sql is None:
            return None
        text = ("{" if not parts else ",") + json.dumps(column[0], ensure_ascii=False) + ":"
        parts += [_literal(dialect, text), sql]
    if user is None:
        return None
    traits = concat([*parts, _literal(dialect, "}")]) if parts else _literal(dialect, "{}")
    return Built(user, row_check(traits), name in ("duckdb", "mariadb"))


def kinds(dialect: sa.Dialect, description: Sequence[Any]) -> list[Kind]:
    """What each column's type says beyond the driver's value (a float4, a padded char, JSON as text)."""
    name = dialect_name(dialect)
    found = []
    for column in description:
        code = column[1] if name != "duckdb" else str(column[1])
        if name == "postgresql":
            kind = Kind(single=code == PG_FLOAT4, padded=code == PG_CHAR)
        elif name == "duckdb":
            kind = Kind(single=code == "FLOAT", json_text=code == "JSON")
        elif name == "mariadb":
            kind = Kind(single=code == MARIADB_FLOAT)
        else:
            kind = PLAIN
        found.append(kind)
    return found


def _literal(dialect: sa.Dialect, text: str) -> str:
    """`text` as a string literal of the dialect (MariaDB's escapes backslashes unless sql_mode says not)."""
    literal = sa.literal(text, sa.String()).compile(dialect=dialect, compile_kwargs={"literal_binds": True})
    return str(literal)


def _pipes(parts: list[str]) -> str:
    return " || ".join(parts)


def _concat(parts: list[str]) -> str:
    return f"CONCAT({', '.join(parts)})"


def _trusted(traits: str) -> str:
    return traits


# Postgres, as psycopg loads its types (type codes are OIDs)
PG_TEXT = {25, 1043, 19}  # text, varchar, name
PG_CHAR = 1042  # char(n): to_json and psycopg keep its padding, its CAST to text does not
PG_INTEGER = {20, 21, 23}
PG_FLOAT4 = 700
PG_BOOL, PG_NUMERIC, PG_DATE, PG_TIMESTAMP, PG_TIMESTAMPTZ, PG_UUID = 16, 1700, 1082, 1114, 1184, 2950
PG_NOT_FINITE = "('NaN', 'Infinity', '-Infinity')"


# Types whose values Postgres's jsonb writes as the rules do (the in-place path's `to_jsonb(q)`: its object
# is spaced and ordered by key length, as stored before issue 21, so those audiences' traits do not change)
PG_JSONB_AS_RULES = PG_TEXT | PG_INTEGER | {PG_BOOL, PG_DATE, PG_TIMESTAMP, PG_UUID}


def postgres_jsonb(description: Sequence[Any]) -> bool:
    """Whether every column of the query is of a type `to_jsonb` writes as the rules do."""
    return all(column[1] in PG_JSONB_AS_RULES for column in description)


def _python_dates(column: str) -> str:
    """Within the dates Python holds (drivers refuse the others: BC, infinity, year 10000 and later)."""
    return f"{column} >= '0001-01-01' AND {column} < '10000-01-01'"


def _postgres_numeric(column: str) -> str:
    """A numeric's digits; NULL for NaN and infinities. (Not a float's text: Postgres writes some integral
    doubles with every digit, 4.0599937200552656e+16 where 4.059993720055266e+16 reads back.)"""
    return f"CASE WHEN {column} IN {PG_NOT_FINITE} THEN NULL ELSE {column}::text END"


def _postgres_value(column: str, description: Any) -> str | None:
    oid = description[1]
    if oid in PG_TEXT or oid == PG_UUID:
        return f"COALESCE(to_json({column})::text, 'null')"
    if oid == PG_CHAR:
        return f"COALESCE(to_json({column}::text)::text, 'null')"
    if oid in PG_INTEGER or oid == PG_BOOL:
        return f"COALESCE({column}::text, 'null')"
    if oid == PG_NUMERIC:
        return f"COALESCE({_postgres_numeric(column)}, 'null')"
    if oid in (PG_DATE, PG_TIMESTAMP, PG_TIMESTAMPTZ):  # to_json writes ISO 8601 whatever the DateStyle
        utc = f"({column} AT TIME ZONE 'UTC')" if oid == PG_TIMESTAMPTZ else column
        text = (
            f"rtrim(to_json({utc})::text, '\"') || 'Z\"'"
            if oid == PG_TIMESTAMPTZ
            else f"to_json({utc})::text"
        )
        return f"CASE WHEN {column} IS NULL THEN 'null' WHEN {_python_dates(utc)} THEN {text} END"
    return None


def _postgres_user_id(column: str, description: Any) -> str | None:
    oid = description[1]
    if oid in PG_TEXT:
        return f"NULLIF({column}, '')"
    if oid == PG_CHAR:
        return f"NULLIF({column}::text, '')"
    if oid in PG_INTEGER or oid in (PG_BOOL, PG_UUID):
        return f"{column}::text"
    return _postgres_numeric(column) if oid == PG_NUMERIC else None


# SQLite writes a REAL with at most 15 significant digits; where those read back, they are the shortest
# text (any shorter one would round to them), written as the rules write it ('%.15g', positional from 1e-4
# to 1e15). Where they do not, the Python path writes it; so it does outside that range, where SQLite reads
# a text back to another double than a correct reader does (6.6294503290469e-127 reads back in SQLite,
# found by tests/test_traits.py).
def sqlite_real(column: str) -> str:
    return f"printf('%.15g', {column})"


def sqlite_real_ok(column: str) -> str:
    within = f"({column} = 0 OR (abs({column}) >= 0.0001 AND abs({column}) < 1e15))"
    return f"{within} AND CAST({sqlite_real(column)} AS REAL) = {column}"


def _sqlite_value(column: str, _description: Any) -> str:
    # typeof per value: a REAL that does not read back or a BLOB cannot match (NULL: the Python path)
    return (
        f"CASE typeof({column}) WHEN 'text' THEN json_quote({column})"
        f" WHEN 'integer' THEN CAST({column} AS TEXT) WHEN 'null' THEN 'null'"
        f" WHEN 'real' THEN CASE WHEN {sqlite_real_ok(column)} THEN {sqlite_real(column)} END END"
    )


def sqlite_user_id(column: str, _description: Any = None) -> str:
    return (
        f"CASE typeof({column}) WHEN 'text' THEN NULLIF({column}, '')"
        f" WHEN 'integer' THEN CAST({column} AS TEXT) WHEN 'real' THEN {sqlite_real(column)} END"
    )


def sqlite_value_ok(column: str) -> str:
    """Whether the value's text is the rules' one: not a BLOB, not a REAL whose 15 digits do not read back."""
    return f"typeof({column}) <> 'blob' AND (typeof({column}) <> 'real' OR {sqlite_real_ok(column)})"


def _sqlite_row_check(traits: str) -> str:
    """NULL where the user id is a BLOB or a REAL the rules write otherwise."""
    return f"CASE WHEN {sqlite_value_ok('q.user_id')} THEN {traits} END"


DUCKDB_INTEGER = {
    f"{unsigned}{size}INT" for unsigned in ("", "U") for size in ("TINY", "SMALL", "", "BIG", "HUGE")
} | {"INTEGER", "UINTEGER"}
DUCKDB_DECIMAL = re.compile(r"DECIMAL\(\d+,(\d+)\)")


def _duckdb_value(column: str, description: Any) -> str | None:
    kind = str(description[1])
    if kind in ("VARCHAR", "BOOLEAN"):
        return f"COALESCE(CAST(to_json({column}) AS VARCHAR), 'null')"
    if kind in DUCKDB_INTEGER or DUCKDB_DECIMAL.fullmatch(kind):
        return f"COALESCE(CAST({column} AS VARCHAR), 'null')"
    if kind in ("DATE", "TIMESTAMP"):
        text = (
            f"strftime({column}, '%Y-%m-%d')"
            if kind == "DATE"
            else f"strftime({column}, '%Y-%m-%dT%H:%M:%S') || CASE WHEN epoch_us({column}) % 1000000 = 0"
            f" THEN '' ELSE rtrim(strftime({column}, '.%f'), '0') END"
        )
        within = _python_dates(column)
        return f"CASE WHEN {column} IS NULL THEN 'null' WHEN {within} THEN '\"' || {text} || '\"' END"
    return None


def _duckdb_user_id(column: str, description: Any) -> str | None:
    kind = str(description[1])
    if kind == "VARCHAR":
        return f"NULLIF({column}, '')"
    return f"CAST({column} AS VARCHAR)" if kind in DUCKDB_INTEGER or kind == "BOOLEAN" else None


# MariaDB, as PyMySQL loads its types (pymysql.constants.FIELD_TYPE); a text and a binary string share their
# type codes, so binary ones (PyMySQL returns bytes) are told apart per value by CHARSET()
MARIADB_STRING = {15, 247, 248, 252, 253, 254}  # VARCHAR, ENUM, SET, BLOB and TEXT, VAR_STRING, STRING
MARIADB_INTEGER = {1, 2, 3, 8, 9, 13}  # TINY (BOOLEAN), SHORT, LONG, LONGLONG, INT24, YEAR
MARIADB_DECIMAL = {0, 246}
MARIADB_FLOAT = 4
MARIADB_DATE = {10, 14}  # PyMySQL returns an impossible date ('0000-00-00') as the server's text: so is it
MARIADB_DATETIME = {7, 12}  # TIMESTAMP, DATETIME: without fractions only


def _mariadb_value(column: str, description: Any) -> str | None:
    kind, scale = description[1], description[5]
    if kind in MARIADB_STRING:
        text = f"WHEN CHARSET({column}) <> 'binary' THEN JSON_QUOTE({column})"
        return f"CASE WHEN {column} IS NULL THEN 'null' {text} END"
    if kind in MARIADB_INTEGER or kind in MARIADB_DECIMAL:
        return f"COALESCE(CAST({column} AS CHAR), 'null')"
    if kind in MARIADB_DATE:
        return f"COALESCE(CONCAT('\"', CAST({column} AS CHAR), '\"'), 'null')"
    if kind in MARIADB_DATETIME and not scale:  # an impossible one (PyMySQL's text): the Python path
        possible = f"YEAR({column}) > 0 AND MONTH({column}) > 0 AND DAYOFMONTH({column}) > 0"
        text = f"CONCAT('\"', DATE_FORMAT({column}, '%Y-%m-%dT%H:%i:%s'), '\"')"
        return f"CASE WHEN {column} IS NULL THEN 'null' WHEN {possible} THEN {text} END"
    return None


def _mariadb_user_id(column: str, description: Any) -> str | None:
    kind = description[1]
    if kind in MARIADB_STRING:  # a binary one: CHARSET() makes the row's traits NULL (_mariadb_row_check)
        return f"NULLIF({column}, '')"
    return f"CAST({column} AS CHAR)" if kind in MARIADB_INTEGER or kind in MARIADB_DECIMAL else None


def _mariadb_row_check(traits: str) -> str:
    """NULL where the user id is a binary string (PyMySQL returns bytes, which the rules write as base64)."""
    return f"CASE WHEN CHARSET(q.user_id) = 'binary' THEN NULL ELSE {traits} END"


DIALECTS: dict[str, tuple[Value, Value, Callable[[str], str], Callable[[list[str]], str]]] = {
    "postgresql": (_postgres_value, _postgres_user_id, _trusted, _pipes),
    "sqlite": (_sqlite_value, sqlite_user_id, _sqlite_row_check, _pipes),
    "duckdb": (_duckdb_value, _duckdb_user_id, _trusted, _pipes),
    "mariadb": (_mariadb_value, _mariadb_user_id, _mariadb_row_check, _concat),
}
