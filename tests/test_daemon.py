"""The daemon: seconds-scale cadence, config reload, resume after restart, clean SIGTERM."""

import json
import random
import signal
import socket
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import sqlalchemy as sa

from sync import staging
from sync.runner import Options, Runner
from sync.sandbox import EverflowServer
from sync.scheduler import CadenceTrigger
from sync.settings import Cadence, Settings
from sync.sources import Sources
from tests.conftest import Config, Customers, free_port, run_cli, start_cli
from tests.test_e2e import everflow_destination
from tests.test_reliability import _wait_for_metrics


def _runs(config: Config, audience: int) -> int:
    return int(config.sql("SELECT count(*) FROM sync_runs WHERE audience_id = :a", a=audience)[0][0])


def _wait_for(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    pytest.fail(f"condition not met within {timeout}s")


def test_daemon_runs_cycles_picks_up_changes_and_stops_on_sigterm(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    with EverflowServer() as everflow:
        audience = config.audience("VIP", Customers.QUERY)
        config.connect(audience, everflow_destination(config, everflow))
        port = free_port()
        env = dict(
            SYNC_INTERVAL="2s",
            SYNC_RELOAD_INTERVAL="1s",
            SYNC_METRICS_PORT=str(port),
            SYNC_LOG_FORMAT="json",
        )
        daemon = start_cli(state_url, "daemon", env=env)
        try:
            _wait_for(lambda: _runs(config, audience) >= 1, 30)
            customers.add("u2")
            _wait_for(lambda: _runs(config, audience) >= 2, 30)
            # an audience added while running is picked up by the reload
            later = config.audience("Later", Customers.QUERY)
            config.connect(
                later,
                int(config.sql("SELECT id FROM destinations WHERE name = 'Everflow'")[0][0]),
                {"entered_event": "Later Entered"},  # unmapped: skipped, so the counts below stay exact
            )
            _wait_for(lambda: _runs(config, later) >= 1, 30)
            health = httpx.get(f"http://127.0.0.1:{port}/healthz")
            assert (health.status_code, health.text) == (200, "ok\n")
            exposed = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            # labelled by the audience's key and the destination's id, which survive renames
            vip = 'audience="vip",destination_id="1"'
            assert f'audience_sync_runs_total{{{vip},outcome="ok"}}' in exposed
            assert f'audience_sync_changes_total{{{vip},outcome="accepted"}} 2.0' in exposed
            assert f"audience_sync_pending_changes{{{vip}}} 0.0" in exposed
            assert f"audience_sync_accepted_members{{{vip}}} 2.0" in exposed
            names = 'audience_name="VIP",destination_id="1",destination_name="Everflow"'
            assert f'audience_sync_connection_info{{audience="vip",{names}}} 1.0' in exposed
        finally:
            daemon.send_signal(signal.SIGTERM)
            _, stderr = daemon.communicate(timeout=30)
        assert daemon.returncode == 0, stderr
        records = [json.loads(line) for line in stderr.splitlines()]  # SYNC_LOG_FORMAT=json: every line
        actions = {record["action"] for record in records}  # APScheduler's lines too
        assert {"daemon_started", "audience_scheduled", "run_finished", "daemon_stopped"} <= actions
        assert everflow.accepted == {("tid-u1", "7"): 1, ("tid-u2", "7"): 1}


def test_cadence_trigger_resumes_from_the_last_run() -> None:
    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    rng = random.Random(1)
    two_hours = Cadence.parse("2h", "SYNC_INTERVAL")
    assert CadenceTrigger(two_hours, now - timedelta(hours=2.5), rng).get_next_fire_time(None, now) == now
    recent = CadenceTrigger(two_hours, now - timedelta(hours=0.5), rng)
    assert recent.get_next_fire_time(None, now) == now + timedelta(hours=1.5)
    ranged = CadenceTrigger(Cadence.parse("2h-3h", "SYNC_INTERVAL"), None, rng)
    assert ranged.get_next_fire_time(None, now) == now  # never ran: run now
    draws = {ranged.get_next_fire_time(now, now) for _ in range(20)}
    assert all(now + timedelta(hours=2) <= fire <= now + timedelta(hours=3) for fire in draws)
    assert len(draws) > 1  # drawn anew each time


def test_sigterm_during_delivery_finishes_the_page_and_loses_nothing(
    state_url: str, config: Config, customers: Customers
) -> None:
    users = [f"u{i:02d}" for i in range(40)]
    customers.add(*users)
    with EverflowServer(delay=0.05) as everflow:
        audience = config.audience("VIP", Customers.QUERY)
        config.connect(audience, everflow_destination(config, everflow, rate_limit=10, max_in_flight=4))
        daemon = start_cli(state_url, "daemon", env={"SYNC_INTERVAL": "1h"})
        _wait_for(lambda: len(everflow.requests) >= 6, 30)
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=30)
        assert daemon.returncode == 0, stderr
        assert "Traceback" not in stderr
        outcome, error = config.sql(
            "SELECT outcome, error FROM sync_runs WHERE audience_id = :a", a=audience
        )[0]
        assert outcome == "interrupted" and error.startswith("interrupted by shutdown")
        sent_before = len(everflow.accepted)
        assert 0 < sent_before < len(users)

        finish = run_cli(state_url, "run")
        assert finish.returncode == 0, finish.stderr
        assert everflow.accepted == {(f"tid-{u}", "7"): 1 for u in users}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SYNC_INTERVAL": "99999999d"}, "SYNC_INTERVAL: '99999999d' is longer than 365 days"),
        ({"SYNC_RELOAD_INTERVAL": "99999999d"}, "SYNC_RELOAD_INTERVAL: '99999999d' is longer than 365 days"),
        ({"SYNC_INTERVAL": "-1h"}, "SYNC_INTERVAL: '-1h': '' is not a duration"),
        ({"SYNC_METRICS_PORT": "²"}, "SYNC_METRICS_PORT: '²' is not a TCP port (1-65535)"),
    ],
)
def test_bad_setting_stops_the_daemon_at_start_with_one_line(
    state_url: str, config: Config, customers: Customers, env: dict[str, str], message: str
) -> None:
    customers.add("u1")
    with EverflowServer() as everflow:
        config.connect(config.audience("VIP", Customers.QUERY), everflow_destination(config, everflow))
        assert run_cli(state_url, "run").returncode == 0  # a last run to schedule from
    result = run_cli(state_url, "daemon", env=env, timeout=30)
    assert result.returncode == 2 and result.stderr.startswith(f"audience-sync: {message}"), result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_metrics_port_in_use_stops_the_daemon_with_one_line(state_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(state_url, "daemon", env={"SYNC_METRICS_PORT": str(port)}, timeout=30)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.endswith(
        f"audience-sync: SYNC_METRICS_PORT: cannot listen on port {port}: Address already in use\n"
    )


def test_schedule_too_long_makes_its_audience_invalid_and_the_others_keep_syncing(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    with EverflowServer() as everflow:
        destination = everflow_destination(config, everflow)
        vip, huge = config.audience("VIP", Customers.QUERY), config.audience("Huge", Customers.QUERY)
        config.connect(vip, destination)
        config.connect(huge, destination)
        assert run_cli(state_url, "run").returncode == 0  # the last runs the daemon schedules from
        config.sql("UPDATE audiences SET schedule = '99999999d' WHERE id = :a", a=huge)
        status = run_cli(state_url, "status", "--json")
        assert status.returncode == 1, status.stderr  # the invalid row needs attention

        daemon = start_cli(state_url, "daemon", env={"SYNC_INTERVAL": "1s"})
        try:
            _wait_for(lambda: _runs(config, vip) >= 2, 30)
        finally:
            daemon.send_signal(signal.SIGTERM)
            _, stderr = daemon.communicate(timeout=30)
    assert daemon.returncode == 0 and "Traceback" not in stderr, stderr
    assert f"audiences row id={huge} ('Huge'): schedule: '99999999d' is longer than 365 days" in stderr
    assert _runs(config, huge) == 2  # its last ok run, and the invalid row the daemon recorded


def test_schedule_under_a_second_is_refused_and_under_a_minute_is_warned(
    state_url: str, config: Config, customers: Customers
) -> None:
    """Finding 13: `1ms` was accepted (861 runs in 20 s); seconds stay allowed, for tests and soaks."""
    customers.add("u1")
    with EverflowServer() as everflow:
        destination = everflow_destination(config, everflow)
        vip = config.audience("VIP", Customers.QUERY, schedule="2s")
        busy = config.audience("Busy", Customers.QUERY, schedule="1ms")
        config.connect(vip, destination)
        config.connect(busy, destination)
        refused = (
            f"audiences row id={busy} ('Busy'): schedule: '1ms' is shorter than 1s, the shortest cadence"
        )
        warned = f"audience 'VIP' (id {vip}): cadence 2s is under a minute"

        checked = run_cli(state_url, "check")
        assert checked.returncode == 2 and refused in checked.stdout, checked.stdout
        assert (
            f"warning: {warned}" in checked.stdout and "1 problem(s) and" in checked.stderr
        )  # Postgres adds its superuser warning
        for interval in ("1ms", "500ms-2s"):
            bad = run_cli(state_url, "status", env={"SYNC_INTERVAL": interval})
            assert (bad.returncode, bad.stderr) == (
                2,
                f"audience-sync: SYNC_INTERVAL: {interval!r} is shorter than 1s, the shortest cadence\n",
            )

        daemon = start_cli(state_url, "daemon")
        try:
            _wait_for(lambda: _runs(config, vip) >= 2, 30)
        finally:
            daemon.send_signal(signal.SIGTERM)
            _, stderr = daemon.communicate(timeout=30)
    assert daemon.returncode == 0 and "Traceback" not in stderr, stderr
    assert refused in stderr and warned in stderr
    # never run: only the invalid row the daemon recorded, which `status` shows
    assert config.sql("SELECT outcome, destination_id FROM sync_runs WHERE audience_id = :a", a=busy) == [
        ("invalid", None)
    ]


def test_runs_reuse_the_state_database_connections(
    engine: sa.Engine, config: Config, customers: Customers
) -> None:
    """Runs take pooled connections instead of opening new ones (on Postgres a server process each)."""
    opened: list[object] = []
    sa.event.listen(engine, "connect", lambda dbapi_connection, _record: opened.append(dbapi_connection))
    if engine.dialect.name == "sqlite":  # and the connections that read the query's declared types
        sa.event.listen(staging._probe_engine(engine), "connect", lambda c, _record: opened.append(c))
    customers.add("u1", "u2")
    with EverflowServer() as everflow:
        destination = everflow_destination(config, everflow)
        for n in range(8):
            config.connect(config.audience(f"Audience {n}", Customers.QUERY), destination)
        runner = Runner(engine, Sources(engine), Settings.from_env())
        try:
            results = [result for cycle in range(10) for result in runner.run(Options())]
        finally:
            runner.close()

    assert [r.outcome for r in results] == ["ok"] * 80
    # 80 runs, but 4 at once, each with a connection holding its members and one for the destination (and on
    # SQLite one reading the declared types)
    assert len(opened) <= 12


def test_a_restarted_daemon_shows_the_pending_changes_the_last_run_left(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2", "u3")
    with EverflowServer() as everflow:
        audience = config.audience("VIP", Customers.QUERY)
        config.connect(audience, everflow_destination(config, everflow, max_attempts=1))
        everflow.fault(503, times=100)
        assert run_cli(state_url, "run").returncode == 1
        port = free_port()
        env = {"SYNC_INTERVAL": "1h", "SYNC_METRICS_PORT": str(port)}  # the next run is an hour away
        daemon = start_cli(state_url, "daemon", env=env)
        try:
            exposed = _wait_for_metrics(port, "pending_changes{")
            assert 'audience_sync_pending_changes{audience="vip",destination_id="1"} 3.0' in exposed
            assert (
                'audience_sync_last_run_outcome{audience="vip",destination_id="1",outcome="failed"} 1.0'
                in exposed
            )
            assert 'audience_sync_last_success_timestamp_seconds{audience="vip"' not in exposed  # never ok
            assert _runs(config, audience) == 1  # seeded from the recorded run, not from a new one
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.communicate(timeout=30)


def test_a_second_daemon_on_one_sqlite_file_refuses_to_start_and_on_postgres_shares_the_work(
    state_url: str, config: Config, customers: Customers, backend: str
) -> None:
    customers.add("u1")
    with EverflowServer() as everflow:
        vip = config.audience("VIP", Customers.QUERY)
        config.connect(vip, everflow_destination(config, everflow))
        first = start_cli(state_url, "daemon", env={"SYNC_INTERVAL": "1s"})
        try:
            _wait_for(lambda: _runs(config, vip) >= 1, 30)  # the first one runs
            second = run_cli(state_url, "daemon", timeout=60) if backend == "sqlite" else None
            if second is not None:
                database = sa.make_url(state_url).database
                assert second.returncode == 2, second.stderr
                refusal = f"another daemon (pid {first.pid}) already runs on sqlite file {database}; "
                assert second.stderr.endswith(
                    f"audience-sync: {refusal}"
                    "one daemon per SQLite file (several daemons can share a Postgres state database)\n"
                ), second.stderr
            else:
                port = free_port()
                other = start_cli(
                    state_url, "daemon", env={"SYNC_INTERVAL": "1s", "SYNC_METRICS_PORT": str(port)}
                )
                _wait_for_metrics(port, "audience_sync_")  # started: it serves its metrics
                runs = _runs(config, vip)
                _wait_for(lambda: _runs(config, vip) >= runs + 3, 30)
                assert other.poll() is None  # still running beside the first
                other.send_signal(signal.SIGTERM)
                _, other_stderr = other.communicate(timeout=30)
                assert other.returncode == 0, other_stderr
        finally:
            first.send_signal(signal.SIGTERM)
            _, stderr = first.communicate(timeout=30)
    assert first.returncode == 0, stderr
