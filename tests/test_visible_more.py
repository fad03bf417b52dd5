"""Every failure visible where operators look (issue 23, its remaining items, and review findings), through
the real `audience-sync` command on a SQLite and on a Postgres state database."""

import os
import re
import signal
import uuid
from pathlib import Path
from subprocess import DEVNULL

import pytest
import sqlalchemy as sa

from sync.sandbox import EverflowServer, RefersionServer
from sync.settings import unknown_settings
from tests.conftest import MARIADB_URL, Config, Customers, run_cli, start_cli, wait_for
from tests.test_cli import LONG_AUDIENCE, LONG_DESTINATION, on_a_terminal
from tests.test_e2e import everflow_destination, refersion_destination
from tests.test_operations import _two_destinations
from tests.test_source_table import add_source
from tests.test_visible import status_of

ROOT = Path(__file__).parent.parent


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


def test_an_unknown_sync_variable_is_warned_once_with_the_closest_setting(
    state_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SYNC_SHOP_URL: a source's URL a `sources` row names in url_env, close to no setting
    typos = {"SYNC_INTERVALS": "2h", "SYNC_QUERY_TIMOUT": "1m", "SYNC_SHOP_URL": "sqlite://"}
    status = run_cli(state_url, "status", env=typos)
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    warned = [line.split(" WARNING ", 1)[1] for line in status.stderr.splitlines()]
    assert warned == [
        "SYNC_INTERVALS is set, but audience-sync reads no such setting; did you mean SYNC_INTERVAL? "
        "action=unknown_setting",
        "SYNC_QUERY_TIMOUT is set, but audience-sync reads no such setting; did you mean SYNC_QUERY_TIMEOUT? "
        "action=unknown_setting",
    ]
    # the daemon: once, at start
    log = tmp_path / "daemon.log"
    with log.open("w") as stderr:
        daemon = start_cli(state_url, "daemon", env={"SYNC_INTERVALS": "2h"}, stdout=DEVNULL, stderr=stderr)
        wait_for(lambda: "action=daemon_started" in log.read_text(), timeout=30)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, log.read_text()
    assert log.read_text().count("action=unknown_setting") == 1, log.read_text()

    # every SYNC_* name the documentation and the deployment files give is one the program knows
    documented = set()
    for path in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("deploy/*")]:
        documented |= set(re.findall(r"\bSYNC_[A-Z_]*[A-Z]\b", path.read_text()))
    assert "SYNC_METRICS_ADDRESS" in documented
    documented.remove("SYNC_INTERVALS")  # the README's example of a typo
    for name in os.environ:
        if name.startswith("SYNC_"):
            monkeypatch.delenv(name)
    for name in documented:
        monkeypatch.setenv(name, "x")
    assert unknown_settings() == []


def test_a_destination_deleted_and_reinserted_under_its_name_is_warned_naming_the_baseline(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2")
    with RefersionServer() as refersion:
        audience = config.audience("VIP Buyers", Customers.QUERY)
        config.connect(audience, refersion_destination(config, refersion))
        first = run_cli(state_url, "run")
        assert first.returncode == 0 and "full_send_planned" not in first.stderr, first.stderr
        assert "never synced" not in run_cli(state_url, "check").stdout
        # the row deleted (its connections and their state go with it) and inserted again
        config.sql("DELETE FROM destinations WHERE name = 'Refersion'")
        config.connect(audience, refersion_destination(config, refersion))

        warning = (
            "audience 'VIP Buyers' (id 1) -> 'Refersion': this connection has never synced, but the "
            "audience's key 'vip_buyers' is stored (at its first sync, or by hand when moving from Segment "
            "Engage): its first run sends every member as an entry. If "
            "'Refersion' already holds them (a destination deleted and re-inserted under the same name gets "
            "a new id and none of the old one's state), record them as accepted instead: audience-sync "
            "initial --baseline --audience 'VIP Buyers' --destination Refersion"
        )
        check = run_cli(state_url, "check")
        assert check.returncode == 0, check.stdout + check.stderr
        assert f"warning: {warning}\n" in check.stdout
        run = run_cli(state_url, "run")
        assert run.returncode == 0, run.stderr
        [logged] = [line for line in run.stderr.splitlines() if "action=full_send_planned" in line]
        assert f"WARNING {warning} action=full_send_planned" in logged and "entered=2" in logged
        again = run_cli(state_url, "run")
        assert again.returncode == 0 and "full_send_planned" not in again.stderr, again.stderr
        assert "never synced" not in run_cli(state_url, "check").stdout


def test_status_shows_no_next_run_for_a_disabled_connection_or_destination(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    with EverflowServer() as everflow, RefersionServer() as refersion:
        _two_destinations(config, everflow, refersion)
        assert run_cli(state_url, "run").returncode == 0

    def next_runs() -> dict[str, object]:
        code, rows = status_of(state_url)
        assert code == 0
        return {str(row["destination"]): row["next_run_earliest"] for row in rows}

    assert None not in next_runs().values()
    config.sql("UPDATE audience_destinations SET enabled = false WHERE destination_id = 2")
    shown = next_runs()
    assert shown["Refersion"] is None and shown["Everflow"] is not None
    config.sql("UPDATE destinations SET enabled = false WHERE name = 'Everflow'")
    assert next_runs() == {"Everflow": None, "Refersion": None}
    table = run_cli(state_url, "status").stdout.splitlines()
    assert [re.split(r"\s{3,}", line)[7] for line in table[1:]] == ["-", "-"], table


# an audience query cut short, and one with a syntax error in its middle
UNFINISHED = "SELECT user_id, email FROM {table} ORDER BY"
MIDDLE = "SELECT user_id, email FROM {table} WHERE email = = 'x'"
# what a database message about the wrapping audience-sync puts around a query would show
WRAPPING = ("AS q", "1 = 1", ":one", "$1", "LIMIT 0", "sync_stage")


def syntax_errors(state_url: str, config: Config, table: str, source: str | None = None) -> dict[str, str]:
    """Per audience, the reason its query failed as `check` prints it, the same as the run logs it."""
    destination = config.destination(
        "Everflow", "everflow", {"tracking_domain": "http://127.0.0.1:1", "network_id": "1"}
    )
    for name, query in (("Unfinished", UNFINISHED), ("Middle", MIDDLE)):
        extra = {"source": source} if source else {}
        config.connect(config.audience(name, query.format(table=table), **extra), destination)
    check = run_cli(state_url, "check")
    assert check.returncode == 2, check.stdout + check.stderr
    found = {}
    for line in check.stdout.splitlines():
        where, _, reason = line.partition(": the query failed: ")
        if reason:
            found[where.split("'")[1]] = reason
    run = run_cli(state_url, "run")
    for name, reason in found.items():
        assert f"audience {name!r} (id " in run.stderr and reason in run.stderr, run.stderr
    assert not [part for part in WRAPPING if part in check.stdout + run.stderr], check.stdout + run.stderr
    return found


def test_a_syntax_error_is_the_database_message_about_the_query_without_the_wrapping(
    backend: str, state_url: str, config: Config, customers: Customers
) -> None:
    found = syntax_errors(state_url, config, "customers")
    if backend == "postgres":  # it places the error: the end of a query cut short is said so
        assert found == {
            "Unfinished": "syntax error at the end of the query",
            "Middle": 'syntax error at or near "="',
        }
    else:  # SQLite names the token alone
        assert found == {"Unfinished": 'near ")": syntax error', "Middle": 'near "=": syntax error'}


@pytest.mark.mariadb
def test_a_syntax_error_of_a_streamed_source_shows_none_of_the_wrapping(
    state_url: str, config: Config, mariadb: sa.Engine
) -> None:
    table = f"syntax_{uuid.uuid4().hex[:8]}"
    with mariadb.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {table} (user_id TEXT, email TEXT)")
    try:
        add_source(config, "shop", MARIADB_URL)
        found = syntax_errors(state_url, config, table, source="shop")
    finally:
        with mariadb.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {table}")
    manual = (
        '(1064, "You have an error in your SQL syntax; check the manual that corresponds to your MariaDB '
        "server version for the right syntax to use "
    )
    assert found == {
        "Unfinished": f'{manual}at the end of the query")',
        "Middle": f"""{manual}near '= 'x'' at line 1")""",
    }


@pytest.mark.parametrize(
    "destination",
    [LONG_DESTINATION, "Refersion_Production_Account_For_The_Spring_Campaign_Of_2027 (EU)"],
    ids=["wrapped", "blocks"],
)
def test_status_on_an_80_column_terminal_breaks_no_name_mid_word(
    state_url: str, config: Config, customers: Customers, destination: str
) -> None:
    customers.add("u1")
    with RefersionServer() as refersion:
        settings = {"api_base": refersion.url + "/v2", "max_attempts": 1}
        config.connect(
            config.audience(LONG_AUDIENCE, Customers.QUERY),
            config.destination(destination, "refersion", settings, api_key="pub.wrong"),
        )
        assert run_cli(state_url, "run").returncode == 1  # its error is long too
    code, screen = on_a_terminal(state_url, "status", columns=80)
    assert code == 1
    lines = screen.splitlines()
    assert max(len(line) for line in lines) <= 80, screen
    shown = set(re.findall(r"[^\s│┃]+", screen))
    assert set((LONG_AUDIENCE + " " + destination).split()) <= shown, screen
