"""Every failure visible where operators look (issue 23, its remaining items, and review findings), through
the real `audience-sync` command on a SQLite and on a Postgres state database."""

import signal

from sync.sandbox import EverflowServer, RefersionServer
from tests.conftest import Config, Customers, run_cli, start_cli, wait_for
from tests.test_e2e import everflow_destination, refersion_destination
from tests.test_visible import status_of


def outcomes(config: Config, audience: int) -> list[str]:
    rows = config.sql("SELECT outcome FROM sync_runs WHERE audience_id = :a ORDER BY id", a=audience)
    return [row.outcome for row in rows]


def test_an_invalid_audience_fixed_runs_at_the_next_cycle_not_a_cadence_later(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    with EverflowServer() as everflow:
        audience = config.audience("VIP", Customers.QUERY, schedule="1ms")
        config.connect(audience, everflow_destination(config, everflow))
        env = {"SYNC_INTERVAL": "1h", "SYNC_RELOAD_INTERVAL": "1s"}
        daemon = start_cli(state_url, "daemon", env=env)
        try:
            wait_for(lambda: outcomes(config, audience) == ["invalid"], timeout=30)
            config.sql("UPDATE audiences SET schedule = NULL WHERE id = :a", a=audience)
            # the invalid row was no run: the fixed audience runs now, not an hour after it
            wait_for(lambda: outcomes(config, audience) == ["invalid", "ok"], timeout=30)
        finally:
            daemon.send_signal(signal.SIGTERM)
            _, stderr = daemon.communicate(timeout=30)
        assert daemon.returncode == 0 and "Traceback" not in stderr, stderr
        assert [r.path for r in everflow.requests] == ["/"]


def test_exits_with_no_affiliate_to_disable_after_a_baseline_do_not_make_the_run_rejected(
    state_url: str, config: Config, customers: Customers
) -> None:
    users = [f"u{i:02d}" for i in range(12)]
    customers.add(*users)
    with RefersionServer() as refersion:
        audience = config.audience("VIP", Customers.QUERY)
        config.connect(audience, refersion_destination(config, refersion, on_exit="disable"))
        assert run_cli(state_url, "initial", "--baseline", "--yes").returncode == 0
        # they were never affiliates there: each exit's search finds nobody, there is nothing to disable
        customers.move(*users[1:], segment="gone")
        run = run_cli(state_url, "run")
        assert run.returncode == 0, run.stderr
        [row] = config.sql("SELECT outcome, exited, rejected, error FROM sync_runs WHERE exited > 0")
        assert tuple(row) == ("ok", 11, 11, None)
        rejections = config.sql("SELECT reason FROM sync_rejections")
        assert len(rejections) == 11 and all(r.reason.endswith(": nothing to disable") for r in rejections)
        assert not [r for r in refersion.requests if r.path.endswith("/status_change")]
        code, (status,) = status_of(state_url)
        assert (code, status["state"]) == (0, "ok")
