"""A source per audience: `audiences.source` names a row of the `sources` table (issue 15 item 4).

Through the real `audience-sync` command, on a SQLite and on a Postgres state database: audiences on the state
database, a DuckDB file and MariaDB (a URL with a password in an environment variable) synced in one run, the
password in no output; sources that cannot be used (disabled, unknown, a variable not set, both or neither of
url and url_env, a password in url, a driver not installed) each making only their audience invalid. Then the
registry itself: one engine per source, rebuilt when its URL changes, disposed on close.
"""

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from sync import database
from sync.audiences import Audience
from sync.sandbox import SegmentServer
from sync.sources import Sources
from tests.conftest import MARIADB_URL, Config, Customers, free_port, run_cli
from tests.test_audiences import the_audience
from tests.test_bad_input import clean
from tests.test_sources import Warehouse, customer, segment_destination


def add_source(
    config: Config, name: str, url: str | None = None, url_env: str | None = None, **extra: bool
) -> int:
    config.sql(
        "INSERT INTO sources (name, url, url_env, enabled) VALUES (:name, :url, :url_env, :enabled)",
        name=name,
        url=url,
        url_env=url_env,
        enabled=extra.get("enabled", True),
    )
    return int(config.sql("SELECT id FROM sources WHERE name = :name", name=name)[0][0])


@pytest.fixture
def reader(mariadb: sa.Engine) -> Iterator[tuple[str, str]]:
    """A MariaDB user with a password that may only read (user name, password); dropped after the test."""
    user, password = f"reader_{uuid.uuid4().hex[:8]}", f"pw{uuid.uuid4().hex}"
    with mariadb.begin() as conn:
        conn.execute(sa.text(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"))
    yield user, password
    with mariadb.begin() as conn:
        conn.execute(sa.text(f"DROP USER IF EXISTS '{user}'@'%'"))


def everything_printed(*results: subprocess.CompletedProcess[str]) -> str:
    clean(*results)
    return "".join(result.stdout + result.stderr for result in results)


@pytest.mark.mariadb
def test_audiences_on_the_state_database_duckdb_and_mariadb_sync_in_one_run_and_no_output_shows_the_password(
    request: pytest.FixtureRequest,
    state_url: str,
    config: Config,
    customers: Customers,
    mariadb: sa.Engine,
    reader: tuple[str, str],
    tmp_path: Path,
) -> None:
    customers.add("s1", "s2")
    (tmp_path / "lake").mkdir()
    lake = Warehouse("duckdb", tmp_path / "lake")
    lake.add(customer("d1"), customer("d2"), customer("d3", segment="lapsed"))
    shop = Warehouse("mariadb", tmp_path, mariadb)
    request.addfinalizer(shop.drop)
    shop.add(customer("m1"))
    user, password = reader
    with mariadb.begin() as conn:
        conn.execute(sa.text(f"GRANT SELECT ON {shop.table} TO '{user}'@'%'"))
    # as an operator writes it: mysql:// (PyMySQL), the password in the environment
    shop_url = sa.make_url(MARIADB_URL).set(drivername="mysql", username=user, password=password)
    down_url = shop_url.set(port=free_port())  # the same URL where nothing listens
    env = {
        "SHOP_URL": shop_url.render_as_string(hide_password=False),
        "DOWN_URL": down_url.render_as_string(hide_password=False),
    }
    add_source(config, "lake", url=lake.url)
    add_source(config, "shop", url_env="SHOP_URL")
    add_source(config, "down", url_env="DOWN_URL")
    with SegmentServer(api_key="k") as segment:
        destination = segment_destination(config, segment)
        audiences = {
            "Members": config.audience("Members", Customers.QUERY),
            "Lake": config.audience("Lake", lake.query(), source="lake"),
            "Shop": config.audience("Shop", shop.query(), source="shop"),
            "Down": config.audience("Down", shop.query(), source="down"),
        }
        for audience in audiences.values():
            config.connect(audience, destination)

        synced = run_cli(state_url, "run", env=env)
        checked = run_cli(state_url, "check", env=env)
        explained = run_cli(state_url, "explain", "m1", "--json", env=env)
        shown = [
            run_cli(state_url, *args, env=env)
            for args in (["status"], ["status", "--json"], ["explain", "d1"])
        ]

    printed = everything_printed(synced, checked, explained, *shown)
    assert password not in printed
    assert synced.returncode == 1, synced.stderr  # Down's query failed: it cannot connect
    by_audience = sorted((m["properties"]["audience_key"], m["userId"]) for m in segment.messages)
    assert by_audience == [
        ("lake", "d1"),
        ("lake", "d2"),
        ("members", "s1"),
        ("members", "s2"),
        ("shop", "m1"),
    ]
    outcomes = config.sql("SELECT audience_id, outcome FROM sync_runs ORDER BY audience_id")
    assert [tuple(row) for row in outcomes] == [
        (audiences["Members"], "ok"),
        (audiences["Lake"], "ok"),
        (audiences["Shop"], "ok"),
        (audiences["Down"], "failed"),
    ]
    assert f"audience 'Down' (id {audiences['Down']}): the query failed: (2003, " in synced.stderr
    # check names each audience's source (its name, its URL without the password) and reads its session back
    shop_where, down_where = (
        database.describe(url.set(drivername="mysql+pymysql").render_as_string(hide_password=False))
        for url in (shop_url, down_url)
    )
    assert shop_where.startswith(f"mysql+pymysql://{user}:***@")
    lines = checked.stderr.splitlines()
    state_where = f"{database.describe(state_url)} (the state database)"
    assert any(
        line.startswith(f"audience 'Members' (id {audiences['Members']}): source {state_where}: ")
        for line in lines
    )
    assert (
        f"audience 'Lake' (id {audiences['Lake']}): source 'lake' ({database.describe(lake.url)}): "
        "access_mode = read_only, enable_external_access = false, cancelled after 600s by a timer"
    ) in lines
    assert (
        f"audience 'Shop' (id {audiences['Shop']}): source 'shop' ({shop_where}): "
        "tx_read_only = 1, max_statement_time = 600s"
    ) in lines
    assert f"source 'down' ({down_where}): (2003, " in checked.stdout
    assert checked.returncode == 2, checked.stdout
    members = {entry["audience"]: entry["member"] for entry in json.loads(explained.stdout)}
    assert members == {"Members": False, "Lake": False, "Shop": True, "Down": None}


def test_an_unusable_source_makes_only_its_audience_invalid_with_a_message_naming_the_rows(
    state_url: str, config: Config, customers: Customers, tmp_path: Path
) -> None:
    customers.add("s1")
    lake = f"duckdb:///{tmp_path / 'lake.duckdb'}"
    snowflake = "snowflake://reader:hunter2@acme-xy12345/shop/public"
    sources = {
        "off": add_source(config, "off", url=lake, enabled=False),
        "unset": add_source(config, "unset", url_env="AS_TEST_UNSET_URL"),
        "both": add_source(config, "both", url=lake, url_env="LAKE_URL"),
        "neither": add_source(config, "neither"),
        "pasted": add_source(config, "pasted", url_env=snowflake),
        "in_url": add_source(config, "in_url", url="postgresql://reader:hunter2@db.internal/shop"),
        "snow": add_source(config, "snow", url_env="SNOW_URL"),
    }
    env = {"SNOW_URL": snowflake, "LAKE_URL": lake}
    with SegmentServer(api_key="k") as segment:
        destination = segment_destination(config, segment)
        healthy = config.audience("Members", Customers.QUERY)
        config.connect(healthy, destination)
        ids = {}
        for name in [*sources, "typo"]:
            ids[name] = config.audience(f"On {name}", "SELECT 1 AS user_id", source=name)
            config.connect(ids[name], destination)

        synced = run_cli(state_url, "run", env=env)
        checked = run_cli(state_url, "check", env=env)
        status = run_cli(state_url, "status", "--json", env=env)

    assert "hunter2" not in everything_printed(synced, checked, status)
    row = {
        name: f"audience 'On {name}' (id {ids[name]}): sources row id={sources[name]} ({name!r})"
        for name in sources
    }
    expected = {
        "off": f"{row['off']} is disabled",
        "unset": f"{row['unset']}: url_env names 'AS_TEST_UNSET_URL', which is not set or empty",
        "both": f"{row['both']}: url and url_env are both set; keep one (url_env for a URL with a password)",
        "neither": f"{row['neither']}: neither url nor url_env is set (url_env: an environment variable "
        "holding the URL)",
        "pasted": f"{row['pasted']}: url_env does not hold an environment variable name; put the URL itself "
        "in the environment, not in this column",
        "in_url": f"{row['in_url']}: url holds a password; put the URL in an environment variable and its "
        "name in url_env",
        "snow": f"{row['snow']}: cannot use source URL snowflake://reader:***@acme-xy12345/shop/public: no "
        "SQLAlchemy dialect 'snowflake' is installed; pip install snowflake-sqlalchemy",
        "typo": f"audience 'On typo' (id {ids['typo']}): no sources row is named 'typo' (audiences.source)",
    }
    assert synced.returncode == 1, synced.stderr
    assert [m["userId"] for m in segment.messages] == ["s1"]  # the other audiences keep syncing
    runs = config.sql(
        "SELECT audience_id, destination_id, outcome, error FROM sync_runs ORDER BY audience_id"
    )
    assert [tuple(run) for run in runs] == [(healthy, destination, "ok", None)] + [
        (ids[name], None, "invalid", message) for name, message in expected.items()
    ]
    for name, message in expected.items():
        assert f"On {name}: invalid ({message})" in synced.stderr.splitlines()
    assert checked.returncode == 2
    problems = [line for line in checked.stdout.splitlines() if not line.startswith("warning: ")]
    assert sorted(problems) == sorted(expected.values())
    last_errors = {row["audience"]: row["last_error"] for row in json.loads(status.stdout)}
    assert last_errors == {"Members": None, **{f"On {name}": message for name, message in expected.items()}}


def test_check_warns_about_an_enabled_source_no_audience_names_yet_that_could_not_be_used(
    state_url: str, config: Config, tmp_path: Path
) -> None:
    lake = f"duckdb:///{tmp_path / 'lake.duckdb'}"
    spare = add_source(config, "spare", url=lake, url_env="LAKE_URL")
    snow = add_source(config, "snow", url_env="SNOW_URL")
    add_source(config, "off", url_env="AS_TEST_UNSET_URL", enabled=False)
    add_source(config, "fine", url=lake)
    add_source(config, "used", url_env="AS_TEST_UNSET_URL")
    config.audience("On used", "SELECT 1 AS user_id", source="used")  # reported as the audience's problem
    snowflake = "snowflake://reader:hunter2@acme-xy12345/shop/public"
    checked = run_cli(state_url, "check", env={"SNOW_URL": snowflake})
    assert "hunter2" not in checked.stdout + checked.stderr
    warnings = [line for line in checked.stdout.splitlines() if line.startswith("warning: sources row")]
    assert warnings == [
        f"warning: sources row id={spare} ('spare'), which no audience names yet: url and url_env are both "
        "set; keep one (url_env for a URL with a password)",
        f"warning: sources row id={snow} ('snow'), which no audience names yet: cannot use source URL "
        "snowflake://reader:***@acme-xy12345/shop/public: no SQLAlchemy dialect 'snowflake' is installed; "
        "pip install snowflake-sqlalchemy",
    ]
    assert checked.returncode == 2 and "'On used'" in checked.stdout  # the used row stops its audience


def test_each_source_has_one_engine_rebuilt_when_its_url_changes_and_disposed_on_close(
    engine: sa.Engine, config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_url, second_url = (f"duckdb:///{tmp_path / name}" for name in ("first.duckdb", "second.duckdb"))
    monkeypatch.setenv("LAKE_URL", first_url)
    add_source(config, "lake", url_env="LAKE_URL")
    first = the_audience(config, "First", "SELECT 1 AS user_id", source="lake")
    second = the_audience(config, "Second", "SELECT 1 AS user_id", source="lake")
    on_state = the_audience(config, "On State", "SELECT 1 AS user_id")
    disposed: list[sa.Engine] = []

    def resolved(sources: Sources, audience: Audience) -> sa.Engine:
        with engine.connect() as conn:  # a new connection sees the row as it is now (SQLite's snapshot)
            made = sources.engine(conn, audience)
        if made not in watched:
            sa.event.listen(made, "engine_disposed", disposed.append)
            watched.append(made)
        return made

    watched: list[sa.Engine] = []
    sources = Sources(engine)
    sa.event.listen(engine, "engine_disposed", disposed.append)
    kept = resolved(sources, first)
    assert str(kept.url) == first_url
    assert resolved(sources, second) is kept and resolved(sources, first) is kept
    assert resolved(sources, on_state) is engine  # no source: the default (here the state database)

    monkeypatch.setenv("LAKE_URL", second_url)  # the value of url_env changed
    moved = resolved(sources, first)
    assert str(moved.url) == second_url and disposed == [kept]
    config.sql("UPDATE sources SET url = :url, url_env = NULL", url=first_url)  # the row changed
    back = resolved(sources, second)
    assert str(back.url) == first_url and disposed == [kept, moved]
    sources.close()
    assert disposed == [kept, moved, back]  # not the default engine, which its maker disposes
