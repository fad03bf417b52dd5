"""Fixtures: the same tests run against a real SQLite file and a real Postgres database (and sources on the
MariaDB server)."""

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sync import database, sandbox
from sync.runner import Runner
from sync.runs import Options, Result
from sync.settings import Cadence, Settings
from sync.sources import Sources

POSTGRES_URL = os.environ.get("SYNC_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("SYNC_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
COMMAND = str(Path(sys.executable).with_name("audience-sync"))
_template: dict[str, str] = {}


def _postgres_admin() -> sa.Engine:
    engine = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Postgres is required under CI and is unreachable at {POSTGRES_URL}: {exc.orig}")
        pytest.skip(f"no Postgres reachable at {POSTGRES_URL} (set SYNC_TEST_POSTGRES_URL)")
    return engine


def _new_postgres_database(template: str | None = None) -> str:
    name = f"as_test_{uuid.uuid4().hex[:12]}"
    admin = _postgres_admin()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    admin.dispose()
    return sa.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)


def _drop_postgres_database(url: str) -> None:
    admin = _postgres_admin()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{sa.make_url(url).database}" WITH (FORCE)')
    admin.dispose()


# A DROP DATABASE waits on the server's checkpoints (up to seconds on a busy server): the next tests need not.
_dropping = ThreadPoolExecutor(1, thread_name_prefix="drop-database")
_drops: list[Future[None]] = []


@pytest.fixture
def mariadb() -> Iterator[sa.Engine]:
    """The MariaDB server, for sources; required under CI like Postgres. Tests make their own tables."""
    engine = sa.create_engine(MARIADB_URL)
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as exc:
        engine.dispose()
        if os.environ.get("CI"):
            pytest.fail(f"MariaDB is required under CI and is unreachable at {MARIADB_URL}: {exc.orig}")
        pytest.skip(f"no MariaDB reachable at {MARIADB_URL} (set SYNC_TEST_MARIADB_URL)")
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def empty_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database with no tables."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    url = _new_postgres_database()
    yield url
    _drops.append(_dropping.submit(_drop_postgres_database, url))


@pytest.fixture
def state_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A migrated state database (Postgres: copied from a migrated template, which is quick)."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
        database.upgrade(url)
        yield url
        return
    if "postgres" not in _template:
        template_url = _new_postgres_database()
        database.upgrade(template_url)
        database.create_engine(template_url).dispose()
        _template["postgres"] = template_url
    url = _new_postgres_database(template=sa.make_url(_template["postgres"]).database)
    yield url
    _drops.append(_dropping.submit(_drop_postgres_database, url))


@pytest.fixture(scope="session", autouse=True)
def _drop_template() -> Iterator[None]:
    yield
    for drop in _drops:  # every test's database dropped; a failure to drop one is raised here
        drop.result()
    if "postgres" in _template:
        _drop_postgres_database(_template.pop("postgres"))


@pytest.fixture
def engine(state_url: str) -> Iterator[sa.Engine]:
    engine = database.create_engine(state_url)
    yield engine
    engine.dispose()


class Config:
    """Writes configuration rows the way an operator would: plain SQL INSERTs."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def sql(self, statement: str, **params: Any) -> list[sa.Row[Any]]:
        with self.engine.begin() as conn:
            result = conn.execute(sa.text(statement), params)
            return list(result) if result.returns_rows else []

    def destination(
        self,
        name: str,
        kind: str,
        settings: dict[str, Any],
        api_key: str | None = None,
        api_key_env: str | None = None,
    ) -> int:
        self.sql(
            "INSERT INTO destinations (name, kind, api_key, api_key_env, settings) "
            "VALUES (:name, :kind, :api_key, :api_key_env, :settings)",
            name=name,
            kind=kind,
            api_key=api_key,
            api_key_env=api_key_env,
            settings=json.dumps(settings),
        )
        return int(self.sql("SELECT id FROM destinations WHERE name = :name", name=name)[0][0])

    def audience(self, name: str, query: str, **extra: Any) -> int:
        columns = ", ".join(["name", "query", *extra])
        values = ", ".join(f":{c}" for c in ["name", "query", *extra])
        self.sql(f"INSERT INTO audiences ({columns}) VALUES ({values})", name=name, query=query, **extra)
        return int(self.sql("SELECT id FROM audiences WHERE name = :name", name=name)[0][0])

    def connect(self, audience_id: int, destination_id: int, settings: dict[str, Any] | None = None) -> None:
        if settings is None:
            self.sql(
                "INSERT INTO audience_destinations (audience_id, destination_id) VALUES (:a, :d)",
                a=audience_id,
                d=destination_id,
            )
        else:
            self.sql(
                "INSERT INTO audience_destinations (audience_id, destination_id, settings) "
                "VALUES (:a, :d, :s)",
                a=audience_id,
                d=destination_id,
                s=json.dumps(settings),
            )


@pytest.fixture
def config(engine: sa.Engine) -> Config:
    return Config(engine)


# An audience query that runs for minutes on each backend, to meet SYNC_QUERY_TIMEOUT.
SLOW_QUERY = {
    "postgres": "SELECT user_id FROM customers, pg_sleep(300)",
    "sqlite": "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 1000000000) "
    "SELECT CAST(max(n) AS TEXT) AS user_id FROM c",
}


class Customers:
    """A source table in the state database that audience queries select from."""

    QUERY = (
        "SELECT user_id, email, first_name, last_name, transaction_id FROM customers WHERE segment = 'vip'"
    )

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE customers (user_id TEXT, email TEXT, first_name TEXT, last_name TEXT, "
                "transaction_id TEXT, segment TEXT)"
            )

    def add(self, *user_ids: str, segment: str = "vip") -> None:
        rows = [{"u": u, "e": f"{u}@example.com", "t": f"tid-{u}", "s": segment} for u in user_ids]
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO customers (user_id, email, first_name, last_name, transaction_id, segment) "
                    "VALUES (:u, :e, 'Ada', 'Lovelace', :t, :s)"
                ),
                rows,
            )

    def move(self, *user_ids: str, segment: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE customers SET segment = :s WHERE user_id = :u"),
                [{"s": segment, "u": u} for u in user_ids],
            )


@pytest.fixture
def customers(engine: sa.Engine) -> Customers:
    return Customers(engine)


def free_port() -> int:
    """A loopback port nothing listens on now: for a server to start on, or a connection to be refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition: Callable[[], object], timeout: float = 60) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds: a bound on a hang, not a measurement."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.02)


def cli_env(state_url: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The process environment without the developer's SYNC_* settings, pointed at `state_url`."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_")}
    full_env.update({"SYNC_DATABASE_URL": state_url, **(env or {})})
    return full_env


def run_cli(
    state_url: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The real `audience-sync` command, as an operator runs it."""
    return subprocess.run(
        [COMMAND, *args],
        env=cli_env(state_url, env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def start_cli(
    state_url: str, *args: str, env: dict[str, str] | None = None, **popen: Any
) -> subprocess.Popen[str]:
    """The real command in the background (the daemon), output captured unless `popen` says otherwise."""
    options: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen(
        [COMMAND, *args], env=cli_env(state_url, env), stdin=subprocess.DEVNULL, text=True, **options
    )


def sync_in_process(
    engine: sa.Engine,
    *servers: sandbox.FakeServer,
    source: sa.Engine | None = None,
    query_timeout: float = 600.0,
    loopback: bool = False,
    **options: Any,
) -> list[Result]:
    """One `audience-sync run` in this process (`initial` with `initial_only=True`): the runner, its requests
    answered by the servers' in-process face, or with `loopback` over the wire (faults that need a socket).
    For the logic; the command itself keeps its subprocess tests."""
    settings = Settings(str(engine.url), None, Cadence(7200, 10800), 60.0, query_timeout)
    transport = None if loopback else sandbox.transport(*servers)
    runner = Runner(engine, Sources(source or engine), settings, transport=transport)
    try:
        return runner.run(Options(**options))
    finally:
        runner.close()
