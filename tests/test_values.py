"""One row, one message (issue 21): the same rows give the same user ids and traits whichever staging path
(in place on the state database, streamed from a source, even one naming the state database) and whichever
engine holds them, in the form sync.values documents (README "How values are sent")."""

import json
import re
import struct
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from sync import database
from sync.sandbox import EverflowServer, SegmentServer
from sync.staging import stage_members
from sync.tables import sync_stage
from sync.values import float_text
from tests.conftest import Config, _drop_postgres_database, _new_postgres_database, sync_in_process
from tests.test_audiences import the_audience
from tests.test_e2e import everflow_destination
from tests.test_traits import ENGINES

DBL_MAX = "1.7976931348623157e+308"
DIGITS_38 = "1234567890123456789012345678.1234567890"

# Every type of the engine, and rows of awkward values; the columns a user id is made of in turn.
TYPED = {
    "postgresql": (
        "CREATE TABLE typed (t text, v varchar(20), c char(8), i2 smallint, i4 integer, i8 bigint,"
        " n numeric(38, 10), nx numeric, f4 real, f8 double precision, b boolean, d date, ts timestamp,"
        " tz timestamptz, iv interval, u uuid, j json, jb jsonb, bin bytea)",
        f"INSERT INTO typed VALUES ('a', 'va', 'ab', 1, 2, 3, {DIGITS_38}, 1.50, 0.1, 0.1, true,"
        " '2024-01-31', '2024-01-31 10:00:00.5', '2024-01-31 12:00:00+02', '1 day 02:00:03.5',"
        " '6ba7b810-9dad-11d1-80b4-00c04fd430c8', '{\"a\": 1, \"b\": [1, 2]}', '{\"k\": \"v\"}', '\\x0102'),"
        f" ('b', 'vb', 'cd ef', -1, -2, -3, 0, 'NaN', 'NaN', {DBL_MAX}, false, '1999-12-31',"
        " '1999-12-31 23:59:59', '1999-12-31 23:59:59.25-05:30', '-3 hours', "
        " '6ba7b811-9dad-11d1-80b4-00c04fd430c8', '[1, \"x\"]', 'null', ''),"
        " ('c', NULL, NULL, NULL, 7, NULL, NULL, NULL, 1e6, 0.30000000000000004, NULL, NULL, NULL, NULL,"
        " NULL, NULL, NULL, NULL, NULL)",
        ["t", "c", "i4", "n", "f8", "b", "ts", "tz", "u"],
    ),
    "sqlite": (
        "CREATE TABLE typed (t TEXT, i INTEGER, r REAL, n NUMERIC, x, j JSON, bin BLOB)",
        f"INSERT INTO typed VALUES ('a', 1, 0.1, 1.5, 'x', '{{\"a\":1}}', x'0102'),"
        f" ('b', -2, {DBL_MAX}, 2, 1e15, '[1]', NULL),"
        " ('c', 3, 0.30000000000000004, NULL, 12345678901234567, NULL, NULL),"
        " ('d', 4, 1e-5, NULL, 1.0, NULL, NULL)",
        ["t", "i", "r", "x"],
    ),
}

# What the rules write for some of them (README "How values are sent")
EXPECTED = {
    "postgresql": [
        '"c":"ab"',
        '"c":"cd ef"',
        f'"n":{DIGITS_38}',
        '"nx":1.50',
        '"nx":null',
        '"f4":0.1',
        '"f4":null',
        '"f4":1e+06',
        f'"f8":{DBL_MAX}',
        '"f8":0.30000000000000004',
        '"b":true',
        '"ts":"2024-01-31T10:00:00.5"',
        '"tz":"2024-01-31T10:00:00Z"',
        '"tz":"2000-01-01T05:29:59.25Z"',
        '"iv":"P1DT2H3.5S"',
        '"iv":"-PT3H"',
        '"j":{"a":1,"b":[1,2]}',
        '"jb":null',
        '"bin":"AQI="',
    ],
    "sqlite": [
        '"r":0.1',
        f'"r":{DBL_MAX}',
        '"r":0.30000000000000004',
        '"r":1e-05',
        '"x":1e+15',
        '"x":12345678901234567',
        '"x":1',
        '"bin":"AQI="',
        '"n":1.5',
    ],
}
IDS = {
    "postgresql": {"ab", "cd ef", "true", "false", DBL_MAX, "0.30000000000000004", "2024-01-31T10:00:00Z"},
    "sqlite": {"0.1", DBL_MAX, "0.30000000000000004", "1e-05", "1e+15", "1"},
}


def _staged(engine: sa.Engine, source: sa.Engine, config: Config, name: str, query: str) -> dict[str, str]:
    audience = the_audience(config, name, query)
    with engine.connect() as conn:
        stage_members(conn, source, audience, 60.0)
        return dict(conn.execute(sa.select(sync_stage.c.user_id, sync_stage.c.traits)).all())  # type: ignore[arg-type]


def _source_naming(engine: sa.Engine) -> sa.Engine:
    """What SYNC_SOURCE_URL naming the state database makes of it: another engine on the same database."""
    return database.create_engine(engine.url.render_as_string(hide_password=False), source=True)


def _create(engine: sa.Engine, table: tuple[str, str, list[str]]) -> list[str]:
    """Create and fill a table of `(CREATE, INSERT, columns user ids are made of)`; returns those columns."""
    create, insert, id_columns = table
    with engine.begin() as conn:
        conn.exec_driver_sql(create)
        conn.exec_driver_sql(insert)
    return id_columns


def test_every_type_gives_the_same_ids_and_traits_in_place_and_streamed(
    engine: sa.Engine, config: Config
) -> None:
    id_columns = _create(engine, TYPED[engine.dialect.name])
    create = TYPED[engine.dialect.name][0]
    columns = re.split(r",\s*(?![^(]*\))", create[create.index("(") + 1 : -1])  # not numeric(38, 10)
    names = [column.split()[0] for column in columns]
    streamed = _source_naming(engine)
    queries = {  # each column as the user id; the every-type table, and on Postgres the types SQL writes
        f"By {column}": f"SELECT {column} AS user_id, {', '.join(names)} FROM typed" for column in id_columns
    }
    # on Postgres the types SQL writes, and those jsonb writes (to_jsonb in place); on SQLite text columns
    sql_types = {
        "postgresql": "SELECT t AS user_id, v, c, i2, i8, n, nx, b, d, ts, tz, u FROM typed",
        "sqlite": "SELECT t AS user_id, t AS again, i FROM typed",
    }
    queries["SQL types"] = sql_types[engine.dialect.name]
    if engine.dialect.name == "postgresql":
        queries["jsonb types"] = "SELECT t AS user_id, v, i2, i8, b, d, ts, u FROM typed"
    seen_ids: set[str] = set()
    seen_traits: list[str] = []
    try:
        for number, (name, query) in enumerate(queries.items()):
            in_place = _staged(engine, engine, config, f"{name} in place {number}", query)
            from_source = _staged(engine, streamed, config, f"{name} streamed {number}", query)
            assert _by_value(in_place) == _by_value(from_source), name
            seen_ids |= set(in_place)
            seen_traits += in_place.values()
    finally:
        streamed.dispose()

    assert IDS[engine.dialect.name] <= seen_ids
    for written in EXPECTED[engine.dialect.name]:
        assert any(written in traits for traits in seen_traits), written
    assert all(isinstance(json.loads(traits), dict) for traits in seen_traits)


# The same logical rows in each engine, in its own types: (column, type per engine; None where it has none)
LOGICAL: list[tuple[str, dict[str, str | None]]] = [
    ("name", {"postgres": "text", "sqlite": "TEXT", "duckdb": "VARCHAR", "mariadb": "VARCHAR(20)"}),
    ("age", {"postgres": "integer", "sqlite": "INTEGER", "duckdb": "INTEGER", "mariadb": "INTEGER"}),
    ("score", {"postgres": "float8", "sqlite": "REAL", "duckdb": "DOUBLE", "mariadb": "DOUBLE"}),
    ("ratio", {"postgres": "real", "sqlite": None, "duckdb": "FLOAT", "mariadb": "FLOAT"}),
    (
        "price",
        {
            "postgres": "numeric(38,10)",
            "sqlite": None,
            "duckdb": "DECIMAL(38,10)",
            "mariadb": "DECIMAL(38,10)",
        },
    ),
    ("day", {"postgres": "date", "sqlite": "TEXT", "duckdb": "DATE", "mariadb": "DATE"}),
    ("seen", {"postgres": "timestamp", "sqlite": "TEXT", "duckdb": "TIMESTAMP", "mariadb": "DATETIME(6)"}),
    ("meta", {"postgres": "jsonb", "sqlite": None, "duckdb": "JSON", "mariadb": None}),
]
ROWS = [
    ("u1", "Ada", 36, 0.1, 0.1, DIGITS_38, "2024-01-31", "2024-01-31 10:00:00.5", '{"a": [1, "x"]}'),
    ("u2", "Zoë", -1, 1.7976931348623157e308, 1e6, "0.0000000001", "1999-12-31", "1999-12-31 23:59:59", "[]"),
    ("u3", None, None, 0.30000000000000004, 3.5, "-5.0000000000", None, "2000-01-01 00:00:00.000001", None),
    ("u4", "x", 0, 1e15, 0.25, None, None, None, '{"k": null}'),
]
# a SQLite timestamp is text, as ISO 8601 writes it
SQLITE_TEXT = {"seen": lambda text: text.replace(" ", "T")}


@pytest.fixture(params=ENGINES)
def logical_source(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, sa.Engine, str]]:
    """The logical rows in one engine: its kind, the engine, the table."""
    kind = str(request.param)
    url = None
    if kind == "postgres":
        url = _new_postgres_database()
        source = database.create_engine(url, source=True)
    elif kind == "mariadb":
        source = request.getfixturevalue("mariadb")
    else:
        source = sa.create_engine(f"{kind}:///{tmp_path / 'source.db'}")
    table = f"people_{uuid.uuid4().hex[:8]}"
    kept = [(at, column, types[kind]) for at, (column, types) in enumerate(LOGICAL) if types[kind]]
    with source.begin() as conn:
        declared = ", ".join(f"{column} {kind_type}" for _, column, kind_type in kept)
        conn.exec_driver_sql(f"CREATE TABLE {table} (user_id VARCHAR(10), {declared})")
        places = ", ".join(f":c{at}" for at in range(len(kept) + 1))
        rows = []
        for row in ROWS:
            values = [row[0]]
            for at, column, _ in kept:
                value: Any = row[at + 1]
                if kind == "sqlite" and column in SQLITE_TEXT and value is not None:
                    value = SQLITE_TEXT[column](value)
                values.append(value)
            rows.append({f"c{at}": value for at, value in enumerate(values)})
        conn.execute(sa.text(f"INSERT INTO {table} VALUES ({places})"), rows)
    yield kind, source, table
    if kind != "mariadb":
        source.dispose()
    if url:
        _drop_postgres_database(url)


def _by_value(staged: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Staged traits as each value's text: identical values, whatever order and spacing the object has."""
    return {user_id: _with_number_text(traits) for user_id, traits in staged.items()}


def _with_number_text(traits: str) -> dict[str, Any]:
    """Traits with each number kept as its text, so 0.1 and 0.10000000149011612 differ."""
    return json.loads(
        traits, parse_float=lambda text: ("number", text), parse_int=lambda text: ("number", text)
    )


REFERENCE: dict[str, dict[str, Any]] = {
    "u1": {
        "name": "Ada",
        "age": ("number", "36"),
        "score": ("number", "0.1"),
        "ratio": ("number", "0.1"),
        "price": ("number", DIGITS_38),
        "day": "2024-01-31",
        "seen": "2024-01-31T10:00:00.5",
        "meta": {"a": [("number", "1"), "x"]},
    },
    "u2": {
        "name": "Zoë",
        "age": ("number", "-1"),
        "score": ("number", DBL_MAX),
        "ratio": ("number", "1e+06"),
        "price": ("number", "0.0000000001"),
        "day": "1999-12-31",
        "seen": "1999-12-31T23:59:59",
        "meta": [],
    },
    "u3": {
        "name": None,
        "age": None,
        "score": ("number", "0.30000000000000004"),
        "ratio": ("number", "3.5"),
        "price": ("number", "-5.0000000000"),
        "day": None,
        "seen": "2000-01-01T00:00:00.000001",
        "meta": None,
    },
    "u4": {
        "name": "x",
        "age": ("number", "0"),
        "score": ("number", "1e+15"),
        "ratio": ("number", "0.25"),
        "price": None,
        "day": None,
        "seen": None,
        "meta": {"k": None},
    },
}


def test_the_same_rows_in_each_engine_give_the_same_traits(
    logical_source: tuple[str, sa.Engine, str], engine: sa.Engine, config: Config
) -> None:
    kind, source, table = logical_source
    query = f"SELECT * FROM {table}"

    staged = _staged(engine, source, config, "People", query)

    assert {user_id: _with_number_text(traits) for user_id, traits in staged.items()} == {
        user_id: {column: value for column, value in traits.items() if dict(LOGICAL)[column][kind]}
        for user_id, traits in REFERENCE.items()
    }


TYPED_IDS = {  # a user id of each type whose text the rules fix, and a trait Everflow needs
    "postgresql": (
        "CREATE TABLE ids (c char(8), b boolean, f double precision, ts timestamptz, transaction_id text)",
        "INSERT INTO ids VALUES ('ab', true, 0.1, '2024-01-31 12:00:00+02', 'tid-1'),"
        " ('cd', false, 1.7976931348623157e308, '2024-02-01 00:00:00.5+00', 'tid-2')",
        ["c", "b", "f", "ts"],
    ),
    "sqlite": (
        "CREATE TABLE ids (r REAL, x, transaction_id TEXT)",
        "INSERT INTO ids VALUES (0.1, 1.0, 'tid-1'), (1.7976931348623157e308, 0.30000000000000004, 'tid-2')",
        ["r", "x"],
    ),
}


def test_a_source_url_naming_the_state_database_changes_nothing_after_an_in_place_sync(
    engine: sa.Engine, config: Config
) -> None:
    id_columns = _create(engine, TYPED_IDS[engine.dialect.name])
    streamed = _source_naming(engine)
    with EverflowServer() as everflow:
        destination = everflow_destination(config, everflow)
        for column in id_columns:
            query = f"SELECT {column} AS user_id, transaction_id FROM ids"
            config.connect(config.audience(f"By {column}", query), destination)
        initial = sync_in_process(engine, everflow, initial_only=True)
        assert [r.outcome for r in initial] == ["ok"] * len(id_columns)
        sent = len(everflow.requests)

        again = sync_in_process(engine, everflow, source=streamed)

    streamed.dispose()
    assert sent == 2 * len(id_columns)
    assert [(r.outcome, r.counts.get("entered"), r.counts.get("exited")) for r in again] == [
        ("ok", 0, 0)
    ] * len(id_columns)
    assert len(everflow.requests) == sent


def test_ids_whose_text_changed_hold_the_upgraded_run_and_others_send_nothing(
    engine: sa.Engine, config: Config
) -> None:
    """An upgrade over a state written before the rules: the id types installations use (text, integers,
    UUIDs) keep their text; a float id's text changed ('1.0' is now '1'): the mass-exit hold stops its run."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE people (code TEXT, n INTEGER, u VARCHAR(36), score REAL, tid TEXT)"
        )
        conn.execute(
            sa.text("INSERT INTO people VALUES (:code, :n, :u, :score, :tid)"),
            [
                {"code": f"c{i}", "n": i, "u": str(uuid.UUID(int=i)), "score": float(i), "tid": f"tid-{i}"}
                for i in range(150)
            ],
        )
    with EverflowServer() as everflow:
        destination = everflow_destination(config, everflow, rate_limit=1000)
        for column in ("code", "n", "u", "score"):
            query = f"SELECT {column} AS user_id, tid AS transaction_id FROM people"
            config.connect(config.audience(f"By {column}", query), destination)
        assert {r.outcome for r in sync_in_process(engine, everflow, initial_only=True)} == {"ok"}
        sent = len(everflow.requests)
        # what the code before the rules stored for the float ids (str() of the driver's float, and SQLite's
        # CAST of a REAL); the others are stored as they were
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE sync_state SET user_id = user_id || '.0' WHERE audience_id = "
                "(SELECT id FROM audiences WHERE name = 'By score')"
            )
            stored = dict(
                conn.exec_driver_sql(
                    "SELECT a.name, min(s.user_id) FROM sync_state s JOIN audiences a"
                    " ON a.id = s.audience_id GROUP BY a.name"
                ).all()
            )

        upgraded = {r.audience: r for r in sync_in_process(engine, everflow)}

    assert stored == {"By code": "c0", "By n": "0", "By u": str(uuid.UUID(int=0)), "By score": "0.0"}
    assert {name: r.outcome for name, r in upgraded.items()} == {
        "By code": "ok",
        "By n": "ok",
        "By u": "ok",
        "By score": "held",
    }
    assert "held: it would send false to 150 of 150 accepted members" in str(upgraded["By score"].error)
    assert len(everflow.requests) == sent  # nothing new sent for any of them


LARGE = {  # a value of each kind the form carries, which a message must carry whole
    "postgresql": (
        "SELECT 'u1' AS user_id, 'tid-1' AS transaction_id, 1.7976931348623157e308::float8 AS big,"
        f" {DIGITS_38}::numeric(38, 10) AS digits, repeat('x', 10000000) AS long"
    ),
    "sqlite": (
        f"SELECT 'u1' AS user_id, 'tid-1' AS transaction_id, {DBL_MAX} AS big,"
        " 9223372036854775807 AS digits, printf('%.*c', 10000000, 'x') AS long"  # SQLite has 64-bit integers
    ),
}


def test_dbl_max_38_digits_and_10_mb_of_text_are_sent_whole(engine: sa.Engine, config: Config) -> None:
    with SegmentServer(api_key="k") as segment:
        settings = {"transport": "segment", "endpoint": segment.url, "rate_limit": 1000}
        destination = config.destination("Segment", "everflow", settings, api_key=segment.api_key)
        config.connect(config.audience("Large", LARGE[engine.dialect.name]), destination)

        [result] = sync_in_process(engine, segment)

    assert result.outcome == "ok", result.error
    [request] = segment.requests
    traits = json.loads(request.body, parse_float=str, parse_int=str)["context"]["traits"]
    expected_digits = DIGITS_38 if engine.dialect.name == "postgresql" else "9223372036854775807"
    assert (traits["big"], traits["digits"]) == (DBL_MAX, expected_digits)
    assert traits["long"] == "x" * 10_000_000


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_a_float_is_written_as_the_shortest_text_that_reads_back(value: float) -> None:
    text = float_text(value)
    assert text is not None and float(text) == value
    digits = Decimal(repr(value)).normalize().as_tuple().digits  # Python's repr: the shortest digits
    assert Decimal(text).normalize().as_tuple().digits == (digits if value else (0,))


@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_a_float4_is_written_at_its_own_precision(value: float) -> None:
    text = float_text(value, single=True)
    assert text is not None
    assert struct.unpack("f", struct.pack("f", float(text)))[0] == value
    digits = len(Decimal(text).normalize().as_tuple().digits)
    if digits > 1:  # one digit fewer does not read back
        shorter = float(f"{value:.{digits - 2}e}")
        assert struct.unpack("f", struct.pack("f", shorter))[0] != value
