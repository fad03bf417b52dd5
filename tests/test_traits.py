"""Traits JSON and user ids built by each source dialect (sync.traits) are the text the rules of sync.values
write for the same row, proved on each real engine.

Over awkward values (unicode and control characters, quotes and backslashes in keys and values, decimals of
any exponent, floats of both precisions, dates, timestamps in any zone, NULLs): the source's text is the
rules', or NULL exactly where it says it cannot write it (the row then goes the Python path).
"""

import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync.audiences import escaped
from sync.models import traits_json
from sync.staging import STAGE_CHUNK, Columns, _as_rules_text, python_traits, stage_members
from sync.tables import sync_stage
from sync.traits import DIALECTS, dialect_name, kinds, traits_select
from sync.values import user_id_text
from tests.conftest import Config, _drop_postgres_database, _new_postgres_database
from tests.test_audiences import the_audience

TEXT = st.text(st.characters(min_codepoint=1, exclude_categories=["Cs"]), max_size=12)
CONTROL = st.text(st.characters(max_codepoint=0x7F, min_codepoint=1) | st.sampled_from("\\\"'é\u2028😀"))
DECIMALS = st.decimals(min_value=-(10**9), max_value=10**9, places=8)
ANY_DECIMALS = st.decimals().map(lambda d: Decimal("NaN") if d.is_nan() else d) | st.decimals(
    min_value=Decimal("-1E-5"), max_value=Decimal("1E-5")
)  # Postgres holds NaN and infinities, but no -NaN or sNaN
CENTS = st.decimals(min_value=-(10**9), max_value=10**9, places=2)
BIG = st.integers(min_value=-(2**63), max_value=2**63 - 1)
DATES = st.dates()
NAIVE = st.datetimes() | st.datetimes().map(lambda t: t.replace(microsecond=0))  # without a time zone
SECONDS = st.datetimes(min_value=datetime(1000, 1, 1)).map(lambda t: t.replace(microsecond=0))  # noqa: DTZ001
Staged = tuple[str | None, str | None]  # the user id as text, the traits
KEY = "a b'c\"d\\e"  # a key with a quote of each kind and a backslash; "Zé" sorts before lower case
FLOATS = st.floats() | st.sampled_from([0.1, 0.1 + 0.2, 1e15, 1e16, 1e-5, 1.7976931348623157e308, -0.0, 0.5])
AWARE = st.builds(
    lambda t, hours: t.replace(tzinfo=timezone(timedelta(hours=hours))),
    st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 1, 1)),  # noqa: DTZ001
    st.integers(-12, 14),
)
SQLITE_ANY = st.one_of(TEXT, CONTROL, BIG, FLOATS, st.binary(max_size=4))

# per dialect: column name -> (declared type, values)
COLUMNS: dict[str, dict[str, tuple[str, st.SearchStrategy[Any]]]] = {
    "sqlite": {"t": ("", SQLITE_ANY), KEY: ("TEXT", SQLITE_ANY), "Zé": ("INTEGER", SQLITE_ANY)},
    "postgres": {
        "t": ("text", TEXT | CONTROL),
        KEY: ("varchar(40)", TEXT),
        "Zé": ("bigint", BIG),
        "b": ("boolean", st.booleans()),
        "n": ("numeric", ANY_DECIMALS),
        "n2": ("numeric(12, 2)", CENTS),
        "d": ("date", DATES),
        "ts": ("timestamp", NAIVE),
        "tz": ("timestamptz", AWARE),
        "c": ("char(8)", st.text(st.characters(min_codepoint=33, max_codepoint=0x7E), max_size=6)),
        "n38": ("numeric(38, 10)", st.decimals(min_value=-(10**27), max_value=10**27, places=10)),
        "id": ("uuid", st.uuids()),
    },
    "duckdb": {
        "t": ("VARCHAR", TEXT | CONTROL),
        KEY: ("VARCHAR", TEXT),
        "Zé": ("HUGEINT", BIG),
        "b": ("BOOLEAN", st.booleans()),
        "n": ("DECIMAL(18, 8)", DECIMALS),
        "n2": ("DECIMAL(12, 2)", CENTS),
        "d": ("DATE", DATES),
        "ts": ("TIMESTAMP", NAIVE),
    },
    "mariadb": {
        "t": ("TEXT", TEXT | CONTROL),
        KEY: ("VARCHAR(40)", TEXT),
        "Zé": ("BIGINT", BIG),
        "b": ("BOOLEAN", st.booleans()),
        "n": ("DECIMAL(18, 8)", DECIMALS),
        "n2": ("DECIMAL(12, 2)", CENTS),
        "d": ("DATE", DATES.filter(lambda d: d.year >= 1000)),
        "ts": ("DATETIME", SECONDS),
        "raw": ("VARBINARY(8)", st.binary(max_size=4)),
    },
}


def _sqlite_cannot(value: Any) -> bool:
    """A BLOB, or a REAL outside 1e-4 to 1e15 or whose 15 significant digits do not read back."""
    if isinstance(value, float):
        within = value == 0 or 1e-4 <= abs(value) < 1e15
        return not within or float(f"{value:.15g}") != value
    return isinstance(value, bytes)


# When the source may not write the row's text: exactly the cases sync.traits gives to the Python path
CANNOT: dict[str, Callable[[tuple[Any, ...], str], bool]] = {
    "sqlite": lambda values, _: any(map(_sqlite_cannot, values)),
    "postgres": lambda values, _: False,
    "duckdb": lambda values, text: "\\u00" in text,
    "mariadb": lambda values, text: "\\u00" in text or any(isinstance(value, bytes) for value in values),
}


# The source engines tested here (Postgres and MariaDB on their servers)
ENGINES = [
    "sqlite",
    "duckdb",
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("mariadb", marks=pytest.mark.mariadb),
]


@pytest.fixture(params=ENGINES)
def source(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, sa.Engine]]:
    kind = str(request.param)
    if kind == "postgres":
        url = _new_postgres_database()
        engine = sa.create_engine(url)
        yield kind, engine
        engine.dispose()
        _drop_postgres_database(url)
    elif kind == "mariadb":
        yield kind, request.getfixturevalue("mariadb")
    else:
        engine = sa.create_engine(f"{kind}:///{tmp_path / 'source.db'}")
        yield kind, engine
        engine.dispose()


class Table:
    """A table of one dialect's awkward values; rows read back by the source's builder and in Python."""

    def __init__(self, kind: str, engine: sa.Engine) -> None:
        self.kind, self.engine = kind, engine
        quote = engine.dialect.identifier_preparer.quote_identifier
        self.name = f"awkward_{uuid.uuid4().hex[:8]}"
        self.columns = ["user_id", *COLUMNS[kind]]
        user_id = "" if kind == "sqlite" else "VARCHAR(64)"
        types = [user_id] + [declared for declared, _ in COLUMNS[kind].values()]
        with engine.begin() as conn:
            pairs = zip(self.columns, types, strict=True)
            columns = ", ".join(f"{quote(name)} {declared}" for name, declared in pairs)
            conn.exec_driver_sql(f"CREATE TABLE {self.name} ({columns})")
        places = ", ".join(f":c{i}" for i in range(len(self.columns)))
        self.insert = sa.text(f"INSERT INTO {self.name} VALUES ({places})")

    def read_back(
        self, rows: list[tuple[Any, ...]]
    ) -> tuple[list[tuple[tuple[Any, ...], Staged, Staged]], list[tuple[Any, str | None, str | None]]]:
        """Each row as the driver returns it, its (user id, traits) in Python and as the source wrote them;
        and each value of a column the source makes user ids of, its user id in Python and by the source."""
        with self.engine.begin() as conn:
            conn.exec_driver_sql(f"DELETE FROM {self.name}")
            conn.execute(self.insert, [{f"c{i}": value for i, value in enumerate(row)} for row in rows])
            query = f"SELECT * FROM {self.name}"
            described = conn.exec_driver_sql(query + " LIMIT 0").cursor.description
            built = traits_select(conn.dialect, described)
            assert built is not None
            raw = [tuple(row) for row in conn.exec_driver_sql(query)]
            columns = escaped(f"{built.user_id}, {built.traits}")
            select = sa.text(f"SELECT q.user_id, {columns} FROM ({query}) AS q")
            by_source = {  # the traits as staging takes them, or None: staged again in Python
                user_id: (text, traits if _as_rules_text([(text, traits)], built.upper_escapes) else None)
                for user_id, text, traits in conn.execute(select)
            }
            ids = self._user_ids(conn, described, raw)
        columns = Columns([column[0] for column in described], kinds(conn.dialect, described))
        return [(row, python_traits(columns, row), by_source[row[0]]) for row in raw], ids

    def _user_ids(
        self, conn: sa.Connection, described: Any, raw: list[tuple[Any, ...]]
    ) -> list[tuple[Any, str | None, str | None]]:
        """Each column the source makes user ids of, read as one: (value, in Python, by the source)."""
        quote = conn.dialect.identifier_preparer.quote_identifier
        make_id = DIALECTS[dialect_name(conn.dialect)][1]
        found = []
        for at, (column, kind) in enumerate(zip(described, kinds(conn.dialect, described), strict=True)):
            sql = make_id(f"q.{quote(column[0])}", column)
            if sql is None or at == 0:
                continue
            select = f"SELECT q.user_id, {escaped(sql)} FROM (SELECT * FROM {self.name}) AS q"
            by_source = dict(conn.execute(sa.text(select)).all())
            found += [(row[at], user_id_text(row[at], kind), by_source[row[0]]) for row in raw]
        return found


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_source_writes_the_rules_text_or_leaves_it_to_python(
    source: tuple[str, sa.Engine], data: st.DataObject
) -> None:
    kind, engine = source
    table = getattr(engine, "_awkward", None) or Table(kind, engine)
    engine._awkward = table  # type: ignore[attr-defined]  # one table for all examples
    values = st.tuples(*(st.none() | strategy for _, strategy in COLUMNS[kind].values()))
    rows = data.draw(st.lists(values, min_size=1, max_size=8))

    read, ids = table.read_back([(f"u{n}", *row) for n, row in enumerate(rows)])

    for row, (user_id, text), (source_user_id, by_source) in read:
        assert by_source == (None if CANNOT[kind](row, text) else text), row
        if by_source is not None:
            assert source_user_id == user_id
    for value, in_python, by_source in ids:
        # the row check sends those rows to Python
        if not (kind == "sqlite" and _sqlite_cannot(value) or isinstance(value, bytes)):
            assert by_source == in_python, value


def test_a_json_text_from_a_sqlite_function_is_a_text_trait_as_python_writes_it(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'source.db'}")
    # json_quote copies a value with JSON's subtype unquoted; the subquery the query is wrapped in drops it
    query = "SELECT 'u1' AS user_id, json_object('a', 1) AS meta"
    with engine.connect() as conn:
        built = traits_select(conn.dialect, conn.exec_driver_sql(query).cursor.description)
        assert built is not None
        traits = conn.exec_driver_sql(f"SELECT {built.traits} FROM ({query}) AS q").scalar()
    engine.dispose()

    assert traits == traits_json({"meta": '{"a":1}'}) == '{"meta":"{\\"a\\":1}"}'


def test_a_source_row_it_cannot_build_stages_the_audience_in_python(
    engine: sa.Engine, config: Config, tmp_path: Path
) -> None:
    # a REAL comes after more than a chunk of rows the source built: those are staged again, in Python
    source = sa.create_engine(f"sqlite:///{tmp_path / 'source.db'}")
    rows: list[dict[str, Any]] = [{"user_id": f"u{n}", "v": f"x{n}"} for n in range(STAGE_CHUNK + 10)]
    rows.append({"user_id": "ur", "v": 1.5})
    with source.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE customers (user_id TEXT, v)")
        conn.execute(sa.text("INSERT INTO customers VALUES (:user_id, :v)"), rows)
    audience = the_audience(config, "Mixed", "SELECT user_id, v FROM customers")

    with engine.connect() as conn:
        staged = stage_members(conn, source, audience, 60.0)
        traits = dict(conn.execute(sa.select(sync_stage.c.user_id, sync_stage.c.traits)).all())
    source.dispose()

    assert (staged.members, staged.duplicate_user_ids) == (len(rows), 0)
    assert traits == {row["user_id"]: traits_json({"v": row["v"]}) for row in rows}
