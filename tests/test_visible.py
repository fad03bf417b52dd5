"""Every failure visible where operators look (issue 23): the metrics, `status` and `check`, and refusals in
one line, through the real `audience-sync` command on a SQLite and on a Postgres state database."""

import json
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

from sync.sandbox import EverflowServer, RefersionServer, SegmentServer
from tests.conftest import MARIADB_URL, Config, Customers, free_port, run_cli, start_cli
from tests.test_daemon import _runs
from tests.test_e2e import everflow_destination, refersion_destination
from tests.test_reliability import _wait_for_metrics
from tests.test_source_table import add_source
from tests.test_sources import segment_destination

VIP = 'audience="vip",destination_id="1"'


@contextmanager
def daemon_metrics(state_url: str, interval: str, needle: str) -> Iterator[str]:
    """A daemon on `interval` with its metrics, yielding them once they show `needle`; stopped after."""
    port = free_port()
    env = {"SYNC_INTERVAL": interval, "SYNC_RELOAD_INTERVAL": "1s", "SYNC_METRICS_PORT": str(port)}
    daemon = start_cli(state_url, "daemon", env=env)
    try:
        yield _wait_for_metrics(port, needle)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=30)
    assert daemon.returncode == 0 and "Traceback" not in stderr, stderr


def last_outcomes(exposed: str, labels: str = VIP) -> list[str]:
    """The connection's `audience_sync_last_run_outcome` series, each as its outcome label and value (one,
    `outcome="..."} 1.0`, when the gauges are right)."""
    series = f"audience_sync_last_run_outcome{{{labels},"
    return [line.removeprefix(series) for line in exposed.splitlines() if line.startswith(series)]


@contextmanager
def synced_vip(state_url: str, config: Config, customers: Customers) -> Iterator[int]:
    """Audience VIP (its id yielded) connected to an Everflow sandbox, after an `ok` run of it."""
    customers.add("u1")
    with EverflowServer() as everflow:
        audience = config.audience("VIP", Customers.QUERY)
        config.connect(audience, everflow_destination(config, everflow))
        assert run_cli(state_url, "run").returncode == 0
        yield audience


def status_of(state_url: str) -> tuple[int, list[dict[str, object]]]:
    done = run_cli(state_url, "status", "--json")
    return done.returncode, json.loads(done.stdout)


def test_an_invalid_schedule_keeps_the_series_saying_invalid_and_status_agrees(
    state_url: str, config: Config, customers: Customers
) -> None:
    with synced_vip(state_url, config, customers) as audience:
        config.sql("UPDATE audiences SET schedule = '99999999d' WHERE id = :a", a=audience)

        code, (row,) = status_of(state_url)  # no daemon has met the row yet
        assert (code, row["state"], row["next_run_earliest"]) == (1, "invalid", None)
        assert "schedule: '99999999d' is longer than 365 days" in str(row["last_error"])

        with daemon_metrics(state_url, "1h", 'outcome="invalid"') as exposed:
            assert last_outcomes(exposed) == ['outcome="invalid"} 1.0']
            assert f'audience_sync_runs_total{{{VIP},outcome="invalid"}} 1.0' in exposed
            assert 'audience_sync_connection_info{audience="vip",audience_name="VIP"' in exposed
        assert _runs(config, audience) == 2  # the daemon recorded it: `runs` and `status` show why
        code, (row,) = status_of(state_url)
        assert (code, row["state"], row["next_run_earliest"]) == (1, "invalid", None)


def test_a_disabled_source_makes_the_series_say_invalid_while_running_and_after_a_restart(
    state_url: str, config: Config, customers: Customers
) -> None:
    with synced_vip(state_url, config, customers) as audience:
        add_source(config, "shop", url=state_url, enabled=False)
        config.sql("UPDATE audiences SET source = 'shop' WHERE id = :a", a=audience)

        # the daemon runs it (every second) and finds its source disabled
        with daemon_metrics(state_url, "1s", 'outcome="invalid"') as exposed:
            assert last_outcomes(exposed) == ['outcome="invalid"} 1.0']
        runs = _runs(config, audience)
        # restarted an hour from its next run: the gauges are seeded from the audience's invalid run
        with daemon_metrics(state_url, "1h", "audience_sync_last_run_outcome{") as exposed:
            assert last_outcomes(exposed) == ['outcome="invalid"} 1.0']
        assert _runs(config, audience) == runs  # seeded, not run again
        code, (row,) = status_of(state_url)
        assert (code, row["state"]) == (1, "invalid")
        assert "sources row id=1 ('shop') is disabled" in str(row["last_error"])


def test_a_run_rejecting_over_the_share_of_at_least_10_changes_is_rejected_in_status_runs_and_metrics(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add(*(f"u{i}" for i in range(12)))
    customers.add(*(f"f{i}" for i in range(9)), segment="few")  # under 10 changes: too few to tell
    without_transaction_id = "SELECT user_id, email FROM customers WHERE segment = '{}'"
    with EverflowServer() as everflow:
        destination = everflow_destination(config, everflow)
        vip = config.audience("VIP", without_transaction_id.format("vip"))
        few = config.audience("Few", without_transaction_id.format("few"))
        config.connect(vip, destination)
        config.connect(few, destination)
        run = run_cli(state_url, "run")
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        outcomes = config.sql("SELECT audience_id, outcome, rejected, error FROM sync_runs ORDER BY 1")
        assert [tuple(row[:3]) for row in outcomes] == [(vip, "rejected", 12), (few, "ok", 9)]
        assert outcomes[0].error == (
            "12 of 12 changes were rejected, more than SYNC_REJECTED_SHARE (50%); they are not sent again "
            "until the users' traits change (last: Everflow requires a TransactionId (the audience query "
            "gives no transaction_id))"
        )
        code, rows = status_of(state_url)
        assert code == 1
        assert {row["audience"]: row["state"] for row in rows} == {"VIP": "rejected", "Few": "ok"}

        with daemon_metrics(state_url, "1h", "audience_sync_rejected_changes{") as exposed:
            assert last_outcomes(exposed) == ['outcome="rejected"} 1.0']
            assert f"audience_sync_rejected_changes{{{VIP}}} 12.0" in exposed

        customers.add(*(f"v{i}" for i in range(12)))
        assert run_cli(state_url, "run", env={"SYNC_REJECTED_SHARE": "100%"}).returncode == 0
        bad = run_cli(state_url, "run", env={"SYNC_REJECTED_SHARE": "50"})
        assert bad.returncode == 2
        assert bad.stderr.endswith(
            "audience-sync: SYNC_REJECTED_SHARE: '50' is not a percentage from 0% to 100% (e.g. 50%)\n"
        )


def test_check_names_the_column_each_destination_needs_that_the_query_lacks(
    state_url: str, config: Config, customers: Customers
) -> None:
    with EverflowServer() as everflow, SegmentServer(api_key="k") as segment, RefersionServer() as refersion:
        destinations = [
            everflow_destination(config, everflow),
            segment_destination(config, segment),  # Everflow over the Segment transport
            refersion_destination(config, refersion),
        ]
        lacking = config.audience("Lacking", "SELECT user_id, first_name FROM customers")
        # a `name` in one column serves Refersion as well as first_name and last_name
        named = config.audience(
            "Named",
            "SELECT user_id, email, first_name || ' ' || last_name AS name, transaction_id FROM customers",
        )
        for audience in (lacking, named):
            for destination in destinations:
                config.connect(audience, destination)
        done = run_cli(state_url, "check", "--json")
    assert done.returncode == 2, done.stderr
    findings = json.loads(done.stdout)["findings"]
    everflow_lacks = (
        "the query returns no transaction_id column (Everflow requires a TransactionId for every "
        "conversion): every change would be rejected"
    )
    where = f"audience 'Lacking' (id {lacking}) -> destinations row"
    assert [f["message"] for f in findings if f["severity"] == "error"] == [
        f"{where} id=1 ('Everflow'): {everflow_lacks}",
        f"{where} id=3 ('Refersion'): the query returns no email or last_name column (Refersion needs email, "
        "first_name and last_name, or name, to create an affiliate): every entry would be rejected",
        f"{where} id=2 ('Segment'): {everflow_lacks}",
    ]


@pytest.mark.parametrize("backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_postgres_url_without_a_driver_uses_psycopg_for_the_state_database_and_a_source(
    state_url: str, config: Config, customers: Customers
) -> None:
    libpq = state_url.replace("postgresql+psycopg://", "postgres://")
    assert libpq.startswith("postgres://")
    customers.add("u1")
    with EverflowServer() as everflow:
        audience = config.audience("VIP", Customers.QUERY, source="shop")
        config.connect(audience, everflow_destination(config, everflow))
        add_source(config, "shop", url=libpq.replace("postgres://", "postgresql://"))
        done = run_cli(libpq, "run")
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        config.sql("UPDATE sources SET url = :url", url=libpq)
        customers.add("u2")
        done = run_cli(libpq, "run")
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert len(everflow.accepted) == 2


def test_a_source_whose_dialect_is_not_installed_is_a_problem_of_its_audience(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    with EverflowServer() as everflow:
        destination = everflow_destination(config, everflow)
        lake = config.audience("Lake", Customers.QUERY, source="lake")
        vip = config.audience("VIP", Customers.QUERY)
        for audience in (lake, vip):
            config.connect(audience, destination)
        add_source(config, "lake", url="cockroachdb://reader@lake.internal/shop")
        check = run_cli(state_url, "check")
        run = run_cli(state_url, "run")
    problem = (
        f"audience 'Lake' (id {lake}): sources row id=1 ('lake'): cannot use source URL "
        "cockroachdb://reader@lake.internal/shop: no SQLAlchemy dialect 'cockroachdb' is installed; install "
        "its SQLAlchemy dialect package"
    )
    assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr
    assert problem in check.stdout
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    outcomes = config.sql("SELECT audience_id, outcome, error FROM sync_runs ORDER BY audience_id")
    assert [tuple(row) for row in outcomes] == [(lake, "invalid", problem), (vip, "ok", None)]


@pytest.mark.mariadb
def test_a_state_database_other_than_sqlite_or_postgres_is_refused_before_anything_is_created(
    mariadb: sa.Engine,
) -> None:
    name = f"as_visible_{uuid.uuid4().hex[:8]}"
    with mariadb.begin() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    url = sa.make_url(MARIADB_URL).set(drivername="mysql", database=name).render_as_string(False)
    try:
        for command in (["db", "upgrade"], ["status"], ["run"]):
            done = run_cli(url, *command)
            assert (done.returncode, done.stdout) == (2, ""), done.stderr
            assert done.stderr == (
                f"audience-sync: cannot use database URL {url}: the state database must be SQLite or "
                "Postgres, not mysql (other databases can be sources of audience queries: see Sources in the "
                "README)\n"
            )
        with mariadb.connect() as conn:
            tables = conn.execute(
                sa.text("SELECT count(*) FROM information_schema.tables WHERE table_schema = :s"), {"s": name}
            )
            assert tables.scalar() == 0
    finally:
        with mariadb.begin() as conn:
            conn.exec_driver_sql(f"DROP DATABASE {name}")


def test_a_refused_connection_names_the_host_and_port_and_no_secret(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    port = free_port()  # nothing listens there
    settings = {
        "tracking_domain": f"http://127.0.0.1:{port}",
        "network_id": "1",
        "verification_token": "tok-s3cret",
        "event_mapping": {"Audience Entered": 1, "Audience Exited": 2},
        "max_attempts": 1,
    }
    destination = config.destination("Everflow", "everflow", settings)
    config.connect(config.audience("VIP", Customers.QUERY), destination)
    done = run_cli(state_url, "run")
    assert done.returncode == 1, done.stderr
    [(error,)] = config.sql("SELECT error FROM sync_runs")
    assert error.endswith(f"(last: gave up after 1 attempt: connection refused by 127.0.0.1:{port})")
    assert f"connection refused by 127.0.0.1:{port}" in done.stderr
    assert "tok-s3cret" not in done.stderr + error
