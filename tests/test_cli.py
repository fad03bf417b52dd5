"""The command line as operators and their scripts use it: status, listings, names, previews, check."""

import json
import os
import pty
import re
import shlex
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from importlib.metadata import version

from sync.sandbox import EverflowServer, RefersionServer, SegmentServer
from sync.tables import sync_leases
from tests.conftest import COMMAND, Config, Customers, cli_env, run_cli, start_cli

LONG_AUDIENCE = "Order Completed In The Last Thirty Days By Customers Who Spent Over A Thousand"
LONG_DESTINATION = "Everflow Production Network For The Spring Campaign Of The Year 2027"


def piped(state_url: str, command_line: str, env: dict[str, str] | None = None) -> str:
    """What the real command writes into a shell pipe (not a terminal): `audience-sync status | cat`."""
    done = subprocess.run(
        f"{shlex.quote(COMMAND)} {command_line}",
        shell=True,
        env=cli_env(state_url, env),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


def on_a_terminal(state_url: str, *args: str, columns: int, stdout: int | None = None) -> tuple[int, str]:
    """The exit code of the real command and what it shows on a terminal `columns` wide (stderr, and stdout
    unless it goes to `stdout`)."""
    leader, follower = pty.openpty()
    process = start_cli(
        state_url, *args, env={"COLUMNS": str(columns)}, stdout=stdout or follower, stderr=follower
    )
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    return process.wait(timeout=60), re.sub(r"\x1b\[[0-9;]*m", "", output.decode(errors="replace"))


def everflow(config: Config, server: EverflowServer, name: str = "Everflow") -> int:
    settings = {"tracking_domain": server.url, "network_id": "1", "event_mapping": {"Audience Entered": 7}}
    return config.destination(name, "everflow", settings)


def refused_refersion(config: Config, server: RefersionServer) -> int:
    """A Refersion destination whose key the server refuses (401)."""
    settings = {"api_base": server.url + "/v2", "max_attempts": 1}
    return config.destination("Refersion", "refersion", settings, api_key="pub.wrong")


def test_status_in_a_pipe_is_one_full_line_per_connection(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1", "u2")
    with EverflowServer() as server:
        audience = config.audience(LONG_AUDIENCE, Customers.QUERY)
        config.connect(audience, everflow(config, server, LONG_DESTINATION))
        config.connect(config.audience("VIP", Customers.QUERY), everflow(config, server))
        assert run_cli(state_url, "run").returncode == 0

    lines = piped(state_url, "status | cat", env={"COLUMNS": "80"}).splitlines()
    assert "│" not in "".join(lines) and "…" not in "".join(lines)
    assert re.split(r"\s{3,}", lines[0])[:4] == ["AUDIENCE", "DESTINATION", "STATE", "MEMBERS"]
    assert len(lines) == 3, lines
    long_row = re.split(r"\s{3,}", lines[1])
    assert long_row[:6] == [LONG_AUDIENCE, LONG_DESTINATION, "ok", "2", "2", "0"], lines
    assert "LAST RUN (UTC)" in lines[0] and "NEXT RUN (UTC)" in lines[0]
    [found] = piped(state_url, f"status | grep {shlex.quote(LONG_AUDIENCE)}").splitlines()
    assert found == lines[1]


def test_status_on_a_terminal_wraps_other_columns_before_names(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    with RefersionServer() as server:
        config.connect(
            config.audience("Order Completed Last 30 Days", Customers.QUERY),
            refused_refersion(config, server),
        )
        run_cli(state_url, "run")
    _, screen = on_a_terminal(state_url, "status", columns=100)
    assert "│ Order Completed Last 30 Days │ Refersion" in screen, screen
    assert "…" not in screen  # the other columns wrapped, within the 100 columns
    assert max(len(line) for line in screen.splitlines() if line.startswith(("┃", "│"))) <= 100


def test_status_exits_1_while_an_enabled_connection_failed(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    with EverflowServer() as server, RefersionServer() as refersion:
        audience = config.audience("VIP", Customers.QUERY)
        config.connect(audience, everflow(config, server))
        assert run_cli(state_url, "run").returncode == 0
        assert run_cli(state_url, "status").returncode == 0
        config.connect(audience, refused_refersion(config, refersion))
        assert run_cli(state_url, "run").returncode == 1

    failed = run_cli(state_url, "status")
    assert failed.returncode == 1, failed.stdout
    row = next(line for line in failed.stdout.splitlines() if "Refersion" in line)
    assert "failed, initial sync incomplete" in row and "credentials refused (HTTP 401" in row
    config.sql("UPDATE destinations SET enabled = false WHERE name = 'Refersion'")
    disabled = run_cli(state_url, "status")
    assert disabled.returncode == 0, disabled.stdout
    assert re.split(r"\s{3,}", disabled.stdout.splitlines()[2])[:3] == ["VIP", "Refersion", "disabled"]


def test_status_shows_a_run_in_progress_and_a_held_connection(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    with EverflowServer() as server:
        audience = config.audience("VIP", Customers.QUERY)
        config.connect(audience, everflow(config, server))
        assert run_cli(state_url, "run").returncode == 0
        config.sql("DELETE FROM customers")  # the query returns nobody while a member is accepted
        assert run_cli(state_url, "run").returncode == 1
    held = run_cli(state_url, "status", "--json")
    assert held.returncode == 1
    [row] = json.loads(held.stdout)
    assert row["state"] == "held" and "returned no rows" in row["last_error"], row

    with config.engine.begin() as conn:  # another daemon's live lease on the audience
        later = datetime.now(UTC) + timedelta(minutes=5)
        conn.execute(
            sync_leases.insert().values(audience_id=audience, owner="other-host:4242", expires_at=later)
        )
    [row] = json.loads(run_cli(state_url, "status", "--json").stdout)
    assert (row["state"], row["running_on"]) == ("running", "other-host:4242")
    assert "running on other-host:4242" in run_cli(state_url, "status").stdout


def test_status_json_has_ids_and_iso_8601_times_in_utc(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    with EverflowServer() as server:
        audience = config.audience("VIP", Customers.QUERY)
        destination = everflow(config, server)
        config.connect(audience, destination)
        assert run_cli(state_url, "run").returncode == 0
    done = run_cli(state_url, "status", "--json", env={"SYNC_INTERVAL": "2h-3h"})
    [row] = json.loads(done.stdout)
    assert (row["audience_id"], row["destination_id"], row["state"]) == (audience, destination, "ok")
    times = {key: row["last_run"][key] for key in ("started_at", "finished_at")}
    times |= {key: row[key] for key in ("next_run_earliest", "next_run_latest")}
    for key, text in times.items():
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00", text), (key, text)
    started = datetime.fromisoformat(times["started_at"])
    assert datetime.fromisoformat(times["next_run_earliest"]) == started + timedelta(hours=2)
    assert datetime.fromisoformat(times["next_run_latest"]) == started + timedelta(hours=3)


def test_version_comes_from_the_package_metadata() -> None:
    done = run_cli("sqlite:///unused.db", "--version")
    assert (done.returncode, done.stdout) == (0, f"audience-sync {version('audience-sync')}\n")


def test_names_match_exactly_then_by_case_else_say_what_is_close(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    with EverflowServer() as server:
        destination = everflow(config, server)
        for name, key in (("VIP", "vip_upper"), ("Vip", "vip"), ("Recent Buyers", "recent_buyers")):
            config.connect(config.audience(name, Customers.QUERY, key=key), destination)

        exact = run_cli(state_url, "run", "--audience", "Vip")
        assert exact.returncode == 0, exact.stderr
        assert "Vip -> Everflow: ok" in exact.stderr and "VIP -> Everflow" not in exact.stderr
        by_case = run_cli(state_url, "run", "--audience", "recent buyers", "--destination", "EVERFLOW")
        assert by_case.returncode == 0, by_case.stderr
        assert "Recent Buyers -> Everflow: ok" in by_case.stderr
        ambiguous = run_cli(state_url, "run", "--audience", "vip")
        assert (ambiguous.returncode, ambiguous.stderr.splitlines()[-1]) == (
            2,
            "audience-sync: --audience 'vip' matches 'VIP' or 'Vip' but for case; give one of them exactly",
        )
        unknown = run_cli(state_url, "runs", "--audience", "Recnt Buyer")
        assert (unknown.returncode, unknown.stderr.splitlines()[-1]) == (
            2,
            "audience-sync: no audience named 'Recnt Buyer'; did you mean 'Recent Buyers'?",
        )
        part = run_cli(state_url, "run", "--destination", "ever")
        assert part.returncode == 2 and "no destination named 'ever'; did you mean 'Everflow'?" in part.stderr
    assert len(server.requests) == 2  # u1 in Vip and in Recent Buyers; nothing for the refused names


def test_audiences_destinations_and_runs_list_as_tables_and_json(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    with EverflowServer() as server, RefersionServer() as refersion:
        vip = config.audience("VIP", Customers.QUERY, schedule="30m")
        config.connect(vip, everflow(config, server))
        config.connect(vip, refused_refersion(config, refersion))
        config.audience("Dormant", Customers.QUERY, enabled=False)
        for _ in range(3):
            run_cli(state_url, "run")

    lines = run_cli(state_url, "audiences").stdout.splitlines()
    assert [re.split(r"\s{3,}", line) for line in lines[1:]] == [
        ["Dormant", "2", "dormant (from the name)", "SYNC_INTERVAL", "no", "0"],
        ["VIP", str(vip), "vip", "30m", "yes", "2"],
    ]
    [dormant, _] = json.loads(run_cli(state_url, "audiences", "--json").stdout)
    assert dormant["key"] == "dormant" and dormant["key_stored"] is False and dormant["enabled"] is False

    destinations = run_cli(state_url, "destinations").stdout
    assert "pub.wrong" not in destinations
    assert re.split(r"\s{3,}", destinations.splitlines()[2])[:5] == [
        "Refersion",
        "2",
        "refersion",
        "native",
        "in the row",
    ]
    assert {d["name"] for d in json.loads(run_cli(state_url, "destinations", "--json").stdout)} == {
        "Everflow",
        "Refersion",
    }

    runs = run_cli(state_url, "runs", "--audience", "vip", "--limit", "4")
    assert runs.returncode == 0 and len(runs.stdout.splitlines()) == 5, runs.stdout
    assert "credentials refused (HTTP 401" in runs.stdout and "STARTED (UTC)" in runs.stdout
    # the last run's two connections are recorded in whichever order their threads finish
    newest = json.loads(run_cli(state_url, "runs", "--json", "--limit", "2").stdout)
    assert {(r["destination"], r["outcome"]) for r in newest} == {("Refersion", "failed"), ("Everflow", "ok")}
    assert datetime.fromisoformat(newest[0]["started_at"]).utcoffset() == timedelta(0)
    assert run_cli(state_url, "runs", "--limit", "0").returncode == 2


def test_forget_dry_run_says_what_it_would_do_and_does_nothing(
    state_url: str, config: Config, customers: Customers
) -> None:
    customers.add("u1")
    with RefersionServer() as refersion:
        settings = {"api_base": refersion.url + "/v2", "on_exit": "disable"}
        config.connect(
            config.audience("VIP", Customers.QUERY),
            config.destination("Refersion", "refersion", settings, api_key="pub.sec"),
        )
        assert run_cli(state_url, "initial").returncode == 0
        sent = len(refersion.requests)

        preview = run_cli(state_url, "forget", "u1", "--dry-run")
        assert preview.returncode == 0, preview.stderr
        assert len(refersion.requests) == sent
    assert [a["status"] for a in refersion.affiliates.values()] == ["PENDING"]
    assert config.sql("SELECT count(*) FROM sync_state WHERE user_id = 'u1'") == [(1,)]
    first, request = preview.stdout.splitlines()
    assert first == "Refersion: would send (affiliate disabled, starting with this request)"
    # the numeric id was kept from the create's answer: the disabling request itself, no lookup first
    assert json.loads(request)["url"].endswith("/v2/affiliate/status_change") and "pub.sec" not in request
    assert (
        "would remove 1 from sync_state, 0 from sync_rejections; nothing was sent or removed"
        in preview.stderr
    )


def test_check_reports_every_problem_of_a_row(state_url: str, config: Config, customers: Customers) -> None:
    with EverflowServer() as server:
        config.connect(config.audience("VIP", Customers.QUERY), everflow(config, server))
        config.audience("Two Wrongs", "  ", schedule="1ms")
        text = run_cli(state_url, "check")
        as_json = run_cli(state_url, "check", "--json")
    assert text.returncode == 2 and as_json.returncode == 2
    where = "audiences row id=2 ('Two Wrongs')"
    assert [line for line in text.stdout.splitlines() if not line.startswith("warning: ")] == [
        f"{where}: query is empty",
        f"{where}: schedule: '1ms' is shorter than 1s, the shortest cadence",
    ]
    findings = json.loads(as_json.stdout)["findings"]
    assert {"severity": "error", "message": f"{where}: query is empty"} in findings
    assert [f["severity"] for f in findings if "Two Wrongs" in f["message"]] == ["error", "error"]


def test_check_reports_every_problem_of_a_destination_row(
    state_url: str, config: Config, customers: Customers
) -> None:
    audience = config.audience("VIP", Customers.QUERY)
    everflow_base = {"tracking_domain": "https://t.example.com", "network_id": "1"}
    three = {**everflow_base, "tracking_domian": "x", "rate_limit": 0}
    config.connect(
        audience, config.destination("Three Wrongs", "everflow", three, api_key_env="UNSET_EF_KEY")
    )
    refersion_settings = {"api_base": "http://api.example.com/v2", "on_exit": "delete"}
    config.destination("Refersion", "refersion", refersion_settings, api_key="PUBxyzSECxyz")
    config.destination("One Wrong", "everflow", {**everflow_base, "timeout": 0})
    text = run_cli(state_url, "check")
    as_json = run_cli(state_url, "check", "--json")
    run = run_cli(state_url, "run")
    assert text.returncode == 2 and as_json.returncode == 2
    three, refersion, one = (
        f"destinations row id={n}" for n in ("1 ('Three Wrongs')", "2 ('Refersion')", "3 ('One Wrong')")
    )
    three_wrongs = [
        f"{three}: settings has unknown field(s) tracking_domian",
        f"{three}: api_key_env names 'UNSET_EF_KEY', which is not set or empty",
        f"{three}: settings.rate_limit must be a number from 0.001 to 1,000,000, not 0",
    ]
    expected = [
        *three_wrongs,
        f"{refersion}: settings.on_exit must be 'ignore' or 'disable', not 'delete'",
        f"{refersion}: settings.api_base: 'http://api.example.com/v2' must use https:// (http is allowed "
        "only for loopback hosts)",
        f"{refersion}: the Refersion API key must be 'publickey.secretkey' (the key given is not two "
        "non-empty parts of plain ASCII around a '.')",
        f"{one}: settings.timeout must be a number from 0.001 to 3,600, not 0",
    ]
    assert [line for line in text.stdout.splitlines() if not line.startswith("warning: ")] == expected
    findings = json.loads(as_json.stdout)["findings"]
    assert [f["message"] for f in findings if f["severity"] == "error"] == expected
    assert "PUBxyz" not in text.stdout + as_json.stdout
    # a run refuses the connection with the same problems, on one line
    assert "; ".join(three_wrongs) in run.stderr, run.stderr


def test_check_reports_every_problem_of_a_connection_row(
    state_url: str, config: Config, customers: Customers
) -> None:
    everflow_settings = {"tracking_domain": "https://t.example.com", "network_id": "1"}
    destination = config.destination("Everflow", "everflow", everflow_settings)
    config.connect(
        config.audience("VIP", Customers.QUERY),
        destination,
        {"type": "page", "exited_event": "", "entred_event": "In"},
    )
    config.connect(config.audience("Loyal", Customers.QUERY), destination, {"type": "group"})
    text = run_cli(state_url, "check")
    as_json = run_cli(state_url, "check", "--json")
    assert text.returncode == 2 and as_json.returncode == 2
    vip, loyal = (f"audience_destinations row ({name!r}, 'Everflow')" for name in ("VIP", "Loyal"))
    expected = [
        f"{vip}: settings has unknown field(s) entred_event",
        f"{vip}: settings.type must be 'identify' or 'track', not 'page'",
        f"{vip}: settings.exited_event must be a non-empty text",
        f"{loyal}: settings.type must be 'identify' or 'track', not 'group'",
    ]
    assert [line for line in text.stdout.splitlines() if not line.startswith("warning: ")] == expected
    findings = json.loads(as_json.stdout)["findings"]
    assert [f["message"] for f in findings if f["severity"] == "error"] == expected


def test_the_daemon_logs_every_problem_of_the_rows_at_start(state_url: str, config: Config) -> None:
    config.destination("Keyless", "refersion", {}, api_key_env="UNSET_REFERSION_KEY")
    config.audience("Two Wrongs", "  ", schedule="1ms")
    daemon = start_cli(state_url, "daemon", env={"SYNC_LOG_FORMAT": "json"})
    try:
        assert daemon.stderr is not None
        records = []
        while not records or records[-1].get("action") != "config_checked":
            records.append(json.loads(daemon.stderr.readline()))
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=30)
    problems = [r["message"] for r in records if r.get("action") == "config_problem"]
    assert problems == [
        "audiences row id=1 ('Two Wrongs'): query is empty",
        "audiences row id=1 ('Two Wrongs'): schedule: '1ms' is shorter than 1s, the shortest cadence",
        "destinations row id=1 ('Keyless'): api_key_env names 'UNSET_REFERSION_KEY', which is not set or "
        "empty",
    ]
    assert records[-1]["message"].startswith("configuration: 2 rows checked, 3 problem(s)")


def test_check_connect_catches_a_refused_key(state_url: str, config: Config, customers: Customers) -> None:
    with RefersionServer() as refersion, EverflowServer() as server:
        audience = config.audience("VIP", Customers.QUERY)
        config.connect(audience, refused_refersion(config, refersion))
        config.connect(audience, everflow(config, server))
        offline = run_cli(state_url, "check")
        assert offline.returncode == 0 and refersion.requests == []  # without --connect: no call, no proof

        refused = run_cli(state_url, "check", "--connect")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "destinations row id=1 ('Refersion'): credentials refused (HTTP 401" in refused.stdout
        assert "pub.wrong" not in refused.stdout + refused.stderr
        assert "destinations row id=2 ('Everflow'): not proved: " in refused.stderr
        [probe] = refersion.requests
        assert probe.path == "/v2/affiliate/search"

        config.sql("UPDATE destinations SET api_key = 'pub.sec' WHERE name = 'Refersion'")
        accepted = run_cli(state_url, "check", "--connect", "--json")
    assert accepted.returncode == 0, accepted.stdout
    assert (
        "destinations row id=1 ('Refersion'): credentials accepted"
        in json.loads(accepted.stdout)["credentials"]
    )
    assert refersion.affiliates == {}  # the probe created nothing


def test_progress_bars_show_rates_failed_and_retried_and_logs_print_above_them(
    state_url: str, config: Config, customers: Customers
) -> None:
    """On a terminal (a pty for stderr), each connection's bar shows requests per second, failed and retried
    counts, and log lines are printed above the bars, never inside a bar's line."""
    customers.add(*[f"u{i:02d}" for i in range(20)])
    with SegmentServer(api_key="k", delay=0.02) as segment:
        segment.fault(503, b'{"message": "busy"}', times=3)  # three retries
        config.connect(
            config.audience("VIP", Customers.QUERY),
            config.destination(
                "Segment",
                "everflow",
                {
                    "transport": "segment",
                    "endpoint": segment.url,
                    "backoff_initial": 0.01,
                    "max_in_flight": 1,
                },
                api_key="k",
            ),
        )
        leader, follower = pty.openpty()
        with ThreadPoolExecutor(1) as reader:
            reading = reader.submit(_read_all, leader)  # read as it comes: a full pty would block the command
            done = subprocess.run(
                [COMMAND, "run"],
                env={**cli_env(state_url), "COLUMNS": "200"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=follower,
                timeout=120,
            )
            os.close(follower)
            shown = reading.result(timeout=30)
        os.close(leader)
    assert done.returncode == 0, shown
    lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line) for line in shown.replace("\r", "\n").splitlines()]
    bars = [line for line in lines if "VIP -> Segment" in line and "req/s" in line]
    assert bars, shown
    assert re.search(r"20/20 .*\d+\.\d req/s +failed 0 +retried 3", bars[-1]), bars[-1]
    logged = [line for line in lines if "action=" in line]
    assert any("action=run_finished" in line for line in logged), shown
    assert not [line for line in logged if "req/s" in line]  # no log line written across a bar


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")
