"""Every failure visible where operators look (issue 23): the metrics, `status` and `check`, and refusals in
one line, through the real `audience-sync` command on a SQLite and on a Postgres state database."""

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from sync.sandbox import EverflowServer
from tests.conftest import Config, Customers, free_port, run_cli, start_cli
from tests.test_daemon import _runs
from tests.test_e2e import everflow_destination
from tests.test_reliability import _wait_for_metrics
from tests.test_source_table import add_source

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
