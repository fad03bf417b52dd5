"""Sources that fail under a run (issue 20, items 2 to 4), through the real `audience-sync` command on a
SQLite and on a Postgres state database.

A source connection that stops answering midway through a result (a loopback proxy that stops forwarding)
ends its run as `failed` within SYNC_QUERY_TIMEOUT + 15 s, and the first SIGTERM ends a daemon's run stuck
there within 15 s as `interrupted`, its lease released. A MariaDB connection killed while rows stream fails
its run with one line, and the other audiences sync. A DuckDB source file is not held between the daemon's
runs: another process takes its write lock, and a file replaced by a rename is the one the next run reads.
And a driver's failure that is no DBAPI error fails only its audience, with a row in the run history.
"""

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import duckdb
import pytest
import sqlalchemy as sa

from sync import runner
from sync.audiences import Audience
from sync.sandbox import SegmentServer
from tests.conftest import (
    MARIADB_URL,
    POSTGRES_URL,
    Config,
    Customers,
    run_cli,
    start_cli,
    sync_in_process,
    wait_for,
)
from tests.tcp_proxy import TcpProxy
from tests.test_source_table import add_source
from tests.test_sources import segment_destination

# Results of about 23 MB, made by the source without a table: a proxy stops forwarding at the first MB
LARGE_RESULTS = {
    "postgres": (
        POSTGRES_URL,
        "SELECT 'u' || g AS user_id, repeat('x', 200) AS pad FROM generate_series(1, 100000) AS g",
    ),
    "mariadb": (
        MARIADB_URL,
        "SELECT CONCAT('u', seq) AS user_id, REPEAT('x', 200) AS pad FROM seq_1_to_100000",
    ),
}
SOURCES = ["postgres", pytest.param("mariadb", marks=pytest.mark.mariadb)]
QUERY_TIMEOUT = 1.0  # seconds: SYNC_QUERY_TIMEOUT=1s


def _stalling(source: str, proxy: TcpProxy) -> str:
    """The URL of `source` through the proxy, which stops forwarding each connection at its first MB."""
    proxy.stall_after(1_000_000)
    return sa.make_url(LARGE_RESULTS[source][0]).set(port=proxy.port).render_as_string(hide_password=False)


def _proxy_to(source: str) -> TcpProxy:
    url = sa.make_url(LARGE_RESULTS[source][0])
    return TcpProxy(url.host or "127.0.0.1", url.port or 0)


def _runs(config: Config) -> list[tuple[str, str]]:
    return [
        (outcome, error) for outcome, error in config.sql("SELECT outcome, error FROM sync_runs ORDER BY id")
    ]


def _leases(config: Config) -> int:
    return int(config.sql("SELECT count(*) FROM sync_leases")[0][0])


@pytest.mark.parametrize("source", SOURCES)
def test_a_source_that_stops_answering_mid_result_fails_the_run_within_the_timeout(
    state_url: str, config: Config, source: str
) -> None:
    with _proxy_to(source) as proxy, SegmentServer(api_key="k") as segment:
        env = {"SYNC_SOURCE_URL": _stalling(source, proxy), "SYNC_QUERY_TIMEOUT": f"{QUERY_TIMEOUT:g}s"}
        large = config.audience("Large", LARGE_RESULTS[source][1])
        config.connect(large, segment_destination(config, segment))

        started = time.monotonic()
        result = run_cli(state_url, "run", env=env, timeout=QUERY_TIMEOUT + 30)
        elapsed = time.monotonic() - started
        stalled = bool(proxy.stalled)

    assert stalled  # the result was cut off midway, the connection left open
    assert result.returncode == 1, result.stderr
    assert elapsed < QUERY_TIMEOUT + 15, elapsed
    error = (
        f"audience 'Large' (id {large}): the query failed: timed out (SYNC_QUERY_TIMEOUT): "
        "no answer 5s past it; the connection was closed"
    )
    assert _runs(config) == [("failed", error)]
    assert "Traceback" not in result.stderr and error in result.stderr
    assert _leases(config) == 0 and segment.messages == []


@pytest.mark.parametrize("source", SOURCES)
def test_the_first_sigterm_ends_a_daemons_run_stuck_in_a_source_read_within_15s(
    state_url: str, config: Config, source: str
) -> None:
    with _proxy_to(source) as proxy, SegmentServer(api_key="k") as segment:
        env = {"SYNC_SOURCE_URL": _stalling(source, proxy), "SYNC_QUERY_TIMEOUT": "10m"}
        large = config.audience("Large", LARGE_RESULTS[source][1])
        config.connect(large, segment_destination(config, segment))
        daemon = start_cli(state_url, "daemon", env=env)
        try:
            wait_for(lambda: proxy.stalled and _leases(config) == 1, 30)  # stuck in the read, lease held
            daemon.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            _, stderr = daemon.communicate(timeout=30)
            elapsed = time.monotonic() - stopped
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.communicate()

    assert daemon.returncode == 0 and "Traceback" not in stderr, stderr
    assert elapsed < 15, elapsed
    assert _runs(config) == [
        ("interrupted", f"audience 'Large' (id {large}): the query was interrupted by shutdown")
    ]
    assert _leases(config) == 0 and segment.messages == []


@pytest.mark.mariadb
def test_a_mariadb_connection_killed_while_rows_stream_fails_its_run_in_one_line_and_the_others_sync(
    state_url: str, config: Config, customers: Customers, mariadb: sa.Engine
) -> None:
    """6,000 rows at once, then one a second: the connection is killed while the run reads them."""
    marker = f"killed-{uuid.uuid4().hex[:8]}"
    trickling = (
        f"SELECT CONCAT('u', seq) AS user_id FROM seq_1_to_20000 "
        f"WHERE '{marker}' <> '' AND (seq <= 6000 OR SLEEP(1) = 0)"
    )
    customers.add("u1")
    with SegmentServer(api_key="k") as segment:
        destination = segment_destination(config, segment)
        add_source(config, "mart", url=MARIADB_URL)
        killed = config.audience("Killed", trickling, source="mart")
        config.connect(killed, destination)
        config.connect(config.audience("Healthy", Customers.QUERY), destination)

        run = start_cli(state_url, "run")
        try:
            wait_for(lambda: _sleeping(mariadb, marker), 30)
            with mariadb.connect() as conn:
                conn.exec_driver_sql(f"KILL {_sleeping(mariadb, marker)}")
            _, stderr = run.communicate(timeout=60)
        finally:
            if run.poll() is None:
                run.kill()
                run.communicate()
        status = run_cli(state_url, "status")

    assert run.returncode == 1, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    error = f"audience 'Killed' (id {killed}): the query failed: "
    error += "(2013, 'Lost connection to MySQL server during query')"
    [(outcome, text)] = config.sql("SELECT outcome, error FROM sync_runs WHERE audience_id = :a", a=killed)
    assert (outcome, text) == ("failed", error)
    assert [m["userId"] for m in segment.messages] == ["u1"]  # the healthy audience synced
    assert status.returncode == 1 and "failed" in status.stdout, status.stdout


def _sleeping(mariadb: sa.Engine, marker: str) -> int | None:
    """The id of the connection running the query marked `marker` once it sleeps (its first rows sent)."""
    with mariadb.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT id FROM information_schema.processlist "
                "WHERE info LIKE :like AND state = 'User sleep' AND id <> CONNECTION_ID()"
            ),
            {"like": f"%{marker}%"},
        ).scalar()


def test_a_duckdb_source_file_is_not_held_between_the_daemons_runs(
    state_url: str, config: Config, tmp_path: Path
) -> None:
    """An ETL job takes the file's write lock between two runs, and then publishes a new file by a rename:
    the next runs read what each wrote."""
    path = tmp_path / "warehouse" / "lake.duckdb"
    path.parent.mkdir()
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE customers (user_id VARCHAR); INSERT INTO customers VALUES ('u1')")
    with SegmentServer(api_key="k") as segment:
        config.connect(
            config.audience("Lake", "SELECT user_id, 'tid-' || user_id AS transaction_id FROM customers"),
            segment_destination(config, segment),
        )
        env = {"SYNC_SOURCE_URL": f"duckdb:///{path}", "SYNC_INTERVAL": "1s"}
        daemon = start_cli(state_url, "daemon", env=env)
        try:
            wait_for(lambda: _sent(segment) == ["u1"], 30)
            wait_for(lambda: _written(path, "u2"), 30)  # between two runs: nothing holds the file
            wait_for(lambda: _sent(segment) == ["u1", "u2"], 30)

            replacement = path.with_name("lake.new.duckdb")
            with duckdb.connect(str(replacement)) as con:
                con.execute("CREATE TABLE customers (user_id VARCHAR)")
                con.execute("INSERT INTO customers VALUES ('u1'), ('u2'), ('u3')")
            os.replace(replacement, path)
            wait_for(lambda: _sent(segment) == ["u1", "u2", "u3"], 30)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                _, stderr = daemon.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                _, stderr = daemon.communicate()
    assert daemon.returncode == 0 and "Traceback" not in stderr, stderr


def _sent(segment: SegmentServer) -> list[str]:
    return sorted(str(m["userId"]) for m in segment.messages)


def _written(path: Path, user_id: str) -> bool:
    """Whether this process took the file's write lock and added the user (False: another one holds it)."""
    try:
        with duckdb.connect(str(path)) as con:
            con.execute("INSERT INTO customers VALUES (?)", [user_id])
    except duckdb.IOException:
        time.sleep(0.2)
        return False
    return True


def test_a_driver_failure_that_is_no_dbapi_error_fails_only_its_audience_with_a_recorded_row(
    engine: sa.Engine, config: Config, customers: Customers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What PyMySQL raised before its lost connection was handled: AttributeError out of the staging."""
    customers.add("u1")
    real = runner.stage_members

    def staging(
        state: sa.Connection, source: sa.Engine, audience: Audience, *args: Any, **kwargs: Any
    ) -> Any:
        if audience.name == "Broken":
            raise AttributeError("'NoneType' object has no attribute 'read'")
        return real(state, source, audience, *args, **kwargs)

    monkeypatch.setattr(runner, "stage_members", staging)
    with SegmentServer(api_key="k") as segment:
        destination = segment_destination(config, segment)
        broken = config.audience("Broken", Customers.QUERY)
        config.connect(broken, destination)
        config.connect(config.audience("Healthy", Customers.QUERY), destination)
        results = {r.audience: r for r in sync_in_process(engine, segment)}

    error = f"audience 'Broken' (id {broken}): the run failed: "
    error += "AttributeError: 'NoneType' object has no attribute 'read'"
    assert (results["Broken"].outcome, results["Broken"].error) == ("failed", error)
    assert results["Healthy"].outcome == "ok"
    runs = config.sql("SELECT destination_id, outcome, error FROM sync_runs WHERE audience_id = :a", a=broken)
    assert [tuple(run) for run in runs] == [(None, "failed", error)]
    assert [m["userId"] for m in segment.messages] == ["u1"]
