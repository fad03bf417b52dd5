"""Operator commands through the real CLI: check, explain, forget."""

import json
import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from sync import database
from sync.sandbox import EverflowServer, RefersionServer, SegmentServer
from tests.conftest import Config, Customers, free_port, run_cli, start_cli
from tests.test_cli import on_a_terminal
from tests.test_e2e import everflow_destination, refersion_destination


def test_check_lists_every_problem_at_once(state_url: str, config: Config, customers: Customers) -> None:
    good = config.destination(
        "Everflow", "everflow", {"tracking_domain": "track.example.com", "network_id": "1"}
    )
    config.connect(config.audience("VIP", Customers.QUERY), good)
    ok = run_cli(state_url, "check")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "every audience query runs and returns user_id" in ok.stderr

    config.destination(
        "Plain", "everflow", {"tracking_domain": "http://track.example.com", "network_id": "1"}
    )
    config.destination("Keyless", "refersion", {}, api_key_env="UNSET_REFERSION_KEY")
    config.destination("Mystery", "hubspot", {})
    config.audience("No Id", "SELECT email FROM customers")
    config.audience("Typo", "SELEC user_id FROM customers")
    config.audience("Bad Connection", Customers.QUERY.replace("'vip'", "'x'"))
    config.sql(
        "INSERT INTO audience_destinations (audience_id, destination_id, settings) "
        "SELECT id, :d, '{\"type\": \"page\"}' FROM audiences WHERE name = 'Bad Connection'",
        d=good,
    )
    sqlite = state_url.startswith("sqlite")
    if sqlite:  # what an operator types in the sqlite3 shell; SQL reads it as false
        config.sql("UPDATE audiences SET enabled = 'true' WHERE name = 'VIP'")
    bad = run_cli(state_url, "check")
    assert bad.returncode == 2
    problems = [line for line in bad.stdout.splitlines() if not line.startswith("warning: ")]
    assert len(problems) == 6 + sqlite, bad.stdout
    if sqlite:
        assert "audiences row id=1: enabled holds 'true'; set it to 1 or 0" in problems
    for expected in (
        "('Plain'): settings.tracking_domain: 'http://track.example.com' must use https://",
        "('Keyless'): api_key_env names 'UNSET_REFERSION_KEY', which is not set or empty",
        "('Mystery'): kind 'hubspot' is unknown (use 'everflow' or 'refersion')",
        "audience 'No Id' (id 2): the query returns no user_id column (it returns email)",
        "audience 'Typo' (id 3): the query failed:",
        "('Bad Connection', 'Everflow'): settings.type must be 'identify' or 'track'",
    ):
        assert any(expected in line for line in problems), (expected, problems)


def test_explain_shows_membership_and_acceptance(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2")
    config.sql("UPDATE customers SET transaction_id = NULL WHERE user_id = 'u2'")
    with EverflowServer() as everflow:
        destination = everflow_destination(config, everflow)
        config.connect(config.audience("VIP", Customers.QUERY), destination)
        assert run_cli(state_url, "run").returncode == 0
        u1 = json.loads(run_cli(state_url, "explain", "u1", "--json").stdout)
        assert [(e["audience"], e["destination"], e["member"], e["accepted"]) for e in u1] == [
            ("VIP", "Everflow", True, True)
        ]
        u2 = json.loads(run_cli(state_url, "explain", "u2", "--json").stdout)
        assert u2[0]["accepted"] is None
        assert u2[0]["rejection"]["reason"].startswith("Everflow requires a TransactionId")
        table = run_cli(state_url, "explain", "u2", env={"COLUMNS": "200"})
        assert table.returncode == 0 and "Everflow requires a TransactionId" in table.stdout

        # "member now" is the query's answer now: u1 left, and a broken query says why it cannot tell
        customers.move("u1", segment="other")
        config.sql("UPDATE audiences SET query = 'SELECT user_id FROM nowhere' WHERE name = 'VIP'")
        config.connect(config.audience("Left", Customers.QUERY), destination)
        u1 = json.loads(run_cli(state_url, "explain", "u1", "--json").stdout)
        by_audience = {e["audience"]: e for e in u1}
        assert by_audience["Left"]["member"] is False and by_audience["Left"]["member_unknown"] is None
        assert by_audience["VIP"]["member"] is None and by_audience["VIP"]["accepted"] is True
        assert "'VIP'" in by_audience["VIP"]["member_unknown"]
        assert "query failed" in by_audience["VIP"]["member_unknown"]
        table = run_cli(state_url, "explain", "u1", env={"COLUMNS": "300"})
        assert "query failed" in table.stdout

        # a connection that does not sync says so, whichever of its rows is disabled
        assert [e["enabled"] for e in u1] == [True, True]
        paused = config.destination(
            "Paused", "everflow", {"tracking_domain": everflow.url, "network_id": "1"}
        )
        config.connect(config.audience("Quiet", Customers.QUERY), destination)
        config.connect(config.audience("Other", Customers.QUERY), paused)
        config.sql("UPDATE destinations SET enabled = false WHERE name = 'Paused'")
        config.sql(
            "UPDATE audience_destinations SET enabled = false WHERE audience_id = ("
            "SELECT id FROM audiences WHERE name = 'Quiet')"
        )
        u1 = json.loads(run_cli(state_url, "explain", "u1", "--json").stdout)
        assert {e["audience"]: e["enabled"] for e in u1} == {
            "Left": True,
            "Other": False,
            "Quiet": False,
            "VIP": True,
        }
        table = run_cli(state_url, "explain", "u1", env={"COLUMNS": "300"})
        assert "Paused (disabled)" in table.stdout and "Everflow (disabled)" in table.stdout


@pytest.mark.parametrize("refersion_fails", [False, True])
def test_forget_tells_each_destination_then_drops_state(
    state_url: str, config: Config, customers: Customers, refersion_fails: bool
) -> None:
    customers.add("u1", "u2")
    with EverflowServer() as everflow, RefersionServer() as refersion, SegmentServer(api_key="k") as segment:
        audience = config.audience("VIP", Customers.QUERY)
        config.connect(audience, everflow_destination(config, everflow))
        config.connect(audience, refersion_destination(config, refersion, max_attempts=1))
        config.connect(
            audience,
            config.destination(
                "Segment", "refersion", {"transport": "segment", "endpoint": segment.url}, api_key="k"
            ),
        )
        assert run_cli(state_url, "initial").returncode == 0
        if refersion_fails:
            refersion.fault(500, times=5)

        result = run_cli(state_url, "forget", "u1")
        assert result.returncode == (1 if refersion_fails else 0), result.stderr
        lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
        assert lines["Everflow"].startswith("nothing to send")
        assert lines["Segment"] == "sent (delete message accepted)"
        assert segment.messages[-1]["type"] == "delete" and segment.messages[-1]["userId"] == "u1"
        affiliate = next(a for a in refersion.affiliates.values() if a["unique_merchant_id"] == "u1")
        if refersion_fails:
            assert lines["Refersion"].startswith("failed")
            assert affiliate["status"] != "DISABLED"
        else:
            assert lines["Refersion"] == "sent (affiliate disabled accepted)"
            assert affiliate["status"] == "DISABLED"
        left = config.sql(
            "SELECT d.name FROM sync_state s JOIN destinations d ON d.id = s.destination_id "
            "WHERE s.user_id = 'u1'"
        )
        assert [name for (name,) in left] == (["Refersion"] if refersion_fails else [])
        assert config.sql("SELECT count(*) FROM sync_state WHERE user_id = 'u2'")[0][0] == 3


def test_forget_on_a_read_only_state_file_says_so_and_exits_1(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    database.upgrade(url)
    engine = database.create_engine(url)
    config = Config(engine)
    Customers(engine).add("u1")
    with SegmentServer(api_key="k") as segment:
        config.connect(
            config.audience("VIP", Customers.QUERY),
            config.destination(
                "Segment", "refersion", {"transport": "segment", "endpoint": segment.url}, api_key="k"
            ),
        )
        assert run_cli(url, "initial").returncode == 0
        read_only = f"sqlite:///file:{tmp_path / 'state.db'}?mode=ro&uri=true"
        result = run_cli(read_only, "forget", "u1")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "Segment: sent (delete message accepted)\n"
    assert (
        "user 'u1' is still in the state tables (the state database failed: "
        "attempt to write a readonly database): run forget again"
    ) in result.stderr
    assert config.sql("SELECT count(*) FROM sync_state WHERE user_id = 'u1'")[0][0] == 1
    engine.dispose()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_read_only_state_database_stops_a_run_with_one_line_and_exit_2(
    backend: str, state_url: str, config: Config, customers: Customers, log_format: str
) -> None:
    """Finding 12: a state database that refuses writes is one that nothing can run on; in JSON log mode
    the line saying so is JSON like the others."""
    customers.add("u1")
    with SegmentServer(api_key="k") as segment:
        config.connect(
            config.audience("VIP", Customers.QUERY),
            config.destination(
                "Segment", "refersion", {"transport": "segment", "endpoint": segment.url}, api_key="k"
            ),
        )
        name = sa.make_url(state_url).database
        if backend == "sqlite":  # (chmod 0444 does not stop root, who runs the tests in CI)
            read_only = f"sqlite:///file:{name}?mode=ro&uri=true"
        else:
            config.sql(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            read_only = state_url
        for command_line in (["run"], ["initial"], ["run", "--dry-run"], ["daemon"]):
            done = run_cli(read_only, *command_line, env={"SYNC_LOG_FORMAT": log_format}, timeout=30)
            assert done.returncode == 2 and "Traceback" not in done.stderr, (command_line, done.stderr)
            refused = f"the state database ({database.describe(read_only)}) refuses writes: "
            last = done.stderr.splitlines()[-1]
            if log_format == "json":
                records = [json.loads(line) for line in done.stderr.splitlines()]
                assert records[-1]["level"] == "ERROR" and records[-1]["message"].startswith(refused), last
            else:
                assert last.startswith(f"audience-sync: {refused}"), last
            assert "read-only" in last or "readonly" in last, last
    assert segment.messages == []


def test_status_table_and_progress_bar_on_a_terminal(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2", "u3")
    with EverflowServer() as everflow:
        # brackets in a name are shown as written, not read as Rich markup (a stray closing tag crashed)
        config.connect(
            config.audience("VIP [/gold]", Customers.QUERY), everflow_destination(config, everflow)
        )
        before = run_cli(state_url, "status", env={"COLUMNS": "200"})
        assert before.returncode == 0 and "VIP [/gold]" in before.stdout and "never" in before.stdout

        # stderr on a terminal: progress bars instead of log lines only
        code, screen = on_a_terminal(state_url, "initial", columns=120, stdout=subprocess.DEVNULL)
        assert code == 0
        assert "VIP [/gold] -> Everflow" in screen and "3/3" in screen and "eta" in screen

        after = run_cli(state_url, "status")  # a pipe: plain columns
        row = next(line for line in after.stdout.splitlines() if "Everflow" in line)
        assert "ok +3 -0 ok=3 rej=0 fail=0" in row
        assert re.split(r"\s{3,}", row)[:6] == ["VIP [/gold]", "Everflow", "ok", "3", "3", "0"]


def test_brackets_in_names_and_destination_errors_are_shown_not_read_as_markup(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u0", "u1")
    with EverflowServer() as everflow:
        audience = config.audience("VIP [bold]customers[/bold]", Customers.QUERY)
        config.connect(audience, everflow_destination(config, everflow))
        everflow.fault(400, body='{"error": "bad value [/transaction_id]"}')  # the other one is accepted
        run_cli(state_url, "run")
        [(refused,)] = config.sql("SELECT user_id FROM sync_rejections")
        customers.add("u2")
        everflow.fault(403, body='{"error": "token rejected [/auth]"}')
        run_cli(state_url, "run")

    status = run_cli(state_url, "status", env={"COLUMNS": "300"})
    assert status.returncode == 1, status.stderr  # the last run failed
    assert "VIP [bold]customers[/bold]" in status.stdout and "token rejected [/auth]" in status.stdout
    _, screen = on_a_terminal(state_url, "status", columns=300)
    assert "VIP [bold]customers[/bold]" in screen and "token rejected [/auth]" in screen
    explain = run_cli(state_url, "explain", refused, env={"COLUMNS": "300"})
    assert explain.returncode == 0, explain.stderr
    assert "VIP [bold]customers[/bold]" in explain.stdout and "bad value [/transaction_id]" in explain.stdout


def test_demo_shows_entries_and_exits_on_a_file_of_its_own(tmp_path: Path) -> None:
    demo = tmp_path / "demo.db"
    done = run_cli("sqlite:///never-touched.db", "demo", "--file", str(demo))
    assert done.returncode == 0, done.stderr
    assert "Big Spenders -> Everflow (sandbox): ok (entered 3, exited 0)" in done.stdout
    assert "Big Spenders -> Refersion (sandbox): ok (entered 1, exited 1)" in done.stdout
    assert "grace@example.com    DISABLED  country US" in done.stdout
    # the demo ends with a reconcile that finds nothing (Everflow's without a reporting key says why not)
    assert "Big Spenders -> Refersion (sandbox): ok (4 confirmed)" in done.stdout
    assert "Big Spenders -> Everflow (sandbox): ok (4 confirmed)" in done.stdout  # its conversion report
    assert demo.exists() and not Path("never-touched.db").exists()


def _sandbox_on_free_ports() -> tuple[subprocess.Popen[str], int, str]:
    """The sandbox on three ports: another test's server may hold the two after a free one, so try again."""
    for _ in range(10):
        port = free_port()
        sandbox = start_cli("sqlite:///unused.db", "sandbox", "--port", str(port))
        assert sandbox.stdout is not None
        first = sandbox.stdout.readline()
        if first:
            return sandbox, port, first
        assert "cannot listen on 127.0.0.1 ports" in sandbox.communicate(timeout=10)[1]
    raise AssertionError("no three free ports in a row in 10 tries")


def test_sandbox_serves_the_receivers_until_interrupted(tmp_path: Path) -> None:
    sandbox, port, first = _sandbox_on_free_ports()
    try:
        assert first.startswith(f"Everflow postbacks:  tracking_domain http://127.0.0.1:{port}")
        answer = httpx.get(f"http://127.0.0.1:{port}/", params={"nid": "1", "transaction_id": "t1"})
        assert answer.status_code == 200
        refused = httpx.post(f"http://127.0.0.1:{port + 1}/v2/affiliate/get", json={"id": 1})
        assert refused.status_code == 401  # no keys: Refersion's 401
        assert sandbox.stdout is not None
        reports = sandbox.stdout.readline()
        assert reports.startswith(f"Everflow reports:    reporting_api_base http://127.0.0.1:{port}/v1")
        key = reports.split("reporting key ")[1].split()[0]
        report = httpx.get(
            f"http://127.0.0.1:{port}/v1/networks/reporting/events/t1", headers={"X-Eflow-API-Key": key}
        )
        assert report.status_code == 200, report.text  # the key it prints is the one it takes
    finally:
        sandbox.send_signal(signal.SIGINT)
        _, stderr = sandbox.communicate(timeout=10)
    assert sandbox.returncode == 0, stderr
    assert "EverflowServer GET / -> 200" in stderr and "Traceback" not in stderr
