"""Sources other than the state database: DuckDB (embedded) and MariaDB (the server at 127.0.0.1:3306).

Each runs the same contract through the real `audience-sync` command (or the runner in process where the
command adds nothing), on a SQLite and on a Postgres state database: members staged (NULL and duplicate user
ids counted), values JSON cannot hold stored as text exactly as `traits_json` writes them, a write refused, a
timeout that fires, and `check` naming the source and reading its session back. Then what DuckDB reads from
files, a source whose driver is not installed, and the generic guard of a dialect with no read-only guard (a
Postgres database behind another dialect name).
"""

import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

from sync import database
from sync.check import find_problems
from sync.errors import SourceError
from sync.models import traits_json
from sync.sandbox import SegmentServer
from sync.settings import Settings
from sync.sources import Sources
from sync.staging import stage_members
from tests.conftest import MARIADB_URL, Config, Customers, run_cli, sync_in_process
from tests.test_audiences import customer_ids, the_audience
from tests.test_bad_input import clean

COLUMNS = {  # the customers table of each source: a decimal, a date, a timestamp and bytes among the traits
    "duckdb": "user_id VARCHAR, email VARCHAR, transaction_id VARCHAR, amount DECIMAL(10, 2), joined DATE, "
    "seen TIMESTAMP, raw BLOB, segment VARCHAR",
    "mariadb": "user_id VARCHAR(64), email VARCHAR(255), transaction_id VARCHAR(64), amount DECIMAL(10, 2), "
    "joined DATE, seen DATETIME, raw VARBINARY(16), segment VARCHAR(16)",
}
SEEN = datetime(2024, 1, 2, 3, 4, 5)  # noqa: DTZ001  # a TIMESTAMP / DATETIME column holds no time zone


def customer(user_id: str | None, segment: str = "vip", email: str | None = None) -> tuple[Any, ...]:
    email = email or f"{user_id}@example.com"
    return (user_id, email, f"tid-{user_id}", Decimal("12.50"), date(2024, 1, 2), SEEN, b"\x00\xff", segment)


class Warehouse:
    """A source database with a customers table of its own (a name no other test uses)."""

    def __init__(self, kind: str, directory: Path, mariadb: sa.Engine | None = None) -> None:
        self.kind = kind
        self.table = f"customers_{uuid.uuid4().hex[:10]}"
        self.mariadb = mariadb
        self.directory = directory
        self.path = directory / "warehouse.duckdb"
        self.url = f"duckdb:///{self.path}" if kind == "duckdb" else MARIADB_URL
        self.execute(f"CREATE TABLE {self.table} ({COLUMNS[kind]})")

    @contextlib.contextmanager
    def engine(self) -> Iterator[sa.Engine]:
        """The source engine a run makes of SYNC_SOURCE_URL (a DuckDB file opened read-only)."""
        source = database.create_engine(self.url, source=True)
        yield source
        source.dispose()

    def execute(self, statement: str, rows: list[tuple[Any, ...]] | None = None) -> list[tuple[Any, ...]]:
        """Run one statement (for each of `rows`, with `?` placeholders); closed after, so that the command
        can open a DuckDB file read-only."""
        if self.mariadb is None:
            with duckdb.connect(str(self.path)) as con:
                if rows:
                    con.executemany(statement, rows)
                    return []
                result = con.execute(statement)
                return result.fetchall() if result.description else []
        with self.mariadb.begin() as conn:
            if rows:
                conn.exec_driver_sql(statement.replace("?", "%s"), rows)
                return []
            result = conn.exec_driver_sql(statement)
            return [tuple(row) for row in result] if result.returns_rows else []

    def add(self, *rows: tuple[Any, ...]) -> None:
        self.execute(f"INSERT INTO {self.table} VALUES (?, ?, ?, ?, ?, ?, ?, ?)", list(rows))

    def count(self) -> int:
        return int(self.execute(f"SELECT count(*) FROM {self.table}")[0][0])

    def query(self, segment: str = "vip") -> str:
        return (
            f"SELECT user_id, email, transaction_id, amount, joined, seen, raw FROM {self.table} "
            f"WHERE segment = '{segment}'"
        )

    def slow_query(self) -> str:
        """A query that runs for minutes."""
        if self.kind == "duckdb":
            return "SELECT CAST(count(*) AS VARCHAR) AS user_id FROM range(1000000000000)"
        return "SELECT CAST(SLEEP(300) AS CHAR) AS user_id"

    def write_attempts(self) -> list[str]:
        """Audience queries that would delete the customers if they ran with write access."""
        smuggled = (
            f"SELECT user_id FROM {self.table}) AS a; DELETE FROM {self.table}; "
            "SELECT * FROM (SELECT 'x' AS user_id"
        )
        if self.kind == "duckdb":  # DuckDB runs every statement of a text; a COPY would write a file
            copy = f"COPY (SELECT 1) TO '{self.directory / 'written.csv'}'"
            return [smuggled, smuggled.replace(f"DELETE FROM {self.table}", copy)]
        zap = f"zap_{self.table}"
        self.execute(
            f"CREATE FUNCTION {zap}() RETURNS TEXT MODIFIES SQL DATA "
            f"BEGIN DELETE FROM {self.table}; RETURN 'x'; END"
        )
        return [smuggled, f"SELECT {zap}() AS user_id"]

    def drop(self) -> None:
        if self.mariadb is not None:
            self.execute(f"DROP FUNCTION IF EXISTS zap_{self.table}")
            self.execute(f"DROP TABLE IF EXISTS {self.table}")


@pytest.fixture(params=["duckdb", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def warehouse(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Warehouse]:
    mariadb = request.getfixturevalue("mariadb") if request.param == "mariadb" else None
    directory = tmp_path / "warehouse"
    directory.mkdir()
    source = Warehouse(request.param, directory, mariadb)
    yield source
    source.drop()


def segment_destination(config: Config, segment: SegmentServer) -> int:
    """An Everflow destination over the Segment transport: track calls, the traits in context.traits."""
    settings = {"transport": "segment", "endpoint": segment.url, "rate_limit": 1000, "backoff_initial": 0.01}
    return config.destination("Segment", "everflow", settings, api_key=segment.api_key)


def test_a_source_database_syncs_its_members_counting_null_and_duplicate_user_ids(
    state_url: str, config: Config, warehouse: Warehouse
) -> None:
    warehouse.add(customer("u1"), customer("u2"), customer("u2", email="again@example.com"))
    warehouse.add(customer(None), customer(""), customer("u3", segment="lapsed"))
    env = {"SYNC_SOURCE_URL": warehouse.url}
    with SegmentServer(api_key="k") as segment:
        vip = config.audience("VIP", warehouse.query())
        config.connect(vip, segment_destination(config, segment))

        result = run_cli(state_url, "run", env=env)
        member = run_cli(state_url, "explain", "u1", "--json", env=env)
        other_case = run_cli(
            state_url, "explain", "U1", "--json", env=env
        )  # MySQL collations say 'U1' = 'u1'

    clean(result, member, other_case)
    assert result.returncode == 0, result.stderr
    assert f"audience 'VIP' (id {vip}): 2 members (2 null user_ids, 1 duplicates" in result.stderr
    assert sorted(m["userId"] for m in segment.messages) == ["u1", "u2"]
    runs = config.sql("SELECT outcome, members, accepted, null_user_ids, duplicate_user_ids FROM sync_runs")
    assert [tuple(run) for run in runs] == [("ok", 2, 2, 2, 1)]
    assert [entry["member"] for entry in json.loads(member.stdout)] == [True]
    assert [entry["member"] for entry in json.loads(other_case.stdout)] == [False]


def test_values_json_has_no_type_for_are_stored_and_sent_as_the_rules_write_them(
    engine: sa.Engine, config: Config, warehouse: Warehouse
) -> None:
    warehouse.add(customer("u1"))
    with SegmentServer(api_key="k") as segment, warehouse.engine() as source:
        config.connect(config.audience("VIP", warehouse.query()), segment_destination(config, segment))
        [result] = sync_in_process(engine, segment, source=source)

    assert result.outcome == "ok", result.error
    values = {  # in the query's order
        "email": "u1@example.com",
        "transaction_id": "tid-u1",
        "amount": Decimal("12.50"),
        "joined": date(2024, 1, 2),
        "seen": SEEN,
        "raw": b"\x00\xff",
    }
    expected = (  # README "How values are sent": the stored digits, ISO 8601, base64
        '{"email":"u1@example.com","transaction_id":"tid-u1","amount":12.50,"joined":"2024-01-02",'
        '"seen":"2024-01-02T03:04:05","raw":"AP8="}'
    )
    assert traits_json(values) == expected
    assert config.sql("SELECT traits FROM sync_state WHERE user_id = 'u1'") == [(expected,)]
    [message] = segment.messages
    assert message["context"]["traits"] == json.loads(expected)


def test_an_audience_query_that_writes_is_refused_and_writes_nothing(
    state_url: str, config: Config, warehouse: Warehouse
) -> None:
    warehouse.add(customer("u1"), customer("u2"))
    env = {"SYNC_SOURCE_URL": warehouse.url}
    with SegmentServer(api_key="k") as segment:
        destination = segment_destination(config, segment)
        config.connect(config.audience("Healthy", warehouse.query()), destination)
        writers = [config.audience(f"Writer {n}", q) for n, q in enumerate(warehouse.write_attempts())]
        for writer in writers:
            config.connect(writer, destination)

        result = run_cli(state_url, "run", env=env)
        check = run_cli(state_url, "check", env=env)

    clean(result, check)
    assert warehouse.count() == 2
    assert not (warehouse.directory / "written.csv").exists()
    assert result.returncode == 1, result.stderr
    assert check.returncode == 2, check.stdout + check.stderr
    for number, writer in enumerate(writers):
        failed = f"audience 'Writer {number}' (id {writer}): the query failed: "
        assert failed in result.stderr and failed in check.stdout, (result.stderr, check.stdout)
    if warehouse.kind == "mariadb":  # the function's DELETE meets the READ ONLY transaction
        assert "Cannot execute statement in a READ ONLY transaction" in result.stderr
    else:
        assert "it must be a single SELECT statement" in result.stderr
    assert sorted(m["userId"] for m in segment.messages) == ["u1", "u2"]  # the healthy audience synced


def test_a_query_past_the_timeout_is_stopped_and_the_next_query_runs(
    engine: sa.Engine, config: Config, warehouse: Warehouse
) -> None:
    warehouse.add(customer("u1"))
    with SegmentServer(api_key="k") as segment, warehouse.engine() as source:
        destination = segment_destination(config, segment)
        slow = config.audience("Slow", warehouse.slow_query())
        config.connect(slow, destination)
        config.connect(config.audience("Healthy", warehouse.query()), destination)

        started = time.monotonic()
        results = {r.audience: r for r in sync_in_process(engine, segment, source=source, query_timeout=1)}
        elapsed = time.monotonic() - started
        # the same pooled source connection is usable afterwards
        [again] = sync_in_process(engine, segment, source=source, query_timeout=1, audiences=["Healthy"])

    assert results["Slow"].outcome == "failed"
    assert f"audience 'Slow' (id {slow}): the query failed: timed out (SYNC_QUERY_TIMEOUT)" in str(
        results["Slow"].error
    )
    assert elapsed < 60, elapsed  # the query runs for minutes when nothing stops it
    assert again.outcome == "ok", again.error
    assert [m["userId"] for m in segment.messages] == ["u1"]


@pytest.mark.parametrize("source", ["state", "duckdb", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def test_check_names_each_audiences_source_and_reads_its_session_back(
    request: pytest.FixtureRequest, backend: str, state_url: str, config: Config, tmp_path: Path, source: str
) -> None:
    env: dict[str, str] = {"SYNC_QUERY_TIMEOUT": "90s"}
    if source == "state":
        config.sql("CREATE TABLE customers (user_id TEXT, segment TEXT)")
        query = "SELECT user_id FROM customers"
        where = database.describe(state_url) + " (the state database)"
        if backend == "postgres":  # the same database as a source URL with a password (trusted here)
            with_password = sa.make_url(state_url).set(password="hunter2")
            env["SYNC_SOURCE_URL"] = with_password.render_as_string(hide_password=False)
            where = database.describe(env["SYNC_SOURCE_URL"])
        session = {
            "sqlite": "query_only = 1, stopped after 90s by a progress handler",
            "postgres": "transaction_read_only = on, statement_timeout = 90000ms",
        }[backend]
    else:
        mariadb = request.getfixturevalue("mariadb") if source == "mariadb" else None
        directory = tmp_path / "warehouse"
        directory.mkdir()
        warehouse = Warehouse(source, directory, mariadb)
        request.addfinalizer(warehouse.drop)
        query = warehouse.query()
        env["SYNC_SOURCE_URL"] = warehouse.url
        where = database.describe(warehouse.url)
        session = {
            "duckdb": "access_mode = read_only, enable_external_access = false, "
            "cancelled after 90s by a timer",
            "mariadb": "tx_read_only = 1, max_statement_time = 90s",
        }[source]
    first = config.audience("First", query)
    second = config.audience("Second", query)
    before = warehouse.path.read_bytes() if source == "duckdb" else b""

    checked = run_cli(state_url, "check", env=env)

    clean(checked)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for name, audience in (("First", first), ("Second", second)):
        assert f"audience '{name}' (id {audience}): source {where}: {session}\n" in checked.stderr
    assert "hunter2" not in checked.stdout + checked.stderr
    if source == "duckdb":  # nothing written: the file is as the warehouse left it
        assert warehouse.path.read_bytes() == before


def test_check_reports_a_source_session_that_is_not_read_only(
    state_url: str, config: Config, tmp_path: Path
) -> None:
    warehouse = Warehouse("duckdb", tmp_path)
    config.audience("VIP", warehouse.query())
    # duckdb-engine passes the URL's query to DuckDB's configuration, over the read-only open
    env = {"SYNC_SOURCE_URL": warehouse.url + "?access_mode=read_write"}

    checked = run_cli(state_url, "check", env=env)

    clean(checked)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert checked.stdout == (
        f"source {database.describe(warehouse.url)}: the session audience queries run in lacks read-only "
        "(access_mode = read_write, enable_external_access = false, cancelled after 600s by a timer)\n"
    )


def test_duckdb_reads_parquet_and_csv_exports_beside_its_file_and_no_file_elsewhere(
    state_url: str, config: Config, tmp_path: Path
) -> None:
    exports = tmp_path / "warehouse" / "exports"
    exports.mkdir(parents=True)
    warehouse = Warehouse("duckdb", tmp_path / "warehouse")
    warehouse.add(customer("u1"), customer("u2"), customer("u3", segment="lapsed"))
    warehouse.execute(f"COPY ({warehouse.query()}) TO '{exports / 'vip.parquet'}' (FORMAT parquet)")
    warehouse.execute(f"COPY (SELECT user_id, email FROM {warehouse.table}) TO '{exports / 'all.csv'}'")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.csv").write_text("user_id\nintruder\n")
    with SegmentServer(api_key="k") as segment:
        destination = segment_destination(config, segment)
        parquet = config.audience(
            "Parquet Export",
            f"SELECT user_id, transaction_id, amount, joined FROM read_parquet('{exports / 'vip.parquet'}')",
        )
        csv = config.audience(
            "CSV Export",
            f"SELECT user_id, 'tid-' || user_id AS transaction_id FROM read_csv('{exports / 'all.csv'}')",
        )
        outside = config.audience("Elsewhere", f"SELECT * FROM read_csv('{elsewhere / 'secret.csv'}')")
        for audience in (parquet, csv, outside):
            config.connect(audience, destination)

        result = run_cli(state_url, "run", env={"SYNC_SOURCE_URL": warehouse.url})

    clean(result)
    assert result.returncode == 1, result.stderr
    assert f"audience 'Elsewhere' (id {outside}): the query failed: Permission Error" in result.stderr
    by_event = sorted((m["properties"]["audience_key"], m["userId"]) for m in segment.messages)
    assert by_event == [
        ("csv_export", "u1"),
        ("csv_export", "u2"),
        ("csv_export", "u3"),
        ("parquet_export", "u1"),
        ("parquet_export", "u2"),
    ]
    traits = config.sql("SELECT traits FROM sync_state WHERE audience_id = :a AND user_id = 'u1'", a=parquet)
    assert traits == [('{"transaction_id":"tid-u1","amount":12.50,"joined":"2024-01-02"}',)]


@pytest.mark.parametrize(
    ("url", "install"),
    [
        ("snowflake://reader:hunter2@acme-xy12345/shop/public", "pip install snowflake-sqlalchemy"),
        ("bigquery://my-project/shop", "pip install sqlalchemy-bigquery"),
        ("mysql+mysqldb://reader:hunter2@db.internal/shop", "pip install mysqlclient"),
    ],
)
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_source_whose_driver_is_not_installed_is_one_line_naming_the_package(
    state_url: str, config: Config, url: str, install: str
) -> None:
    config.audience("VIP", "SELECT 1 AS user_id")
    for command in ("check", "run", "explain"):
        args = [command, "u1"] if command == "explain" else [command]
        result = run_cli(state_url, *args, env={"SYNC_SOURCE_URL": url})
        clean(result)
        assert result.returncode == 2, result.stderr
        [line] = [line for line in result.stderr.splitlines() if line.startswith("audience-sync: ")]
        assert line.startswith("audience-sync: cannot use source URL ") and line.endswith(install), line
        assert "hunter2" not in result.stderr + result.stdout


class GenericDialect(PGDialect_psycopg):
    """Postgres under another name: a dialect audience-sync knows no read-only guard for."""

    name = "generic"
    supports_statement_cache = True


sa.dialects.registry.register("generic.psycopg", __name__, "GenericDialect")


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_dialect_without_a_guard_runs_queries_in_a_transaction_rolled_back_and_cancelled_at_the_timeout(
    state_url: str, engine: sa.Engine, config: Config, customers: Customers, caplog: pytest.LogCaptureFixture
) -> None:
    customers.add("u1", "u2")
    url = sa.make_url(state_url).set(drivername="generic+psycopg").render_as_string(hide_password=False)
    source = database.create_engine(url, source=True)
    try:
        assert "audience queries cannot be made read-only on generic" in caplog.text
        config.sql(
            "CREATE FUNCTION zap() RETURNS SETOF text LANGUAGE sql VOLATILE AS "
            "'DELETE FROM customers RETURNING user_id'"
        )
        deleting = the_audience(config, "Deleting", "SELECT zap() AS user_id")
        slow = the_audience(config, "Slow", "SELECT pg_sleep(300)::text AS user_id")
        with engine.connect() as conn:
            # the query saw its own delete, which is undone: a write is not refused, only rolled back
            assert stage_members(conn, source, deleting, 10).members == 2
            assert customer_ids(engine) == ["u1", "u2"]
            started = time.monotonic()
            with pytest.raises(SourceError, match="'Slow'.*timed out"):
                stage_members(conn, source, slow, 0.5)
            assert time.monotonic() - started < 60  # pg_sleep(300), cancelled
            settings = dataclasses.replace(Settings.from_env(), query_timeout=10)
            found = find_problems(conn, Sources(source), settings)
    finally:
        source.dispose()
    assert customer_ids(engine) == ["u1", "u2"]
    [warning] = [w for w in found.warnings if "generic has no read-only guard" in w]
    assert "run in a transaction that is rolled back" in warning
    assert all(
        line.endswith(": a transaction that is rolled back, cancelled after 10s by a timer")
        for line in found.sources
    )
    assert found.problems == []


# One row whose traits the source cannot write as the rules do (so the query runs again, its traits written
# in Python), and a pause of 0.6 s in each run: both fit a 1 s timeout alone, not together. (Postgres
# writes every value of the types it builds, so its query never runs twice.)
RUN_TWICE = {
    "mariadb": "SELECT 'u1' AS user_id, CAST('x' AS BINARY) AS raw, SLEEP(0.6) AS pause",
}


@pytest.mark.parametrize("kind", [pytest.param("mariadb", marks=pytest.mark.mariadb)])
def test_a_query_run_again_for_its_traits_has_what_is_left_of_the_timeout(
    engine: sa.Engine, config: Config, request: pytest.FixtureRequest, kind: str
) -> None:
    """MariaDB times each statement: the second run got a whole timeout of its own."""
    url = request.getfixturevalue("mariadb").url
    source = database.create_engine(url, source=True)
    audience = the_audience(config, "Twice", RUN_TWICE[kind])
    try:
        with engine.connect() as conn:
            assert stage_members(conn, source, audience, 3).members == 1
            staged = conn.exec_driver_sql("SELECT traits FROM sync_stage_members").scalar()
            with pytest.raises(SourceError, match="'Twice'.*timed out"):
                stage_members(conn, source, audience, 1)
    finally:
        source.dispose()
    assert staged == traits_json({k: v for k, v in _only_row(kind).items() if k != "user_id"})


def _only_row(kind: str) -> dict[str, Any]:
    return {"user_id": "u1", "raw": b"x", "pause": 0}


def test_a_duckdb_source_file_gets_bounded_memory_and_threads_unless_its_url_sets_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "lake.duckdb"
    duckdb.connect(str(path)).close()
    settings = "SELECT current_setting('memory_limit'), current_setting('threads')"
    expected = (
        duckdb.connect(config={"memory_limit": "48MB"}).execute(settings).fetchone()[0]
    )  # as it shows it
    found = []
    for query in ("", "?memory_limit=1GB&threads=4"):
        engine = database.create_engine(f"duckdb:///{path}{query}", source=True)
        with engine.connect() as conn:
            found.append(tuple(conn.exec_driver_sql(settings).one()))
        engine.dispose()

    assert found[0] == (expected, 2)  # a read keeps at most that much of the file, whatever its size
    assert found[1][1] == 4 and found[1][0] != expected
